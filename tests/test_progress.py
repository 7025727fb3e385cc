"""Progress lines (training/progress.py) on a fake clock: when they appear, the rate without
the first unit (compiling), the ETA as a closed form, terminal vs log output."""
import io

import pytest

from training.progress import Progress, Reported, clock_time, timed


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _run(stream, first_s, each_s, total):
  clock = _Clock()
  p = Progress('eval', total, stream=stream, clock=clock)
  for done in range(1, total + 1):
    clock.t += first_s if done == 1 else each_s
    p.update(done)
  p.close()
  return stream.getvalue()


def test_log_lines_every_30_s_with_the_eta_of_the_units_after_the_first():
  """First batch 100 s (it compiles), then 10 s each, 10 batches: a line at t = 100, 130,
  160, 190 s; from the second line on the rate is 10 s and the ETA (10 - done) * 10 s."""
  lines = _run(io.StringIO(), 100.0, 10.0, 10).splitlines()
  assert lines == [
      'eval: 1/10 batches (10%), 100 s each, ETA 00:15:00',
      'eval: 4/10 batches (40%), 10 s each, ETA 00:01:00',
      'eval: 7/10 batches (70%), 10 s each, ETA 00:00:30',
      'eval: 10/10 batches (100%), 10 s each, ETA 00:00:00',
      'eval: 10/10 batches in 00:03:10']


def test_a_short_pass_prints_nothing_and_a_terminal_gets_one_rewritten_line():
  assert _run(io.StringIO(), 1.0, 1.0, 20) == ''   # 20 s < 30 s: silent in a log
  out = _run(_Terminal(), 1.0, 1.0, 4)
  assert out.count('\n') == 1 and out.endswith('eval: 4/4 batches in 00:00:04\x1b[K\n')
  assert '\r[#####...............] eval: 1/4 batches (25%)' in out
  assert '\r[##########..........] eval: 2/4 batches (50%), 1 s each, ETA 00:00:02' in out


def test_reported_passes_every_item_each_time_and_timed_prints_its_time():
  items = Reported([1, 2, 3], total=3, what='eval')
  assert list(items) == [1, 2, 3] and list(items) == [1, 2, 3]
  clock, out = _Clock(), io.StringIO()
  with timed('compiling the train step', stream=out, clock=clock):
    clock.t = 83.34
  assert out.getvalue() == 'compiling the train step ...\ncompiling the train step: 83.3 s\n'
  assert clock_time(90061) == '25:01:01'


@pytest.fixture
def shared_memory(monkeypatch):
  """The names of the grain shared-memory blocks this process opens (batches from worker
  processes), with absl's flags parsed as grain's worker start needs; `.left()` is those not
  yet unlinked, after waiting up to 2.5 s for grain's background unlinking."""
  import os
  import time
  from absl import flags
  from grain._src.python.ipc import shared_memory_array

  class Opened(list):
    def left(self):
      for _ in range(50):
        names = [n for n in self if os.path.exists(f'/dev/shm/{n}')]
        if not names:
          break
        time.sleep(0.05)
      return names

  opened, original = Opened(), shared_memory_array.SharedMemoryArray.from_metadata
  def record(metadata):
    opened.append(metadata.name)
    return original(metadata)
  monkeypatch.setattr(shared_memory_array.SharedMemoryArray, 'from_metadata', record)
  parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  yield opened
  if not parsed:
    flags.FLAGS.unparse_flags()


def test_training_says_it_compiles_and_prints_the_first_step_and_eval_progress(
    tmp_path, capsys, monkeypatch, shared_memory):
  """Issue 28 point 3 on a 3-step run with log_every 50: the compile is announced and timed,
  step 1 has a progress line before log_every is reached (step 2 has none), and the eval pass
  reports its batches (report interval 0 here, so every batch). Point 6: the batches came
  from a worker process, and every shared-memory block of theirs is unlinked by the end (the
  last train batch was left to the interpreter's exit, which reported it leaked)."""
  import re
  import training.progress
  from launch.train import train_and_evaluate
  from tests.helpers import load_config
  c = load_config('quickstart.py', 'runlocal')
  c.train.num_steps, c.train.log_every, c.train.async_checkpointing = 3, 50, False
  c.input.num_workers = 1
  monkeypatch.setattr(training.progress, 'LOG_EVERY_S', 0.0)
  train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert re.search(r'compiling the train step \.\.\.\ncompiling the train step: \d+\.\d s\n',
                   out)
  steps = re.findall(r'^step (\d+)/3 ', out, re.M)
  assert steps == ['1', '3']
  assert re.search(r'^eval: 1/2 batches \(50%\), .* ETA 00:00:\d\d$', out, re.M)
  assert re.search(r'^eval: 2/2 batches in 00:00:\d\d$', out, re.M)
  assert len(shared_memory) >= 3 * 3 + 2 * 4   # train: image, label, mask; eval: + index
  assert not shared_memory.left()


def test_an_eval_pass_through_a_worker_process_unlinks_all_its_shared_memory(shared_memory):
  """Issue 28 point 6: an exhausted grain mp_prefetch iterator kept its last batch's shared
  memory alive (a reference cycle) until the interpreter's exit, which reported it as leaked.
  After a `Reported` pass every block the batches came in is unlinked."""
  import numpy as np
  from input_pipeline.pipeline import eval_dataset
  from input_pipeline.sources import ArraySource
  source = ArraySource(np.zeros((40, 8, 8, 1), np.uint8), np.arange(40) % 3)
  ds, n = eval_dataset(source, global_batch=16, eval_mode='none', image_size=0, channels=1,
                       num_workers=1)
  labels = [batch['label'].copy() for batch in Reported(ds, n, 'eval')]
  assert np.concatenate(labels)[:40].tolist() == (np.arange(40) % 3).tolist()
  assert len(shared_memory) == 3 * 4   # 3 batches of image, index, label, mask
  assert not shared_memory.left()
