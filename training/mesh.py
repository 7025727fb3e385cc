"""The device mesh and the shardings derived from it."""
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def _fill(shape: list, n: int, what: str) -> list:
  """`shape` with its one -1 (if any) replaced so the product is `n`."""
  if shape.count(-1) > 1:
    raise ValueError(f'at most one -1 in {what}, got {tuple(shape)}')
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if n % rest:
      raise ValueError(f'{n} devices do not divide into {what} {tuple(shape)}')
    shape[shape.index(-1)] = n // rest
  if int(np.prod(shape)) != n:
    raise ValueError(f'{what} {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}')
  return shape


def build_mesh(axes: Sequence[str], shape: Sequence[int],
               devices: Optional[Sequence[jax.Device]] = None,
               dcn_shape: Sequence[int] = ()) -> Mesh:
  """A mesh over `devices` (default: all devices); one entry of `shape` may be -1 (all remaining
  devices). `devices` may be a TPU topology's compile-only devices (ahead-of-time compilation).

  Multi-slice pods (`dcn_shape`, one entry per axis, e.g. (2, 1, 1) for two slices on the first
  axis): `shape` is then the mesh within one slice (over its ICI links) and the mesh is
  JAX's hybrid device mesh (`mesh_utils.create_hybrid_device_mesh`), each axis `shape[i] *
  dcn_shape[i]` long, slices laid out along the axes `dcn_shape` names (over DCN). With an
  axis 'replica' over the slices and FSDP rules (`training.sharding`), parameters are
  replicated across slices and sharded within them (HSDP). Raises ValueError naming the
  shapes when they do not fit the devices.
  """
  axes, shape = tuple(axes), list(shape)
  if len(axes) != len(shape):
    raise ValueError(f'mesh.axes {axes} and mesh.shape {tuple(shape)} differ in length')
  if 'data' not in axes:
    raise ValueError(f"mesh.axes must contain 'data', got {axes}")
  n = jax.device_count() if devices is None else len(devices)
  if dcn_shape and int(np.prod(dcn_shape)) > 1:
    dcn_shape = list(dcn_shape)
    if len(dcn_shape) != len(axes) or -1 in dcn_shape:
      raise ValueError(f'mesh.dcn_shape {tuple(dcn_shape)} needs one positive entry per axis '
                       f'of {axes}')
    slices = int(np.prod(dcn_shape))
    if n % slices:
      raise ValueError(f'{n} devices do not split into mesh.dcn_shape {tuple(dcn_shape)} '
                       f'({slices} slices)')
    shape = _fill(shape, n // slices, 'mesh.shape (per slice)')
    grid = mesh_utils.create_hybrid_device_mesh(
        shape, dcn_shape, jax.devices() if devices is None else devices)
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))
  shape = _fill(shape, n, 'mesh.shape')
  try:
    return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes),
                         devices=devices)
  except NotImplementedError as e:   # a TPU torus the logical shape cannot be laid on
    raise ValueError(f'mesh.shape {tuple(shape)} does not lie on the devices\' physical '
                     f'topology ({str(e).split(". ")[0]}); each axis must be a product of '
                     'physical axis sizes') from None


def batch_axes(mesh: Mesh) -> tuple:
  """The axes a batch is split over: every axis of the mesh, so no device repeats another's
  work (a (data, model) mesh splits the backbone's batch over all data x model devices)."""
  return tuple(mesh.axis_names)


def batch_size_multiple(mesh: Mesh) -> int:
  """What every global batch size must be a multiple of: the devices the batch splits over."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis (`batch_axes`), the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def feature_sharding(mesh: Mesh) -> NamedSharding:
  """The pre-logits [B, D] as the head reads them: the batch over every axis but 'model', so
  the head's [B, K] logits split their classes over 'model' and their batch over the rest
  (big_vision / MaxText's activation constraint before the output layer)."""
  return NamedSharding(mesh, P(tuple(a for a in batch_axes(mesh) if a != 'model') or None))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops the mesh axes a dimension cannot use (absent from the mesh, or not dividing it); an
  entry may name one axis or a tuple of them."""
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = int(np.prod([mesh.shape.get(n, 0) for n in names]))
    if names and size and dim % size == 0:
      fitted.append(entry)
    else:
      if names and size > 1:
        logging.warning('dimension %d is not divisible by mesh axes %r (%d): replicated',
                        dim, entry, size)
      fitted.append(None)
  return P(*fitted)
