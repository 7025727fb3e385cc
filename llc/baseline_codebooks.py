r"""Baseline codebooks as .npy files of real warm-start values [L, k] (signs = the codes).

  python -m llc.baseline_codebooks --kind=random --bits=10 --num_classes=101 --out=rand10.npy
  python -m llc.baseline_codebooks --kind=svd --bits=10 --det_workdir=DET --out=svd10.npy
  python -m llc.baseline_codebooks --kind=cca --bits=10 --det_workdir=DET \
      --config=configs/llc_caltech101.py:det --out=cca10.npy

random: sign of seeded N(0, 1) draws (`--seed`). svd: from a trained DET workdir's head kernel
[D, K], W = kernel^T [K, D] = U S V^T, codes sign(U[:, :k]). cca: top-k label-side canonical
directions between the DET backbone's pooled features of the training split (eval
preprocessing, no augmentation; `--max_examples` to subsample) and one-hot labels; `--config`
is the DET run's config. Values go through `baselines.warm_start_values` (std sqrt(2/k)), so a
file serves both as a fixed phase-2 codebook (`codebook=FILE`) and as a phase-1 warm start
(`codebook_init=FILE`). Prints one JSON line: kind, bits, num_classes, unique_codes, out.
"""
import json
import os
from typing import Optional

import ml_collections
import numpy as np

from llc import baselines, codes

KINDS = ('random', 'svd', 'cca')


def det_kernel(det_workdir: str) -> np.ndarray:
  """The DET head's kernel [D, K] from the latest checkpoint of `det_workdir`."""
  from training.checkpointing import restore_variables
  variables, _ = restore_variables(det_workdir, hint='train the DET run first (--det_workdir)')
  params = variables['params']
  try:
    return np.asarray(params['head']['loc_layer']['kernel'])
  except KeyError:
    raise ValueError(f'{det_workdir} has no head/loc_layer/kernel: svd needs a workdir trained '
                     'with the softmax (DET) head, e.g. the `:det` variant of an LLC config') \
        from None


def random_values(num_classes: int, bits: int, seed: int = 0) -> np.ndarray:
  return baselines.warm_start_values(baselines.random_codebook(num_classes, bits, seed), bits,
                                     seed)


def svd_values(det_workdir: str, bits: int) -> np.ndarray:
  return baselines.warm_start_values(baselines.svd_directions(det_kernel(det_workdir).T, bits),
                                     bits)


def train_features(config: ml_collections.ConfigDict, det_workdir: str,
                   max_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Pooled backbone features [N, D] and labels [N] of the training split (eval preprocessing,
  its first `max_examples` when > 0), from `det_workdir`'s checkpoint restored onto the mesh
  (`evaluation.collect.collect`)."""
  from evaluation.collect import collect
  from evaluation.from_checkpoint import restore_checkpoint
  from input_pipeline.sources import Subset, build_source
  source, _ = build_source(config.dataset, config.dataset.train_split, config.seed, train=False)
  if max_examples:
    source = Subset(source, min(max_examples, len(source)))
  exp, variables, _ = restore_checkpoint(config, det_workdir)
  out = collect(exp, variables, lambda m, x: {'features': m.features(x, train=False)}, source)
  return out['features'], out['label']


def cca_values(config: ml_collections.ConfigDict, det_workdir: str, bits: int,
               max_examples: int = 0) -> np.ndarray:
  feats, labels = train_features(config, det_workdir, max_examples)
  directions = baselines.cca_directions(feats, labels, config.dataset.num_classes, bits)
  return baselines.warm_start_values(directions, bits)


def build(kind: str, bits: int, *, num_classes: Optional[int] = None, seed: int = 0,
          det_workdir: str = '', config: Optional[ml_collections.ConfigDict] = None,
          max_examples: int = 0) -> np.ndarray:
  """Real warm-start values [L, k] of a `kind` baseline codebook."""
  if kind == 'random':
    num_classes = num_classes or (config.dataset.num_classes if config else None)
    if not num_classes:
      raise ValueError('random needs --num_classes (or --config)')
    return random_values(num_classes, bits, seed)
  if not det_workdir:
    raise ValueError(f'{kind} needs --det_workdir, a workdir trained with the softmax head')
  if kind == 'svd':
    return svd_values(det_workdir, bits)
  if kind == 'cca':
    if config is None:
      raise ValueError('cca needs --config, the config the DET workdir was trained with')
    return cca_values(config, det_workdir, bits, max_examples)
  raise ValueError(f'unknown kind {kind!r}; use one of {KINDS}')


def write(values: np.ndarray, out: str) -> dict:
  """Saves `values` to `out`; returns a summary."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.save(out, values.astype(np.float32))
  return {'num_classes': int(values.shape[0]), 'bits': int(values.shape[1]),
          'unique_codes': codes.unique_codes(values > 0), 'out': os.path.abspath(out)}


def main(argv) -> None:
  del argv
  from training.resolve import resolve
  config = _CONFIG.value and resolve(_CONFIG.value)
  values = build(_KIND.value, _BITS.value, num_classes=_NUM_CLASSES.value, seed=_SEED.value,
                 det_workdir=_DET.value, config=config, max_examples=_MAX.value)
  print(json.dumps({'kind': _KIND.value, **write(values, _OUT.value)}), flush=True)


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  _KIND = flags.DEFINE_enum('kind', None, list(KINDS), 'baseline codebook')
  _BITS = flags.DEFINE_integer('bits', None, 'code length k')
  _OUT = flags.DEFINE_string('out', None, '.npy file to write')
  _DET = flags.DEFINE_string('det_workdir', '', 'svd / cca: a workdir trained with the DET head')
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'cca: the DET workdir\'s config')
  _NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'random: number of classes')
  _SEED = flags.DEFINE_integer('seed', 0, 'random: generator seed')
  _MAX = flags.DEFINE_integer('max_examples', 0, 'cca: training examples used (0 = all)')
  flags.mark_flags_as_required(['kind', 'bits', 'out'])
  from training import cli   # cca: --config defaults to the DET workdir's config.json
  cli.run(main, {'config': 'det_workdir'})
