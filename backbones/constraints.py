"""Activation sharding constraints a model applies inside `jax.jit` (MaxText / big_vision keep the
batch of every layer's activations on the data axes, so that XLA's sharding propagation does not
follow FSDP-sharded weights into replicating the batch)."""
import math
from typing import Optional

import jax


def constrain_batch(x: jax.Array, sharding: Optional[jax.sharding.NamedSharding]) -> jax.Array:
  """`x` constrained to `sharding` (its leading, batch, dimension split over the sharding's first
  entry); unchanged when `sharding` is None or that split does not divide the batch (a few
  images applied outside the train step)."""
  if sharding is None:
    return x
  entry = sharding.spec[0] if len(sharding.spec) else None
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  if x.shape[0] % math.prod(sharding.mesh.shape[n] for n in names):
    return x
  return jax.lax.with_sharding_constraint(x, sharding)
