r"""What `launch.main` runs: one config, or a config of several runs compared side by side.

A config with a `runs` field ({name: config}, e.g. `configs/quickstart.py:compare`) trains or
evaluates each run in `<workdir>/<name>`, one after the other, each exactly as it would run
alone (its own checkpoints, config.json, eval_results.json, resume), and ends with one table
of their eval results (`evaluation.report.side_by_side`). The config of several runs is saved
as `<workdir>/config.json`, so `--mode=eval --workdir=W` evaluates them all again.

  python -m launch.main --config=configs/quickstart.py:compare --workdir=/tmp/quickstart
  python -m launch.main --mode=eval --workdir=/tmp/quickstart
"""
import copy
import json
import os
from typing import Callable, Optional

import ml_collections

from evaluation.from_checkpoint import evaluate_checkpoint
from evaluation.report import side_by_side
from launch.train import train_and_evaluate
from training.workdir import CONFIG_FILE, save_config

ConfigDict = ml_collections.ConfigDict


def train(config: ConfigDict, workdir: str) -> dict:
  """Trains and evaluates `config` in `workdir` (`launch.train.train_and_evaluate`), or each
  of its `runs`; returns the final eval record, or {name: record} of the runs."""
  if 'runs' not in config:
    return train_and_evaluate(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  given = copy.deepcopy(config)    # the runs resolve their parts in place: save what was given
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    save_config(workdir, given)    # a new workdir: nothing to keep
  results = _each(config, workdir, train_and_evaluate)
  save_config(workdir, given)      # once the runs passed their checks: a refused one changes none
  return results


def evaluate(config: ConfigDict, workdir: str, step: Optional[int] = None) -> dict:
  """Evaluates the latest (or `step`'s) checkpoint of `workdir`, or of each of its runs,
  printing each eval record as a JSON line; returns it, or {name: record} of the runs."""
  def one(c: ConfigDict, w: str) -> dict:
    record = evaluate_checkpoint(c, w, step)
    print(json.dumps(record), flush=True)
    return record
  return _each(config, workdir, one) if 'runs' in config else one(config, workdir)


def _each(config: ConfigDict, workdir: str, run: Callable[[ConfigDict, str], dict]) -> dict:
  """`run(config.runs[name], <workdir>/<name>)` in order, then the side-by-side table. A run
  that ends without results (preempted: saved, re-run to resume) stops the rest."""
  results = {}
  for name, run_config in config.runs.items():
    print(f'{name}: {os.path.join(workdir, name)}', flush=True)
    results[name] = run(run_config, os.path.join(workdir, name))
    if not results[name]:
      return results
  classes = {c.dataset.num_classes for c in config.runs.values()}   # resolved by the runs
  print(side_by_side(results, num_classes=classes.pop() if len(classes) == 1 else 0), flush=True)
  return results
