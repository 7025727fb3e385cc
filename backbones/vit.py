"""Vision Transformer: patch embedding, learnt position embeddings, pre-LN encoder, final LN."""
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from backbones.constraints import constrain_batch

# variant -> (width, depth, num_heads, mlp_dim), as in Dosovitskiy et al. / DeiT; H, g (1.0 B
# parameters at /14) and G (1.8 B) as big_vision's `vit.decode_variant` (Zhai et al. 2022,
# "Scaling Vision Transformers").
VARIANTS = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
    'g': (1408, 40, 16, 6144),
    'G': (1664, 48, 16, 8192),
}

_dense_kernel = nn.initializers.xavier_uniform()
_dense_bias = nn.initializers.normal(stddev=1e-6)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(back to the input width), with dropout after each."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_dense_kernel,
                 bias_init=_dense_bias, name='fc1')(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(x, approximate=False))
    x = nn.Dense(width, dtype=self.dtype, kernel_init=_dense_kernel,
                 bias_init=_dense_bias, name='fc2')(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  activation_sharding: Any = None   # see ViT

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = constrain_batch(x, self.activation_sharding)
    y = nn.LayerNorm(dtype=self.dtype, name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=_dense_kernel, name='attn')(
                                            y, deterministic=True)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name='ln2')(x)
    return x + MlpBlock(self.mlp_dim, self.dropout, self.dtype, name='mlp')(y, train=train)


class _ScannedBlock(EncoderBlock):
  """EncoderBlock with the (carry, output) signature `nn.scan` needs; `train` is broadcast."""

  def __call__(self, x: jax.Array, train: bool):  # pytype: disable=signature-mismatch
    return super().__call__(x, train=train), None


class ViT(nn.Module):
  """ViT feature extractor -> [B, width]: the class token (`pool='token'`) or token mean ('gap').

  Defaults are ViT-B/16; `VARIANTS` holds the other sizes. Position embeddings are sized at init
  by the image size seen then. `scan=True` runs the encoder blocks as one `nn.scan` (parameters
  stacked on a leading [depth] axis under `blocks`, as big_vision's `scan=True` ViT does), so XLA
  compiles one block instead of `depth` copies: compile time and program size stop growing with
  depth (a pod-sized ViT-L/32 compiles in minutes). Same function as `scan=False` given the same
  per-block weights; the parameter tree differs (`blocks/...` [depth, ...] vs `block{i}/...`).
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  pool: str = 'token'
  dropout: float = 0.0
  dtype: Any = jnp.float32
  scan: bool = False
  # Rematerialise each encoder block in the backward pass (`nn.remat`, big_vision's
  # `remat_policy`): activations of one block instead of `depth` are kept, for ViT-g / G
  remat: bool = False
  # A NamedSharding of the batch (set by `training.model.build_model` from the mesh): every
  # block's input keeps its batch there (`backbones.constraints`), so FSDP-sharded weights
  # never lead XLA to replicate the batch. None: no constraint.
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.pool not in ('token', 'gap'):
      raise ValueError(f"pool must be 'token' or 'gap', got {self.pool!r}")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), (p, p), padding='VALID', dtype=self.dtype,
                name='patch_embed')(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos.astype(x.dtype))
    if self.scan:
      block = nn.remat(_ScannedBlock, static_argnums=(2,)) if self.remat else _ScannedBlock
      blocks = nn.scan(block, variable_axes={'params': 0},
                       split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
                       length=self.depth)
      x, _ = blocks(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                    self.activation_sharding, name='blocks')(x, train)
    else:
      # the same parameters as EncoderBlock; `train` positional, static under remat
      block = nn.remat(_ScannedBlock, static_argnums=(2,)) if self.remat else _ScannedBlock
      for i in range(self.depth):
        x, _ = block(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                     self.activation_sharding, name=f'block{i}')(x, train)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_final')(x)
    x = x[:, 0] if self.pool == 'token' else jnp.mean(x, axis=1)
    return x.astype(jnp.float32)
