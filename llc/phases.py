"""Config arguments shared by the LLC configs: which phase, how many bits, where codes come from.

  :phase=1,bits=k[,codebook_init=FILE][,backbone_from=DIR]   learn a k-bit codebook
  :phase=2,bits=k,phase1=DIR[,codebook=FILE]                  instance codes, warm-started
  :phase=2,bits=k,codebook=FILE,backbone_from=DIR             instance codes for a fixed codebook
  :det                                                        the real-valued softmax reference
  ,ood=F (any of the above)     train on a seeded 1 - F of the classes; the rest are the
                                held-out out-of-distribution classes `llc.ood` evaluates on

Phase 2 takes backbone + projection (`train.init_from=DIR`, prefixes backbone, head/projection)
and the codebook `DIR/codebook.npy` (written by `llc.evaluate`) from the phase-1 workdir, and
trains with 1/10 of the learning rate for 1/4 of the steps (the paper's 100 -> 25 epochs,
lr 0.1 -> 0.01); `codebook=FILE` replaces the codebook. `backbone_from=DIR` warm-starts the
backbone only (e.g. from a DET workdir). Files are checked when the config is built, so a
missing or mismatched phase-1 workdir stops before any training; `:runlocal` phase 2 without
phase1/codebook builds, and fails when the head is initialised.
"""
import os

import ml_collections

from configs import base
from llc import codebook_io

CONFIG_ARGS = ('phase', 'bits', 'phase1', 'codebook', 'codebook_init', 'backbone_from', 'det',
               'ood', 'runlocal')
PHASE2_LR_FACTOR = 0.1
PHASE2_STEP_FRACTION = 0.25


def paper_optimizer(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SGD as in the LLC paper, with the usual small-data settings: momentum 0.9, coupled weight
  decay 5e-4, lr 0.05 per 64 images (linear in the batch), warmup + cosine. (The paper's
  ImageNet values, momentum 0.875 and decay 2^-15, gave fewer unique codes on Caltech-101.)"""
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.learning_rate = 0.05 * c.input.batch_size / 64
  return c


def configure(c: ml_collections.ConfigDict, args: dict,
              default_bits: int) -> ml_collections.ConfigDict:
  """Sets head, codebook, warm start and held-out classes of `c` from parsed config arguments."""
  if 'ood' in args:
    base.hold_out_classes(c, float(args['ood']))
  num_classes = c.dataset.num_classes
  given = lambda key: os.path.abspath(args[key]) if args.get(key) else ''
  if 'backbone_from' in args:
    c.train.init_from = given('backbone_from')
    c.train.init_prefixes = ('backbone',)
  if 'det' in args:
    _forbid(args, ('phase', 'bits', 'phase1', 'codebook', 'codebook_init'), 'det')
    c.model.head = 'softmax'
    c.model.head_kwargs.label_smoothing = 0.1
    return c
  phase, bits = int(args.get('phase', 1)), int(args.get('bits', default_bits))
  if bits < 1:
    raise ValueError(f'bits must be >= 1, got {bits}')
  if phase == 1:
    _forbid(args, ('phase1', 'codebook'), 'phase=1')
    if given('codebook_init'):
      codebook_io.load_codebook(given('codebook_init'), num_classes, bits)
    c.model.head = 'llc_codebook'
    c.model.head_kwargs.bits = bits
    c.model.head_kwargs.label_smoothing = 0.1
    c.model.head_kwargs.codebook_init = given('codebook_init')
    return c
  if phase != 2:
    raise ValueError(f'phase must be 1 or 2, got {phase}')
  _forbid(args, ('codebook_init',), 'phase=2')
  phase1, codebook = given('phase1'), given('codebook')
  if phase1 and 'backbone_from' in args:
    raise ValueError('phase=2 takes phase1=DIR (backbone + projection) or backbone_from=DIR '
                     '(backbone only), not both')
  if phase1:
    phase1_codebook = codebook_io.check_phase1_workdir(phase1, num_classes, bits)
    codebook = codebook or phase1_codebook
    c.train.init_from = phase1
    c.train.init_prefixes = ('backbone', 'head/projection')
  elif codebook:
    codebook_io.load_codebook(codebook, num_classes, bits)
  elif 'runlocal' not in args:
    raise ValueError('phase=2 needs the phase-1 workdir: add phase1=<phase-1 workdir> (its '
                     'codebook.npy is exported by python -m llc.evaluate), or codebook=<file>')
  if codebook and phase1:
    codebook_io.load_codebook(codebook, num_classes, bits)
  c.model.head = 'llc_instance'
  c.model.head_kwargs.bits = bits
  c.model.head_kwargs.codebook = codebook
  c.optimizer.learning_rate *= PHASE2_LR_FACTOR
  c.train.num_steps = max(1, int(c.train.num_steps * PHASE2_STEP_FRACTION))
  c.train.eval_every = min(c.train.eval_every, c.train.num_steps)
  c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.num_steps)
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, c.train.num_steps // 10)
  return c


def _forbid(args: dict, keys: tuple, where: str) -> None:
  bad = [k for k in keys if k in args]
  if bad:
    raise ValueError(f'config arguments {bad} do not apply to {where}')
