"""BiT: ResNet-v2 (pre-activation) with weight-standardised convs and GroupNorm (Kolesnikov et
al., "Big Transfer", ECCV 2020), the architecture of the public BiT-S/M/L checkpoints.

Not the ResNet v1.5 of `backbones/resnet.py` (post-activation, BatchNorm): the two are different
networks, and only this one loads BiT weights. Parameter names are big_vision's
(`big_vision/models/bit_paper.py`): `root_block/conv_root`, `block{1-4}/unit{01,02,..}/{gn1,
conv1, gn2, conv2, gn3, conv3, conv_proj}`, `norm-pre-head`; GroupNorm scales and biases are
[1, 1, 1, C] as published. So a big_vision BiT `.npz` loads by name (`backbones.pretrained`).
Features: the mean over space of relu(GroupNorm(last stage)), [B, 2048 * width] (pre-logits).
"""
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def standardize(x: jax.Array, axis: Sequence[int], eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over `axis` (biased variance), as BiT computes it."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


class GroupNorm(nn.Module):
  """GroupNorm over (space, channels in the group), eps 1e-5; scale/bias [1, 1, 1, C]."""
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f'GroupNorm: {c} channels do not split into {self.groups} groups')
    y = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.groups, c // self.groups))
    y = standardize(y, axis=(1, 2, 4), eps=1e-5).reshape(x.shape)
    y = y * self.param('scale', nn.initializers.ones, (1, 1, 1, c))
    return (y + self.param('bias', nn.initializers.zeros, (1, 1, 1, c))).astype(self.dtype)


class StdConv(nn.Conv):
  """Conv whose kernel is standardised over (kh, kw, in) per output channel, eps 1e-10."""

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    return standardize(value, axis=(0, 1, 2), eps=1e-10) if name == 'kernel' else value


class ResidualUnit(nn.Module):
  """Pre-activation bottleneck: GN-relu, 1x1, GN-relu, 3x3 (strided), GN-relu, 1x1 (4x nmid);
  the projection shortcut takes the first pre-activation."""
  nmid: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: StdConv(*a, use_bias=False, dtype=self.dtype, **k)
    nout = 4 * self.nmid
    residual = x
    x = nn.relu(GroupNorm(dtype=self.dtype, name='gn1')(x))
    if x.shape[-1] != nout or self.strides != 1:
      residual = conv(nout, (1, 1), (self.strides,) * 2, name='conv_proj')(x)
    x = conv(self.nmid, (1, 1), name='conv1')(x)
    x = nn.relu(GroupNorm(dtype=self.dtype, name='gn2')(x))
    x = conv(self.nmid, (3, 3), (self.strides,) * 2, padding=((1, 1), (1, 1)), name='conv2')(x)
    x = nn.relu(GroupNorm(dtype=self.dtype, name='gn3')(x))
    return conv(nout, (1, 1), name='conv3')(x) + residual


class Stage(nn.Module):
  """`units` residual units at one resolution, named unit01, unit02, ...; the first strided."""
  units: int
  nmid: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.units):
      x = ResidualUnit(self.nmid, self.strides if j == 0 else 1, self.dtype,
                       name=f'unit{j + 1:02d}')(x)
    return x


class RootBlock(nn.Module):
  """7x7/2 weight-standardised conv (padding 3), then 3x3/2 max pool (padding 1); no norm."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = StdConv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, name='conv_root')(x)
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class BiT(nn.Module):
  """BiT-R{depth}x{width} feature extractor -> pre-logits [B, 2048 * width].

  `depth`: 26 / 50 / 101 / 152 or the number of units per stage (a 4-tuple); `width`: the
  channel multiplier (64 * width in the root). Raises ValueError for another depth.
  """
  depth: Union[int, Sequence[int]] = 50
  width: float = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    del train   # no batch statistics, no dropout
    blocks = BLOCKS.get(self.depth, self.depth) if isinstance(self.depth, int) else self.depth
    if isinstance(blocks, int) or len(blocks) != 4:
      raise ValueError(f'BiT depth must be one of {sorted(BLOCKS)} or 4 unit counts, '
                       f'got {self.depth!r}')
    base = int(64 * self.width)
    x = RootBlock(base, self.dtype, name='root_block')(images.astype(self.dtype))
    for i, units in enumerate(blocks):
      x = Stage(units, base * 2**i, 2 if i > 0 else 1, self.dtype, name=f'block{i + 1}')(x)
    x = nn.relu(GroupNorm(dtype=self.dtype, name='norm-pre-head')(x))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
