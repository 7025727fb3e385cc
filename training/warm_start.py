"""Initialise parts of a fresh model from another run's checkpoint or from public pretrained
weights (`train.init_from`, `train.init_prefixes`).

`train.init_from` is either a workdir of this suite (its latest finalised checkpoint: fine-tuning,
LLC phase 2 taking backbone + projection from phase 1) or a big_vision `.npz` file (public ViT /
BiT weights, names converted by `backbones.pretrained`: position embeddings resampled to the new
image size, the file's classification head never loaded). Parameters are matched by path
('backbone/...', 'head/projection/...'); only those under the requested prefixes are taken, and
each must have the same shape as in the new model.
"""
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from backbones import pretrained
from training.checkpointing import restore_variables


def graft(target: dict, source: dict, prefixes: Sequence[str]) -> tuple[dict, list[str]]:
  """Copies `source` leaves whose path starts with one of `prefixes` into `target`.

  Returns (new target, paths taken). Fails if a prefix matches nothing or a shape differs.
  """
  flat_t = traverse_util.flatten_dict(target, sep='/')
  flat_s = traverse_util.flatten_dict(source, sep='/')
  taken = []
  for prefix in prefixes:
    matches = [p for p in flat_s if _under(p, [prefix])]
    if not matches:
      raise ValueError(f'train.init_from: nothing under {prefix!r} in the source checkpoint')
    for path in matches:
      if path not in flat_t:
        raise ValueError(f'train.init_from: {path} is not a parameter of the new model')
      if np.shape(flat_t[path]) != np.shape(flat_s[path]):
        raise ValueError(f'train.init_from: {path} has shape {np.shape(flat_s[path])} in the '
                         f'source but {np.shape(flat_t[path])} in the new model')
      flat_t[path] = flat_s[path]
      taken.append(path)
  return traverse_util.unflatten_dict(flat_t, sep='/'), taken


def load_pretrained(path: str, params: dict, prefixes: Sequence[str], backbone: Any) -> dict:
  """{'params': {'backbone': ...}, 'batch_stats': {}} from the big_vision `.npz` at `path`, for
  the backbone parameters of `params` (host arrays) under `prefixes`. Prints the file's names
  that are not loaded. Raises backbones.pretrained.CheckpointMismatchError listing every name
  the file lacks and every shape that differs."""
  target = traverse_util.flatten_dict(params.get('backbone', {}), sep='/')
  wanted = [k for k in target if _under(f'backbone/{k}', prefixes)]
  if not wanted:
    raise ValueError(f'train.init_from={path}: a big_vision checkpoint holds backbone '
                     f'parameters only, but train.init_prefixes={tuple(prefixes)} selects none')
  loaded, unused = pretrained.load_backbone(path, backbone, target, wanted)
  if unused and jax.process_index() == 0:
    print(f'Not loaded from {path} (the head stays freshly initialised): '
          f'{", ".join(unused[:8])}{", ..." if len(unused) > 8 else ""}', flush=True)
  return {'params': {'backbone': traverse_util.unflatten_dict(loaded, sep='/')},
          'batch_stats': {}}


def _under(path: str, prefixes: Sequence[str]) -> bool:
  return any(path == p or path.startswith(p + '/') for p in prefixes)


def warm_start(state: Any, source: str, prefixes: Sequence[str], backbone: Any = None) -> Any:
  """Returns (`state` with params/batch_stats under `prefixes` taken from `source`, the paths
  taken). `source`: a workdir, or a big_vision `.npz` (then `backbone`, the model's backbone
  module, picks the name map; see `load_pretrained`)."""
  if source.endswith('.npz'):
    source = load_pretrained(source, jax.device_get(state.params), prefixes, backbone)
  else:   # host arrays of the saved shapes: the source may be another model
    source, _ = restore_variables(source, hint='train that run first (train.init_from)')
  params, taken = graft(jax.device_get(state.params), source['params'], prefixes)
  stats_prefixes = [p for p in prefixes if any(
      _under(k, [p]) for k in traverse_util.flatten_dict(source['batch_stats'], sep='/'))]
  batch_stats = state.batch_stats
  if stats_prefixes:
    batch_stats, _ = graft(jax.device_get(state.batch_stats), source['batch_stats'],
                           stats_prefixes)
  place = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)
  return state.replace(params=jax.tree.map(place, params, state.params),
                       batch_stats=jax.tree.map(place, batch_stats, state.batch_stats)), taken
