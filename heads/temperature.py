"""A temperature learnt on the training loss, kept inside fixed bounds."""
from typing import Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from heads.base import METRICS


class BoundedTemperature(nn.Module):
  """tau = lower + (upper - lower) * sigmoid(p), with p a scalar initialised to 0.

  So tau starts at the midpoint of the bounds and can never leave them. The parameter name
  `pre_sigmoid_temperature` matches edward2's heteroscedastic layers.
  """
  bounds: Tuple[float, float] = (0.3, 3.0)

  @nn.compact
  def __call__(self) -> jax.Array:
    lower, upper = self.bounds
    if not 0 < lower < upper:
      raise ValueError(f'temperature bounds must satisfy 0 < lower < upper, got {self.bounds}')
    p = self.param('pre_sigmoid_temperature', nn.initializers.zeros, (), jnp.float32)
    tau = lower + (upper - lower) * jax.nn.sigmoid(p)
    self.sow(METRICS, 'temperature', tau)
    return tau
