"""Progress of a long pass (eval, OOD / few-shot feature collection) and of one-off waits
(compiling the train step), so that no command sits silent for minutes.

On a terminal a pass is one line rewritten in place (a bar, at most twice a second); in a
log (stdout not a terminal) it is a plain line every `LOG_EVERY_S` seconds. Either way a pass
that ends before its first report prints nothing, and one that reported ends with its total
time. Only process 0 prints.

  for batch in Reported(dataset, total=num_batches, what='eval'): ...
  with timed('compiling the train step'): compiled = lowered.compile()
"""
import contextlib
import gc
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

import jax

LOG_EVERY_S = 30.0       # plain lines in a log
TERMINAL_EVERY_S = 0.5   # redraws of the bar on a terminal
BAR = 20                 # characters of the bar


def clock_time(seconds: float) -> str:
  """'HH:MM:SS' (hours not wrapped at 24)."""
  s = max(int(round(seconds)), 0)
  return f'{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}'


class Progress:
  """Reports `done` of `total` units of the pass `what`, with the rate and ETA (module
  docstring). `stream` (default stdout) and `clock` (seconds) are for tests."""

  def __init__(self, what: str, total: int, unit: str = 'batches',
               stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
    self._what, self._total, self._unit = what, max(int(total), 1), unit
    self._stream = stream or sys.stdout
    self._clock = clock
    self._quiet = jax.process_index() != 0
    self._tty = bool(getattr(self._stream, 'isatty', lambda: False)())
    self._every = TERMINAL_EVERY_S if self._tty else LOG_EVERY_S
    self._start = self._last = clock()
    self._done, self._reported, self._first = 0, False, (self._start, 0)

  def update(self, done: int) -> None:
    """`done` units are finished; reports when one is due. The rate is that of the units
    after the first (which also pays for compiling and starting the input)."""
    now = self._clock()
    if self._done == 0 and done > 0:
      self._first = (now, done)
    self._done = done
    if self._quiet or now - self._last < self._every:
      return
    self._last, self._reported = now, True
    first_time, first_done = self._first
    per_unit = ((now - first_time) / (done - first_done) if done > first_done
                else (now - self._start) / max(done, 1))
    text = (f'{self._what}: {done}/{self._total} {self._unit} ({100 * done / self._total:.0f}%)'
            f', {per_unit:.3g} s each, ETA {clock_time(per_unit * (self._total - done))}')
    if self._tty:
      filled = int(BAR * done / self._total)
      text = f'\r[{"#" * filled}{"." * (BAR - filled)}] {text}\033[K'
    self._stream.write(text + ('' if self._tty else '\n'))
    self._stream.flush()

  def close(self) -> None:
    """Ends the pass: its total time, when it reported anything."""
    if self._reported:
      text = (f'{self._what}: {self._done}/{self._total} {self._unit} in '
              f'{clock_time(self._clock() - self._start)}')
      self._stream.write(f'\r{text}\033[K\n' if self._tty else text + '\n')
      self._stream.flush()


class Reported:
  """`items`, iterable any number of times, each pass reported by a `Progress` of `total`
  units named `what`; a unit is counted once the consumer asks for the next item, so its
  time includes the consumer's work on it (an eval step)."""

  def __init__(self, items: Iterable, total: int, what: str, unit: str = 'batches'):
    self.items, self.total, self.what, self.unit = items, total, what, unit

  def __iter__(self) -> Iterator[Any]:
    progress, done = Progress(self.what, self.total, self.unit), 0
    iterator, item = iter(self.items), None
    try:
      for item in iterator:
        yield item
        done += 1
        progress.update(done)
    finally:
      progress.close()
      # An exhausted grain mp_prefetch iterator holds its last batch (in shared memory) in a
      # reference cycle (StopIteration traceback -> frame); left to the interpreter's exit,
      # it ends as "resource_tracker: ... leaked shared_memory objects". Free it now.
      del iterator, item
      gc.collect()


@contextlib.contextmanager
def timed(what: str, stream: Optional[TextIO] = None,
          clock: Callable[[], float] = time.monotonic):
  """Prints 'WHAT ...' before the block and 'WHAT: 12.3 s' after it (process 0)."""
  stream = stream or sys.stdout
  loud = jax.process_index() == 0
  if loud:
    print(f'{what} ...', file=stream, flush=True)
  start = clock()
  yield
  if loud:
    print(f'{what}: {clock() - start:.1f} s', file=stream, flush=True)
