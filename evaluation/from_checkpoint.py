"""Eval mode: restore a checkpoint onto the current mesh and evaluate the eval split."""
from typing import Optional

import ml_collections

from evaluation.evaluator import evaluate, make_eval_step
from evaluation.report import write_eval_report
from training.checkpointing import disk_full_is_one_line, restore_variables
from training.experiment import Experiment


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: Optional[int] = None) -> tuple[Experiment, dict, int]:
  """(experiment, {'params', 'batch_stats'} on the current mesh, step) of the latest (or
  given) finalised checkpoint in `workdir` (`training.checkpointing.restore_variables`); the
  optimizer state is never read. Raises NoCheckpointError (a FileNotFoundError) when there is
  none, or not that step."""
  exp = Experiment.build(config)
  exp.match_classes(workdir)   # ClassListError, or relabelled when only the order differs
  variables, step = restore_variables(workdir, exp.abstract_restore_target(), step,
                                      hint='train first with --mode=train',
                                      layout=exp.class_layout)
  return exp, variables, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: Optional[int] = None) -> dict:
  """Evaluates the latest (or the given) checkpoint in `workdir`; returns the eval record."""
  exp, variables, step = restore_checkpoint(config, workdir, step)
  eval_step = make_eval_step(exp.model, exp.mesh, exp.shardings, config.eval)
  metrics, bins = evaluate(eval_step, variables['params'], variables['batch_stats'],
                           exp.eval_dataset())
  with disk_full_is_one_line(workdir):   # eval_results.json, the reliability diagram
    return write_eval_report(workdir, step, metrics, bins)
