"""What every command-line tool of the project shares (`launch.main` and the libraries' own
entry points such as `python -m evaluation.ood`; it sits in `training` so that no library
imports `launch`): the config defaults to the workdir's, a user's mistake ends in one line,
not a traceback, and library logs stay quiet.

Quiet: without `--verbosity` (`-v`) logging is at WARNING, so a tool prints its own
progress, eval and error lines and any warning, not the INFO lines of orbax, JAX, absl and the
project's diagnostics (mesh, memory, optimizer groups); `--verbosity=0` (`-v 0`) shows them
all, as absl's default does. Two orbax warnings about what the project does on purpose are
dropped at any verbosity (`ExpectedOrbaxWarnings`). Tools on argparse (`launch.prepare_data`,
`launch.prepare_text`) never start absl's logging, whose level is then WARNING as well.

  if __name__ == '__main__':
    cli.run(main)                                          # --config defaults to --workdir's
    cli.run(main, configs={'config': 'workdir', 'det_config': 'det_workdir'})
"""
import contextlib
import logging as logging_std
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app, flags, logging


class ExpectedOrbaxWarnings(logging_std.Filter):
  """Drops orbax's warnings about what this project does on purpose, nothing else: 'Given
  directory is read only' (eval, warm starts and `--mode=eval` open checkpoints read-only)
  and 'Item "data" was found in the checkpoint, but could not be restored' (item 'data' is
  the grain iterator's position: only resuming a run reads it; evaluating a checkpoint or
  warm-starting from it, as LLC phase 2 does from phase 1, reads the model alone). Also the
  tracebacks orbax's save threads log for a full disk: the run reports it as its one error
  line (`training.checkpointing.disk_full_is_one_line`)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    msg = str(record.msg)
    if any('No space left on device' in str(text) for text in (
        msg, record.args, record.exc_info and record.exc_info[1])):
      return False
    if msg.startswith('Given directory is read only'):
      return False
    return not (msg.startswith('Item "%s" was found in the checkpoint, but could not')
                and record.args and record.args[0] == 'data')


def quiet_expected_warnings() -> None:
  """Installs `ExpectedOrbaxWarnings` on absl's logger (orbax logs through it), once."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, ExpectedOrbaxWarnings) for f in logger.filters):
    logger.addFilter(ExpectedOrbaxWarnings())


def user_errors() -> tuple:
  """Exceptions that mean bad input (a missing file, a config that does not fit its data, a
  workdir of another model, a NaN stop...), whose messages say what to do."""
  from training.resolve import ConfigError
  from input_pipeline.sources import EmptySplitError, LabelError, ShardReadError
  from training.checkpointing import (DamagedCheckpointError, DiskFullError,
                                      IncompatibleCheckpointError)
  from training.workdir import ClassListError, WorkdirInUseError
  return (FileNotFoundError, IncompatibleCheckpointError, DamagedCheckpointError,
          WorkdirInUseError, FloatingPointError, LabelError, EmptySplitError, ConfigError,
          ClassListError, DiskFullError, ShardReadError)


# The config file that loads a workdir's saved config, named by path (no library imports a config).
WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'workdir.py')


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
    argv.insert(1, f'--{flag}={WORKDIR_CONFIG}:{workdir}')
    print(f'--{flag} not given: using {os.path.join(workdir, "config.json")}', file=sys.stderr)
  return argv


@contextlib.contextmanager
def one_line_errors(also: tuple = ()):
  """Turns `user_errors()` (and the exception types in `also`) into `error: <message>` on
  stderr and exit status 1."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections defers a config file's load error to the first use of the config.
    deferred = isinstance(e, OSError) and str(e).startswith('Configuration is not available')
    if not (deferred or isinstance(e, user_errors() + tuple(also))):
      raise
    sys.exit(f'error: {e}')


def take_kwargs_overrides(argv: Sequence[str], config_flags: Sequence[str]
                          ) -> tuple[list[str], list[tuple[str, str, str, str]]]:
  """(`argv` without its overrides of a `*_kwargs` dict entry, those overrides as (flag, path
  of the dict, key, value)): `--config.model.backbone_kwargs.width=16` and
  `--config.model.backbone_kwargs.width 16`. A locked config rejects a key its dict lacks
  (ml_collections: an AttributeError traceback), yet a recipe's kwargs hold only what it
  changes (the convnet's none), so these are applied after parsing (`set_kwargs_overrides`)
  and checked against the module by `training.resolve` (ConfigError naming the field)."""
  pattern = re.compile(r'--(%s)\.((?:\w+\.)*\w+_kwargs)\.(\w+)(?:=(.*))?$'
                       % '|'.join(map(re.escape, config_flags)))
  kept, taken, args = [], [], list(argv)
  while args:
    arg = args.pop(0)
    m = pattern.match(arg)
    if not m:
      kept.append(arg)
      continue
    value = m.group(4)
    if value is None:
      if not args:
        raise SystemExit(f'error: {arg} needs a value')
      value = args.pop(0)
    taken.append((m.group(1), m.group(2), m.group(3), value))
  return kept, taken


def set_kwargs_overrides(overrides: Sequence[tuple[str, str, str, str]],
                         configs: Mapping[str, Any]) -> None:
  """Sets each (flag, path, key, value) of `take_kwargs_overrides` in `configs[flag]` (the
  parsed, locked config): the value as a Python literal (else the string); ConfigError when
  the field's type differs."""
  import ast
  from training.resolve import ConfigError
  for flag, path, key, text in overrides:
    holder = configs[flag]
    for part in path.split('.'):
      holder = holder[part]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      with holder.unlocked():
        holder[key] = value
    except TypeError as e:
      raise ConfigError(f'--{flag}.{path}.{key}={text}: {e}') from None


def run(main: Callable, configs: Mapping[str, str] = {'config': 'workdir'},  # pylint: disable=dangerous-default-value
        user_errors_too: tuple = ()) -> None:
  """`app.run(main)`, quiet (module docstring); each config flag in `configs` not given on the
  command line defaults to the config saved in the workdir its value names
  (`default_to_workdir`; a value None: no workdir default); `*_kwargs` entries may be set whether or not the recipe has them
  (`take_kwargs_overrides`); `user_errors_too`: more exception types that are a user's mistake
  in this tool (one line, like `user_errors()`)."""
  argv = sys.argv
  for flag, workdir_flag in configs.items():
    if workdir_flag:
      argv = default_to_workdir(argv, flag, workdir_flag)
  argv, kwargs_overrides = take_kwargs_overrides(argv, list(configs))
  sys.argv = argv   # ml_collections reads the overrides from sys.argv itself

  def wrapped(args):
    if not flags.FLAGS['verbosity'].present:   # app.run has just set INFO: quiet instead
      logging.set_verbosity(logging.WARNING)
    quiet_expected_warnings()
    with one_line_errors(user_errors_too):
      set_kwargs_overrides(kwargs_overrides, {f: flags.FLAGS[f].value for f in configs})
      return main(args)
  app.run(wrapped, argv=argv)
