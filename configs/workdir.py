r"""The config a workdir was trained with: its `config.json`, as a config file.

  python -m launch.main --mode=eval --workdir=W                      # uses W/config.json
  python -m llc.evaluate --workdir=W
  python -m launch.main --mode=eval --config=configs/workdir.py:W --workdir=W \
      --config.eval.max_examples=500                                 # overrides apply as usual

Read-only tools (`--mode=eval`, `llc.evaluate`, `llc.ood`, `llc.taxonomy`,
`evaluation.reference_probs`, ...) given no `--config` use this one (`default_to_workdir`),
so nothing given at training time has to be repeated. The saved config is already resolved
(`configs.resolve`): its data facts and derived values are what the run used.
"""
import json
import os
import sys
from typing import Sequence

import ml_collections

CONFIG_FILE = 'config.json'


def _tuples(value):
  """JSON lists back to the tuples configs use (mesh.shape, mean, classes, lr_mults, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config saved in workdir `arg` (its config.json)."""
  if not arg:
    raise ValueError('configs/workdir.py needs the workdir: --config=configs/workdir.py:WORKDIR')
  path = os.path.join(arg, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: {arg} was never trained (no saved config); '
                            'give the training config with --config=...')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
    if a == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def default_to_workdir(argv: Sequence[str], flag: str = 'config',
                       workdir_flag: str = 'workdir') -> list[str]:
  """`argv` with `--FLAG=configs/workdir.py:WORKDIR` added when it names a workdir but no
  `--FLAG` (the config of a read-only tool defaults to the one the workdir was trained with).
  `--FLAG.a.b=v` overrides then apply to the saved config."""
  argv = list(argv)
  workdir = _flag_value(argv, workdir_flag)
  if workdir and _flag_value(argv, flag) is None:
    argv.insert(1, f'--{flag}={os.path.abspath(__file__)}:{workdir}')
    print(f'--{flag} not given: using {os.path.join(workdir, CONFIG_FILE)}', file=sys.stderr)
  return argv
