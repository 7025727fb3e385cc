"""Image backbones sharing one interface: `module(images, *, train) -> features [B, D]`."""
