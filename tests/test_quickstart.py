"""The README's first command (`configs/quickstart.py:compare`, here `:runlocal`-sized): DET and
HET-XL trained in <workdir>/det and <workdir>/hetxl, quiet logs, and a closing side-by-side
table whose cells are each run's eval_results.json; `--mode=eval` on the workdir prints it again."""
import json
import re

from tests.helpers import run_main

RUNS = ('det', 'hetxl')
INFO = re.compile(r'^I\d{4} ')   # an absl INFO line: I<mmdd> <time> <thread> <file>:<line>]


def _table(stdout: str) -> dict:
  """The closing markdown table: {run: {column: cell}}."""
  lines = stdout.strip().splitlines()
  start = max(i for i, line in enumerate(lines) if line.startswith('| run '))
  header = [c.strip() for c in lines[start].strip('|').split('|')]
  rows = [[c.strip() for c in line.strip('|').split('|')]
          for line in lines[start + 2:start + 2 + len(RUNS)]]
  assert lines[start + 2 + len(RUNS)].startswith('| chance (uniform 1/10) ')   # the baseline
  return {row[0]: dict(zip(header[1:], row[1:])) for row in rows}


def test_compare_quickstart_is_quiet_and_its_table_is_each_runs_eval(tmp_path):
  train = run_main('--config=configs/quickstart.py:compare,runlocal', f'--workdir={tmp_path}')
  lines = (train.stdout + train.stderr).splitlines()
  assert len(lines) <= 25, '\n'.join(lines)
  assert not [l for l in lines if INFO.match(l)], '\n'.join(lines)
  for name in RUNS:   # each run's header, progress lines and final eval line are all there
    out = train.stdout.split(f'{name}: {tmp_path / name}\n', 1)[1]
    assert [l.split(' |')[0] for l in out.splitlines() if l.startswith('step ')][:4] == [
        f'step {s}/4' for s in range(1, 5)]
    assert json.loads(next(l for l in out.splitlines() if l.startswith('{')))['step'] == 4
  assert 'temperature' in train.stdout.split('hetxl: ')[1]   # HET-XL's learnt temperature
  table = _table(train.stdout)
  assert list(table) == list(RUNS)
  for name in RUNS:
    with open(tmp_path / name / 'eval_results.json') as f:
      result = json.load(f)
    assert table[name] == {'step': str(result['step']),
                           'examples': str(result['num_examples']),
                           **{k: f'{result[k]:.4f}' for k in ('accuracy', 'nll', 'ece')}}

  # Eval from the workdir alone (its saved config of both runs), verbose: every INFO line again.
  evaluated = run_main('--mode=eval', f'--workdir={tmp_path}', '--verbosity=0')
  assert _table(evaluated.stdout) == table
  assert any(INFO.match(l) for l in evaluated.stderr.splitlines())


def test_errors_still_show_when_quiet(tmp_path):
  proc = run_main('--config=configs/quickstart.py:compare', f'--workdir={tmp_path}',
                  '--mode=eval', check=False, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: no checkpoints in {tmp_path / "det"}: train first with --mode=train')
