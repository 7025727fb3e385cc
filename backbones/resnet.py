"""ResNet v1.5 (18/34/50): stride on the 3x3 conv, projection shortcuts, zero-init last BN scale."""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

_STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
_BOTTLENECK = {18: False, 34: False, 50: True}


def _pad(k: int):
  """Symmetric 'same' padding for a k x k kernel, as torchvision pads."""
  return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convs; output channels = `filters`."""
  filters: int
  strides: int = 1
  conv: Callable[..., nn.Module] = nn.Conv
  norm: Callable[..., nn.Module] = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (3, 3), (self.strides,) * 2, padding=_pad(3), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), padding=_pad(3), name='conv2')(y)
    y = self.norm(scale_init=nn.initializers.zeros, name='bn2')(y)
    return nn.relu(_shortcut(self, x, y.shape[-1]) + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 expanding to 4 * `filters` channels."""
  filters: int
  strides: int = 1
  conv: Callable[..., nn.Module] = nn.Conv
  norm: Callable[..., nn.Module] = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (1, 1), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), (self.strides,) * 2, padding=_pad(3), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(4 * self.filters, (1, 1), name='conv3')(y)
    y = self.norm(scale_init=nn.initializers.zeros, name='bn3')(y)
    return nn.relu(_shortcut(self, x, y.shape[-1]) + y)


def _shortcut(block: nn.Module, x: jax.Array, channels: int) -> jax.Array:
  """Identity, or 1x1 conv + BN when the stride or channel count changes."""
  if block.strides == 1 and x.shape[-1] == channels:
    return x
  x = block.conv(channels, (1, 1), (block.strides,) * 2, name='proj_conv')(x)
  return block.norm(name='proj_bn')(x)


class ResNet(nn.Module):
  """ResNet-`depth` feature extractor: stem, four stages, global average pool -> [B, C].

  `stem='imagenet'`: 7x7/2 conv + BN + relu + 3x3/2 max pool; `stem='cifar'`: 3x3/1 conv + BN +
  relu. `width` scales every channel count (64 * width in the first stage).
  """
  depth: int = 50
  stem: str = 'imagenet'
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.depth not in _STAGE_SIZES:
      raise ValueError(f'depth must be one of {sorted(_STAGE_SIZES)}, got {self.depth}')
    if self.stem not in ('imagenet', 'cifar'):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    block_cls = BottleneckBlock if _BOTTLENECK[self.depth] else BasicBlock
    base = max(1, round(64 * self.width))

    x = images.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(base, (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
    else:
      x = conv(base, (3, 3), padding=_pad(3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    for i, num_blocks in enumerate(_STAGE_SIZES[self.depth]):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(base * 2**i, strides, conv=conv, norm=norm, name=f'stage{i + 1}_block{j}')(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
