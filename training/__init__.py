"""Training: mesh, model assembly, optimizer, sharded state, checkpoints, metrics, the loop."""
