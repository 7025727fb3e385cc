"""Progress lines (training/progress.py) on a fake clock: when they appear, the rate without
the first unit (compiling), the ETA as a closed form, terminal vs log output."""
import io

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


def test_training_says_it_compiles_and_prints_the_first_step_and_eval_progress(
    tmp_path, capsys, monkeypatch):
  """Issue 28 point 3 on a 3-step run with log_every 50: the compile is announced and timed,
  step 1 has a progress line before log_every is reached (step 2 has none), and the eval pass
  reports its batches (report interval 0 here, so every batch)."""
  import re
  import training.progress
  from launch.train import train_and_evaluate
  from tests.helpers import load_config
  c = load_config('quickstart.py', 'runlocal')
  c.train.num_steps, c.train.log_every, c.train.async_checkpointing = 3, 50, False
  monkeypatch.setattr(training.progress, 'LOG_EVERY_S', 0.0)
  train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert re.search(r'compiling the train step \.\.\.\ncompiling the train step: \d+\.\d s\n',
                   out)
  steps = re.findall(r'^step (\d+)/3 ', out, re.M)
  assert steps == ['1', '3']
  assert re.search(r'^eval: 1/2 batches \(50%\), .* ETA 00:00:\d\d$', out, re.M)
  assert re.search(r'^eval: 2/2 batches in 00:00:\d\d$', out, re.M)
