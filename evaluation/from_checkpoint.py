"""Eval mode: restore a checkpoint onto the current mesh and evaluate the eval split."""
import os
from typing import Optional

import ml_collections

from evaluation.evaluator import evaluate, make_eval_step
from evaluation.report import write_eval_report
from training.checkpointing import (Checkpointer, NoCheckpointError, check_signature,
                                    checkpoint_dir)
from training.experiment import Experiment


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: Optional[int] = None) -> tuple[Experiment, dict, int]:
  """(experiment, {'params', 'batch_stats'} on the current mesh, step) of the latest (or
  given) finalised checkpoint in `workdir`; the optimizer state is never read. Raises
  NoCheckpointError (a FileNotFoundError) when there is none, or not that step."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise NoCheckpointError(f'no checkpoints in {workdir}: train first with --mode=train')
  ckpt = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
  step = ckpt.pick_step(step, hint='train first with --mode=train')
  exp = Experiment.build(config)
  check_signature(workdir, exp.abstract_state.params)
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
