"""What every command-line tool of the project shares: the config defaults to the workdir's,
a user's mistake ends in one line, not a traceback, and library logs stay quiet.

Quiet: without `--verbosity` (`-v`) logging is at WARNING, so a tool prints its own
progress, eval and error lines and any warning, not the INFO lines of orbax, JAX, absl and the
project's diagnostics (mesh, memory, optimizer groups); `--verbosity=0` (`-v 0`) shows them
all, as absl's default does. Tools on argparse (`launch.prepare_data`, `launch.prepare_text`)
never start absl's logging, whose level is then WARNING as well.

  if __name__ == '__main__':
    cli.run(main)                                          # --config defaults to --workdir's
    cli.run(main, configs={'config': 'workdir', 'det_config': 'det_workdir'})
"""
import contextlib
import sys
from typing import Callable, Mapping

from absl import app, flags, logging


def user_errors() -> tuple:
  """Exceptions that mean bad input (a missing file, a config that does not fit its data, a
  workdir of another model, a NaN stop...), whose messages say what to do."""
  from configs.resolve import ConfigError
  from input_pipeline.sources import LabelError
  from training.checkpointing import IncompatibleCheckpointError
  from training.workdir import WorkdirInUseError
  return (FileNotFoundError, IncompatibleCheckpointError, WorkdirInUseError,
          FloatingPointError, LabelError, ConfigError)


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


def run(main: Callable, configs: Mapping[str, str] = {'config': 'workdir'},  # pylint: disable=dangerous-default-value
        user_errors_too: tuple = ()) -> None:
  """`app.run(main)`, quiet (module docstring); each config flag in `configs` not given on the
  command line defaults to the config saved in the workdir its value names
  (`configs.workdir.default_to_workdir`); `user_errors_too`: more exception types that are a
  user's mistake in this tool (one line, like `user_errors()`)."""
  from configs.workdir import default_to_workdir
  argv = sys.argv
  for flag, workdir_flag in configs.items():
    argv = default_to_workdir(argv, flag, workdir_flag)

  def wrapped(args):
    if not flags.FLAGS['verbosity'].present:   # app.run has just set INFO: quiet instead
      logging.set_verbosity(logging.WARNING)
    with one_line_errors(user_errors_too):
      return main(args)
  app.run(wrapped, argv=argv)
