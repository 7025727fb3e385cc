"""Eval mode: restore a checkpoint onto the current mesh and evaluate the eval split."""
import os
from typing import Optional

import ml_collections

from evaluation.evaluator import evaluate, make_eval_step
from evaluation.report import write_eval_report
from training.checkpointing import Checkpointer, check_signature, checkpoint_dir
from training.experiment import Experiment


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: Optional[int] = None) -> tuple[Experiment, dict, int]:
  """(experiment, {'params', 'batch_stats'} on the current mesh, step) of the latest (or
  given) checkpoint in `workdir`; the optimizer state is never read."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f'no checkpoints in {workdir}: train first with --mode=train')
  exp = Experiment.build(config)
  check_signature(workdir, exp.abstract_state.params)
  ckpt = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {checkpoint_dir(workdir)}')
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f'no checkpoint for step {step} in {workdir}; available: {sorted(steps)}')
  variables = ckpt.restore_variables(step, exp.abstract_restore_target())
  ckpt.close()
  return exp, variables, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: Optional[int] = None) -> dict:
  """Evaluates the latest (or the given) checkpoint in `workdir`; returns the eval record."""
  exp, variables, step = restore_checkpoint(config, workdir, step)
  eval_step = make_eval_step(exp.model, exp.mesh, exp.shardings)
  metrics, bins = evaluate(eval_step, variables['params'], variables['batch_stats'],
                           exp.eval_dataset(), exp.mesh, config.eval.num_bins)
  return write_eval_report(workdir, step, metrics, bins)
