"""The device mesh and the shardings derived from it."""
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def build_mesh(axes: Sequence[str], shape: Sequence[int],
               devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over `devices` (default: all devices); one entry of `shape` may be -1 (all remaining
  devices). `devices` may be a TPU topology's compile-only devices (ahead-of-time compilation)."""
  axes, shape = tuple(axes), list(shape)
  if len(axes) != len(shape):
    raise ValueError(f'mesh.axes {axes} and mesh.shape {tuple(shape)} differ in length')
  if 'data' not in axes:
    raise ValueError(f"mesh.axes must contain 'data', got {axes}")
  n = jax.device_count() if devices is None else len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f'at most one -1 in mesh.shape, got {tuple(shape)}')
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if n % rest:
      raise ValueError(f'{n} devices do not divide into mesh.shape {tuple(shape)}')
    shape[shape.index(-1)] = n // rest
  if int(np.prod(shape)) != n:
    raise ValueError(f'mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}')
  return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', the rest replicated."""
  return NamedSharding(mesh, P('data'))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes a dimension cannot use (absent from the mesh, or not dividing it)."""
  fitted = []
  for dim, name in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if name is not None and name in mesh.shape and dim % mesh.shape[name] == 0:
      fitted.append(name)
    else:
      if name is not None and name in mesh.shape and mesh.shape[name] > 1:
        logging.warning('dimension %d is not divisible by mesh axis %r (%d): replicated',
                        dim, name, mesh.shape[name])
      fitted.append(None)
  return P(*fitted)
