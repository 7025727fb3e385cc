"""The LLC configs' phase wiring: which phase, how many bits, where codes come from.

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
backbone only (e.g. from a DET workdir). `bits` defaults to ceil(2 log2 K) of the data's K.
The phase-1 workdir is checked when the config is built (it exists, holds a finished
checkpoint and its exported codebook.npy); the codebook's shape [K, bits] is checked when the
config is resolved (`training.resolve`, after `--config.*` overrides), so a missing or
mismatched phase-1 workdir stops before any training; `:runlocal` phase 2 without
phase1/codebook builds, and fails when the head is initialised.
"""
import math
import os
from typing import Mapping

import ml_collections

from configs import base
from llc import codebook_io

# The config arguments (`base.parse_arg(arg, **ARGS)`); None: not given.
ARGS = dict(phase=(None, int), bits=(None, int), phase1=(None, str), codebook=(None, str),
            codebook_init=(None, str), backbone_from=(None, str), det=False,
            ood=(None, float), runlocal=False)
PHASE2_LR_FACTOR = 0.1
PHASE2_STEP_FRACTION = 0.25


def paper_optimizer(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SGD as in the LLC paper, with the usual small-data settings: momentum 0.9, coupled weight
  decay 5e-4, lr 0.05 per 64 images (linear in the batch), warmup + cosine. (The paper's
  ImageNet values, momentum 0.875 and decay 2^-15, gave fewer unique codes on Caltech-101.)"""
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.learning_rate = 0.05
  c.optimizer.lr_batch_size = 64   # scaled to the final input.batch_size by training.resolve
  return c


def configure(c: ml_collections.ConfigDict, args: Mapping,
              default_bits: int = 0) -> ml_collections.ConfigDict:
  """Sets head, codebook, warm start and held-out classes of `c` from typed config arguments
  (`ARGS`; a key missing or None is not given). Nothing here depends on the class count:
  bits = `default_bits` (0: ceil(2 log2 K)) and the codebook checks are resolved after
  overrides (`llc.heads.default_bits`, `training.resolve`). Raises ValueError for arguments
  that do not go together."""
  args = {k: v for k, v in args.items() if v is not None and v is not False}
  if 'ood' in args:
    base.hold_out_classes(c, args['ood'])
  given = lambda key: os.path.abspath(args[key]) if args.get(key) else ''
  if 'backbone_from' in args:
    c.train.init_from = given('backbone_from')
    c.train.init_prefixes = ('backbone',)
  if 'det' in args:
    _forbid(args, ('phase', 'bits', 'phase1', 'codebook', 'codebook_init'), 'det')
    c.model.head = 'softmax'
    c.model.head_kwargs.label_smoothing = 0.1
    return c
  phase, bits = args.get('phase', 1), args.get('bits', default_bits)
  if bits < 0 or 'bits' in args and bits == 0:
    raise ValueError(f'bits must be >= 1, got {bits} (leave it out for ceil(2 log2 K))')
  if phase == 1:
    _forbid(args, ('phase1', 'codebook'), 'phase=1')
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
    codebook = codebook or codebook_io.check_phase1_workdir(phase1)
    c.train.init_from = phase1
    c.train.init_prefixes = ('backbone', 'head/projection')
  elif not codebook and 'runlocal' not in args:
    raise ValueError('phase=2 needs the phase-1 workdir: add phase1=<phase-1 workdir> (its '
                     'codebook.npy is exported by python -m llc.evaluate), or codebook=<file>')
  c.model.head = 'llc_instance'
  c.model.head_kwargs.bits = bits
  c.model.head_kwargs.codebook = codebook
  c.optimizer.learning_rate *= PHASE2_LR_FACTOR
  t, o = c.train, c.optimizer
  if t.num_steps:
    t.num_steps = max(1, int(t.num_steps * PHASE2_STEP_FRACTION))
    t.eval_every = min(t.eval_every, t.num_steps)
    t.checkpoint_every = min(t.checkpoint_every, t.num_steps)
    o.warmup_steps = min(o.warmup_steps, t.num_steps // 10)
  else:   # counted in epochs: the same fractions, resolved against the data
    t.epochs *= PHASE2_STEP_FRACTION
    t.eval_every_epochs = min(t.eval_every_epochs, t.epochs)
    t.checkpoint_every_epochs = min(t.checkpoint_every_epochs, t.epochs)
    if o.warmup_steps or o.warmup_epochs:   # at most a tenth of the run (the smaller counts)
      o.warmup_epochs = min(o.warmup_epochs or math.inf, t.epochs / 10)
  return c


def _forbid(args: dict, keys: tuple, where: str) -> None:
  bad = [k for k in keys if k in args]
  if bad:
    raise ValueError(f'config arguments {bad} do not apply to {where}')
