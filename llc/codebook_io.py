"""Codebook files: the .npy [L, k] that links phase 1 to phase 2, and its checks.

A codebook file holds real values [num_classes, bits] (phase 1 exports its real codebook C;
`llc.baseline_codebooks` writes `baselines.warm_start_values`); the class codes are its signs,
B = where(C > 0, +1, -1). Boolean files are accepted too (True = +1).
"""
import os

import numpy as np

from llc.baselines import warm_start_values

CODEBOOK_FILE = 'codebook.npy'
EXPORT_HINT = ('export it with:\n  python -m llc.evaluate --config=<the phase-1 config> '
               '--workdir=<the phase-1 workdir>')


def codebook_path(phase1_workdir: str) -> str:
  """Where `llc.evaluate` writes a phase-1 workdir's codebook."""
  return os.path.join(phase1_workdir, CODEBOOK_FILE)


def load_codebook(path: str, num_classes: int, bits: int) -> np.ndarray:
  """Reads a codebook file and checks it is [num_classes, bits] and finite (any dtype kept)."""
  if not path:
    raise ValueError('no codebook file given: an LLC phase-2 head needs the .npy [L, k] codebook '
                     'of phase 1 (config argument phase1=<phase-1 workdir>, or codebook=<file>)')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'codebook file {path} does not exist; for a phase-1 workdir, '
                            f'{EXPORT_HINT}\nor write a baseline with python -m '
                            'llc.baseline_codebooks')
  values = np.load(path)
  if values.shape != (num_classes, bits):
    raise ValueError(f'codebook {path} has shape {values.shape}, but this config needs '
                     f'[num_classes, bits] = [{num_classes}, {bits}]')
  if values.dtype != np.bool_ and not np.all(np.isfinite(values)):
    raise ValueError(f'codebook {path} holds non-finite values')
  return values


def class_codes(path: str, num_classes: int, bits: int) -> np.ndarray:
  """The +-1 float32 class codes [L, k] of a codebook file: where(C > 0, +1, -1)."""
  return np.where(load_codebook(path, num_classes, bits) > 0, 1.0, -1.0).astype(np.float32)


def init_values(path: str, num_classes: int, bits: int, seed: int = 0) -> np.ndarray:
  """Phase-1 initial codebook float32 [L, k] from a file: real values as they are, boolean
  baselines through `warm_start_values` (std sqrt(2/k), seeded magnitudes)."""
  values = load_codebook(path, num_classes, bits)
  if values.dtype == np.bool_:
    return warm_start_values(values, bits, seed)
  return values.astype(np.float32)


def check_phase1_workdir(workdir: str, num_classes: int | None = None,
                         bits: int | None = None) -> str:
  """Fails clearly unless `workdir` holds a finalised phase-1 checkpoint (unfinished step
  directories are skipped with a warning) and an exported codebook ([num_classes, bits] when
  given); returns the codebook path."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'phase-1 workdir {workdir} does not exist: train phase 1 first '
                            '(config argument phase=1), then export its codebook')
  from training.checkpointing import complete_steps  # orbax: only when a workdir is checked
  if not complete_steps(workdir):
    raise FileNotFoundError(f'phase-1 workdir {workdir} has no complete checkpoint: train phase 1 '
                            'first (or let the interrupted phase-1 run finish)')
  path = codebook_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'phase-1 workdir {workdir} has no {CODEBOOK_FILE}; {EXPORT_HINT}')
  if num_classes is not None:
    load_codebook(path, num_classes, bits)
  return path
