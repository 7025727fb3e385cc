"""The command-line tools' shared behaviour (training/cli.py): orbax's warnings about what
the project does on purpose are dropped, and only those."""
import logging

from absl import logging as absl_logging

from training import cli


def test_only_the_expected_orbax_warnings_are_dropped():
  """Issue 28 point 6: 'Given directory is read only' (every read-only restore) and 'Item
  "data" ... could not be restored' (an eval or a warm start skips the grain iterator's
  position) are dropped; the same warning for another item, and any other, still shows."""
  seen = []

  class Collect(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  logger = absl_logging.get_absl_logger()
  handler = Collect()
  logger.addHandler(handler)
  try:
    cli.quiet_expected_warnings()
    cli.quiet_expected_warnings()   # once: a second call adds no second filter
    assert sum(isinstance(f, cli.ExpectedOrbaxWarnings) for f in logger.filters) == 1
    item = ('Item "%s" was found in the checkpoint, but could not be restored. Please provide '
            'a `CheckpointHandlerRegistry`, or call `restore` with an appropriate '
            '`CheckpointArgs` subclass.')
    absl_logging.warning('Given directory is read only=%s', '/tmp/w/checkpoints')
    absl_logging.warning(item, 'data')
    absl_logging.warning(item, 'state')
    absl_logging.warning('checkpoint step directory %s was never finalised', '/tmp/w/3')
  finally:
    logger.removeHandler(handler)
    logger.filters = [f for f in logger.filters if not isinstance(f, cli.ExpectedOrbaxWarnings)]
  assert seen == [item % 'state', 'checkpoint step directory /tmp/w/3 was never finalised']
