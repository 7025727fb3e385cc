r"""Your own data, end to end: a folder dataset of a shape no config knows, every head.

Writes a seeded image folder ROOT/train/<class>/<i>.png - grayscale, `--classes` classes named
0, 1, ..., `--size` px, `--per_class` images each, only a train split; each class is a fixed
random pattern plus noise, so it is learnable - then runs, each as its own command, with no
flag beyond the data directory, the head and the run length:

  python -m launch.prepare_data --source=folder --input_dir=ROOT --out=DATA \
      --holdout_split=test --holdout_fraction=0.2
  python -m launch.main --config=configs/compare_heads.py:data=DATA,head=H,RUN --workdir=W/H
      for H in det, hetxl, soc, llc (LLC phase 1)
  python -m llc.evaluate --workdir=W/llc                    (exports the phase-1 codebook)
  python -m launch.main --config=configs/compare_heads.py:data=DATA,head=llc,phase1=W/llc,RUN \
      --workdir=W/llc2                                        (LLC phase 2)
  python -m llc.evaluate --workdir=W/llc2
  python -m launch.main --mode=eval --workdir=W/det           (must repeat det's final eval)

RUN is `runlocal` (a tiny ResNet-18 for 4 steps: checks the path, accuracy at chance) or
`epochs=N`. Prints a markdown table (head, steps, accuracy - for LLC phase 2 its exact (ED) and
min-Hamming (MHD) decodings beside its code logits' - NLL, seconds) and checks that every
command succeeded, that classes, channels and sizes came from the data (config.json: 200
classes, 1 channel, LLC bits 16 = ceil(2 log2 200)) and that --mode=eval reproduced the
training run's final numbers.

  python benchmarks/own_data.py --run=runlocal               # ~2 min on a loaded 2-core CPU
  python benchmarks/own_data.py --run=epochs=3 --per_class=20
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(root: str, classes: int, per_class: int, size: int, seed: int = 0) -> None:
  """ROOT/train/<k>/<i>.png: class k = a seeded random gray pattern + N(0, 30) noise."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for k in range(classes):
    d = os.path.join(root, 'train', str(k))
    os.makedirs(d, exist_ok=True)
    proto = rng.integers(0, 256, (size, size)).astype(np.float64)
    for i in range(per_class):
      x = np.clip(proto + rng.normal(0, 30, proto.shape), 0, 255).astype(np.uint8)
      Image.fromarray(x, 'L').save(os.path.join(d, f'{i}.png'))


def command(module: str, *args: str) -> tuple[dict, float, str]:
  """Runs `python -m module args`; (last JSON line, seconds, stdout). Exits on failure."""
  t0 = time.time()
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f'FAILED: {module} {" ".join(args)}\n{proc.stderr[-3000:]}')
  last = proc.stdout.strip().splitlines()[-1]
  return (json.loads(last) if last.startswith('{') else {}), time.time() - t0, proc.stdout


def run(work: str, classes: int = 200, per_class: int = 5, size: int = 16,
        run_length: str = 'runlocal') -> list[dict]:
  """Prepares the folder under `work` and runs every command of the module docstring; returns
  one row per command."""
  folder, data = os.path.join(work, 'folder'), os.path.join(work, 'data')
  write_folder(folder, classes, per_class, size)
  _, seconds, out = command('launch.prepare_data', '--source=folder', f'--input_dir={folder}',
                            f'--out={data}', '--holdout_split=test', '--holdout_fraction=0.2')
  assert f'class ids (numeric): 0: 0, 1: 1,' in out, out
  rows = [{'command': 'prepare_data', 'seconds': seconds}]
  config = 'configs/compare_heads.py:data=' + data
  for head in ('det', 'hetxl', 'soc', 'llc'):
    result, seconds, _ = command('launch.main', f'--config={config},head={head},{run_length}',
                                 f'--workdir={work}/{head}')
    rows.append({'command': f'train {head}', 'seconds': seconds, **result})
  result, seconds, _ = command('llc.evaluate', f'--workdir={work}/llc')
  rows.append({'command': 'llc.evaluate phase 1', 'seconds': seconds, **result})
  result, seconds, _ = command('launch.main',
                               f'--config={config},head=llc,phase1={work}/llc,{run_length}',
                               f'--workdir={work}/llc2')
  rows.append({'command': 'train llc phase 2', 'seconds': seconds, **result})
  result, seconds, _ = command('llc.evaluate', f'--workdir={work}/llc2')
  rows.append({'command': 'llc.evaluate phase 2', 'seconds': seconds, **result})
  result, seconds, _ = command('launch.main', '--mode=eval', f'--workdir={work}/det')
  rows.append({'command': 'eval det', 'seconds': seconds, **result})
  check(work, rows, classes)
  return rows


def check(work: str, rows: list[dict], classes: int) -> None:
  """What the run must show: facts from the data, bits from K, eval = training's final eval."""
  for head in ('det', 'llc', 'llc2'):
    with open(os.path.join(work, head, 'config.json')) as f:
      c = json.load(f)
    assert c['dataset']['num_classes'] == classes and c['dataset']['channels'] == 1, c['dataset']
    if head.startswith('llc'):
      assert c['model']['head_kwargs']['bits'] == math.ceil(2 * math.log2(classes))
  by = {r['command']: r for r in rows}
  for key in ('accuracy', 'nll', 'step', 'num_examples'):
    assert abs(by['eval det'][key] - by['train det'][key]) < 1e-5, (key, by['eval det'])


def accuracy_cell(row: dict) -> str:
  """A row's accuracy, named: the evaluator's top-1 (for an LLC phase-2 run the argmax of its
  code logits), phase 1's class-code accuracy, or phase 2's decodings (exact ED, min-Hamming)."""
  if 'ed_strict_accuracy' in row:
    return (f"ED {row['ed_strict_accuracy']:.3f} / MHD {row['mhd_accuracy']:.3f} "
            f"(logits {row['logit_accuracy']:.3f})")
  if 'class_code_accuracy' in row:
    return f"class codes {row['class_code_accuracy']:.3f}"
  return f"{row['accuracy']:.3f}" if 'accuracy' in row else ''


def table(rows: list[dict]) -> str:
  lines = ['| command | step | accuracy | NLL | seconds |', '|---|---|---|---|---|']
  for r in rows:
    nll = f'{r["nll"]:.3f}' if 'nll' in r else ''
    lines.append(f'| {r["command"]} | {r.get("step", "")} | {accuracy_cell(r)} | {nll} | '
                 f'{r["seconds"]:.1f} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--run', default='runlocal', help='runlocal | epochs=N')
  parser.add_argument('--classes', type=int, default=200)
  parser.add_argument('--per_class', type=int, default=5)
  parser.add_argument('--size', type=int, default=16)
  parser.add_argument('--work', default='', help='working directory (default: a temp dir)')
  args = parser.parse_args()
  work = args.work or tempfile.mkdtemp(prefix='own_data_')
  rows = run(work, args.classes, args.per_class, args.size, args.run)
  print(table(rows))
  print(f'all checks passed; workdirs under {work}')


if __name__ == '__main__':
  main()
