"""A small convnet for tiny images (8x8 digits up to 32x32): three convs, two pools, Dense."""
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class ConvNet(nn.Module):
  """conv32 -> conv64 -> pool -> conv128 -> pool -> flatten -> Dense(`features`) + relu.

  Needs spatial size >= 4 (each pool halves it); the Dense is sized by the image seen at init.
  """
  features: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    del train  # no BN or dropout
    x = images.astype(self.dtype)
    x = nn.relu(nn.Conv(32, (3, 3), dtype=self.dtype, name='conv1')(x))
    x = nn.relu(nn.Conv(64, (3, 3), dtype=self.dtype, name='conv2')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(128, (3, 3), dtype=self.dtype, name='conv3')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.features, dtype=self.dtype, name='fc')(x))
    return x.astype(jnp.float32)
