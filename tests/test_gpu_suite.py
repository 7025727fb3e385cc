"""benchmarks/gpu_suite.sh: the parts run in order under their budgets, a part stopped by its
budget keeps what it printed, later parts are skipped when the suite's time is spent, training
tables report the last evaluation; and `--smoke` runs the real suite on CPU (so it cannot rot)."""
import json
import os
import re
import subprocess
import sys
import time

from tests.helpers import ROOT, load_benchmark, xla_flags

gpu_suite = load_benchmark('gpu_suite')

PY = sys.executable


def _sections(text):
  return re.findall(r'^## (\w+):', text, re.M)


def test_parts_budgets_truncation_and_training_table(tmp_path):
  work = tmp_path / 'train'
  work.mkdir()
  records = [{'step': 1, 'perf/images_per_sec': 100.0},
             {'step': 1, 'loss': 2.0, 'temperature': 1.5},
             {'step': 390 * 5, 'eval/accuracy': 0.5, 'eval/nll': 1.5, 'eval/ece': 0.1},
             {'step': 2000, 'perf/images_per_sec': 300.0},
             {'step': 2000, 'perf/images_per_sec': 200.0},
             {'step': 2000, 'loss': 1.0, 'temperature': 0.75},
             {'step': 390 * 10, 'eval/accuracy': 0.625, 'eval/nll': 1.25, 'eval/ece': 0.0625}]
  (work / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  py = lambda code: [PY, '-c', code]
  parts = [
      gpu_suite.Part('fast', 'prints a table', 2, [gpu_suite.Run('a', py(
          "print('B=1 D=2'); print('chatter'); print('| a | 1 |')"))]),
      gpu_suite.Part('broken', 'fails', 5, [gpu_suite.Run('c', py(
          "import sys; print('boom'); sys.exit(3)"))]),
      gpu_suite.Part('train', 'a training run', 5, [gpu_suite.Run('t', py('pass'), str(work))]),
      gpu_suite.Part('slow', 'stopped by its budget', 4, [gpu_suite.Run('b', py(
          "import time; print('| b | row 1 |', flush=True); time.sleep(120)"))]),
      gpu_suite.Part('late', 'no time left', 5, [gpu_suite.Run('d', py("print('| d |')"))]),
      gpu_suite.Part('absent', 'cannot run here', 5, [gpu_suite.Run('e', py('pass'))],
                     skip='no data'),
  ]
  out = tmp_path / 'suite.md'
  t0 = time.time()
  gpu_suite.run_suite(parts, budget=9.0, out_path=str(out), log_path=str(tmp_path / 'log'),
                      header='# test', grace=2.0)
  wall = time.time() - t0
  text = out.read_text()
  assert _sections(text) == ['fast', 'broken', 'train', 'slow', 'late', 'absent']
  section = dict(zip(_sections(text), re.split(r'^## \w+:.*$', text, flags=re.M)[1:]))
  assert 'ok' in section['fast'] and '| a | 1 |' in section['fast'] and 'B=1 D=2' in section['fast']
  assert not re.search(r'^chatter$', section['fast'], re.M)   # only the record lines
  assert 'stopped at its budget' in section['slow'] and '| b | row 1 |' in section['slow']
  assert 'FAILED (rc 3)' in section['broken'] and 'boom' in section['broken']
  # last eval at step 3900 = epoch 10; median images/s of (100, 300, 200); last temperature
  assert '| t | ok | 10.0 | 0.6250 | 1.2500 | 0.0625 | 200 | 0.750 |' in section['train']
  assert 'skipped: no time left in the suite budget' in section['late']
  assert 'skipped: no data' in section['absent']
  assert wall < 9.0 + 2.0 + 3.0   # budget + SIGTERM grace + process start-up slack
  assert '| b | row 1 |' in (tmp_path / 'log').read_text()


def test_smoke_suite_runs_every_part_in_order(tmp_path):
  """The real suite, --smoke: every part's section in order, nothing failed (a part may be cut
  by its few-second budget on a loaded CPU, which is what the budgets are for)."""
  out = tmp_path / 'smoke.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1))
  t0 = time.time()
  proc = subprocess.run([os.path.join(ROOT, 'benchmarks', 'gpu_suite.sh'), '--smoke',
                         f'--out={out}', f'--workdir={tmp_path / "w"}', '--budget=30'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert _sections(text) == ['head_speed_pe', 'head_speed', 'throughput_r50', 'throughput_vit',
                             'cifar_noisy', 'cifar_clean']
  assert 'FAILED' not in text, text
  assert 'budget 30 s' in text and re.search(r'^suite total \d+ s$', text, re.M)
  assert 'benchmarks/head_speed.py --B 2' in text and 'head=hetxl' in text
  assert time.time() - t0 < 30 + 6 * 3 + 20   # budget, grace per part, device probe
