r"""The GPU suite of issue 14: every GPU measurement in one call, in order of value, each part
under its own time budget, results appended to one markdown file part by part (a time limit
loses only the tail).

  benchmarks/gpu_suite.sh --out=$OUT/gpu_suite.md          # on one H100 / H200, < 9 minutes
  benchmarks/gpu_suite.sh --smoke --out=/tmp/smoke.md      # CPU, tiny sizes (tests/test_gpu_suite.py)
  benchmarks/gpu_suite.sh --parts=cifar_noisy --budget=500 # one part with all the time

Parts in order (name, budget in seconds (480 in all), what). Unused time carries over to the
next part; no part starts past --budget, counted from the start; the last part cut by its
budget gets 20 s to exit; with the device probe and the wheel install the whole call takes
about 9 minutes at most. One persistent compilation cache serves all runs (the clean CIFAR runs
reuse the noisy runs' programs):
  head_speed_pe      90  benchmarks/head_speed.py at the paper's JFT sizes (B=16 D=1024
                         K=29,593 R=50 S=1000, parameter-efficient), chunks of 100, bf16,
                         softmax and sigmoid links: every head path it has
  head_speed         35  the same with the full noise layers, softmax link
  throughput_r50     80  benchmarks/train_throughput.py, ResNet-50, K = 29,593 and 1,000, DET
                         and HET-XL, batch 256, 224 px, bf16
  throughput_vit     80  the same for ViT-B/16
  cifar_noisy       125  CIFAR-10, 30 epochs, full-width ResNet-18 (configs/compare_heads.py),
                         40% symmetric label noise: DET and HET-XL side by side (two processes
                         on one GPU)
  cifar_clean        70  the same recipe on clean labels: DET, HET-XL, SOC and LLC (phase 1)
Training runs evaluate every 5 epochs, so a run stopped by its budget still reports its last
evaluation and the epoch it reached. Each part's command is printed with its result, to re-run
it alone. Needs `.data/cifar10` for the CIFAR parts (`python -m launch.prepare_data
--source=cifar10_npz --input_dir=../shared/data --out=.data/cifar10`); without it they are
skipped with that message. `--smoke` runs every part on CPU in tiny sizes (synthetic images, a
couple of steps), to check the suite itself, not to measure anything.
"""
import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
EVAL_EVERY_EPOCHS = 5
CIFAR_STEPS_PER_EPOCH = 50_000 // 128
CACHE_DIR = '/tmp/gpu_suite_jax_cache'


@dataclasses.dataclass
class Run:
  """One process of a part: its command line and, for training runs, its workdir."""
  name: str
  argv: List[str]
  workdir: Optional[str] = None
  env: Optional[dict] = None


@dataclasses.dataclass
class Part:
  name: str
  title: str
  budget: float
  runs: List[Run]
  skip: str = ''   # why the part cannot run here ('' = it can)


def _head_speed(pe: bool, smoke: bool) -> List[Run]:
  """JFT sizes (head_speed.py's --jft without its PE switch); PE: both links, else softmax."""
  if smoke:
    sizes = '--B 2 --D 16 --K 32 --R 2 --S 4 --chunks 2 --nodes 4 --repeats 1 --dtype float32'
  else:
    sizes = '--B 16 --D 1024 --K 29593 --R 50 --S 1000 --chunks 100 --repeats 10 --dtype bfloat16'
  argv = [PY, 'benchmarks/head_speed.py', *sizes.split(), '--link', 'both' if pe else 'softmax']
  return [Run('head_speed' + ('_pe' if pe else ''), argv + (['--pe'] if pe else []))]


def _throughput(backbone: str, smoke: bool) -> List[Run]:
  if smoke:
    sizes = (f'--backbones=convnet --classes=32 --batch=4 --image_size=16 --dtype=float32 '
             f'--steps=1 --warmup=1 --samples=4 --chunk=2 --factors=2')
  else:
    sizes = (f'--backbones={backbone} --classes=29593,1000 --batch=256 --image_size=224 '
             f'--dtype=bfloat16 --steps=10 --warmup=2')
  return [Run('throughput_' + backbone, [PY, 'benchmarks/train_throughput.py', *sizes.split(),
                                          '--heads=det,hetxl'])]


def _cifar(heads: List[str], noise: float, a: argparse.Namespace, concurrent: int) -> List[Run]:
  """One launch.main run per head on the compare_heads recipe; several share the GPU."""
  runs = []
  workers = 1 if a.smoke else max(1, (os.cpu_count() or 2) // concurrent - 1)
  for head in heads:
    name = f'cifar10_{head}_noise{noise}'
    workdir = os.path.join(a.workdir, name)
    config = f'configs/compare_heads.py:dataset=cifar10,head={head},epochs=30,width=1.0'
    config += f',noise={noise}' if noise else ''
    argv = [PY, '-m', 'launch.main', f'--config={config}{",runlocal" if a.smoke else ""}',
            f'--workdir={workdir}', f'--config.input.num_workers={workers}',
            f'--config.dataset.data_dir={a.data_dir}']
    if a.smoke:   # synthetic 16 px images, 2 steps, evaluate after each
      argv += ['--config.dataset.name=synthetic', '--config.dataset.num_classes=10',
               '--config.dataset.channels=3',
               '--config.dataset.num_examples=16',
               '--config.dataset.image_size=16', '--config.train.num_steps=2',
               '--config.train.eval_every=1', '--config.eval.max_examples=16',
               '--config.input.eval_batch_size=16', '--config.train.checkpoint_every=2']
    else:
      argv += [f'--config.train.eval_every={EVAL_EVERY_EPOCHS * CIFAR_STEPS_PER_EPOCH}']
    # Several processes on one GPU: each takes memory as it needs it, not 75% up front.
    env = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
    runs.append(Run(name, argv, workdir, env))
  return runs


def build_parts(a: argparse.Namespace) -> List[Part]:
  has_data = a.smoke or os.path.exists(os.path.join(ROOT, a.data_dir, 'metadata.json')) or \
      os.path.exists(os.path.join(a.data_dir, 'metadata.json'))
  no_data = '' if has_data else (
      f'no prepared CIFAR-10 at {a.data_dir}: run python -m launch.prepare_data '
      f'--source=cifar10_npz --input_dir=../shared/data --out=.data/cifar10 and carry .data')
  clean_heads = ['det', 'hetxl', 'soc', 'llc']
  parts = [
      Part('head_speed_pe', 'HET-XL head step at JFT sizes, parameter-efficient (the paper\'s '
           'JFT run): fwd + bwd, bf16, softmax and sigmoid links', 90, _head_speed(True, a.smoke)),
      Part('head_speed', 'The same with the full noise layers, softmax link', 35,
           _head_speed(False, a.smoke)),
      Part('throughput_r50', 'Training throughput, ResNet-50, batch 256, 224 px, bf16', 80,
           _throughput('resnet50', a.smoke)),
      Part('throughput_vit', 'Training throughput, ViT-B/16, batch 256, 224 px, bf16', 80,
           _throughput('vit_b16', a.smoke)),
      Part('cifar_noisy', 'CIFAR-10, 30 epochs, ResNet-18, 40% symmetric label noise: DET vs '
           'HET-XL', 125, _cifar(['det', 'hetxl'], 0.4, a, 2), no_data),
      Part('cifar_clean', 'CIFAR-10, 30 epochs, ResNet-18, clean labels: DET, HET-XL, SOC, LLC',
           70, _cifar(clean_heads, 0.0, a, len(clean_heads)), no_data),
  ]
  if a.parts:
    wanted = a.parts.split(',')
    unknown = sorted(set(wanted) - {p.name for p in parts})
    if unknown:
      raise SystemExit(f'unknown --parts {unknown}; the parts are '
                       f'{", ".join(p.name for p in parts)}')
    parts = [p for p in parts if p.name in wanted]
  return parts


def run_concurrently(runs: List[Run], timeout: float, log, grace: float = 20.0) -> List[dict]:
  """Starts every run, waits up to `timeout` s, then SIGTERMs what is left (training runs save
  and stop), and SIGKILLs after `grace` s more. Returns per run {'rc', 'seconds', 'timed_out',
  'stdout'}."""
  procs = []
  for r in runs:
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(r.env or {}))
    env.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)
    procs.append(subprocess.Popen(r.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
  t0 = time.time()
  outs = [None] * len(procs)
  timed_out = [False] * len(procs)
  for i, p in enumerate(procs):
    try:
      outs[i], _ = p.communicate(timeout=max(0.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
      timed_out[i] = True
      os.killpg(p.pid, signal.SIGTERM)
      try:
        outs[i], _ = p.communicate(timeout=grace)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        outs[i], _ = p.communicate()
  seconds = time.time() - t0
  results = []
  for r, p, out, late in zip(runs, procs, outs, timed_out):
    log.write(f'\n===== {r.name} (rc {p.returncode}{", stopped at its budget" if late else ""})'
              f'\n$ {shlex.join(r.argv)}\n{out}')
    log.flush()
    results.append({'rc': p.returncode, 'seconds': seconds, 'timed_out': late, 'stdout': out})
  return results


def table_lines(stdout: str) -> str:
  """What a benchmark prints for the record: its settings line ('B=...' or 'N x device, ...'),
  section lines ('== ...'), per-row progress ('  mc c=100: temp ...', kept when a time limit
  stops it before its table) and markdown table rows."""
  keep = re.compile(r'^(\||== |B=\d|\d+ x |  [\w =.]+: temp )')
  return '\n'.join(l for l in stdout.splitlines() if keep.match(l))


def training_summary(run: Run) -> dict:
  """The last evaluation of a training workdir (metrics.jsonl), the epoch it was at, median
  training images/s and the last learnt temperature (if the head logs one)."""
  out = {'epoch': 0.0, 'step': 0, 'accuracy': None, 'nll': None, 'ece': None,
         'images_per_sec': None, 'temperature': None}
  path = os.path.join(run.workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return out
  rates = []
  with open(path) as f:
    for record in map(json.loads, f):
      if 'eval/accuracy' in record:
        out.update(step=record['step'], accuracy=record['eval/accuracy'],
                   nll=record['eval/nll'], ece=record['eval/ece'])
      rates += [record['perf/images_per_sec']] if 'perf/images_per_sec' in record else []
      temps = [v for k, v in record.items() if 'temperature' in k or k == 'tau']
      out['temperature'] = temps[-1] if temps else out['temperature']
  out['epoch'] = out['step'] / CIFAR_STEPS_PER_EPOCH
  out['images_per_sec'] = sorted(rates)[len(rates) // 2] if rates else None
  return out


def training_table(runs: List[Run], results: List[dict]) -> str:
  fmt = lambda v, f: '-' if v is None else format(v, f)
  rows = ['| run | status | last eval at epoch | test accuracy | NLL | ECE | train images/s '
          '(median) | learnt tau (last) |', '|---|---|---:|---:|---:|---:|---:|---:|']
  for run, res in zip(runs, results):
    s = training_summary(run)
    status = 'stopped at budget' if res['timed_out'] else ('ok' if res['rc'] == 0 else
                                                            f'failed (rc {res["rc"]})')
    rows.append(f'| {run.name} | {status} | {s["epoch"]:.1f} | {fmt(s["accuracy"], ".4f")} | '
                f'{fmt(s["nll"], ".4f")} | {fmt(s["ece"], ".4f")} | '
                f'{fmt(s["images_per_sec"], ",.0f")} | {fmt(s["temperature"], ".3f")} |')
  return '\n'.join(rows)


def environment() -> str:
  """Device, versions and commit, from a subprocess (this process never touches the GPU)."""
  probe = ('import jax, flax, optax; d = jax.devices()[0]; '
           'print(f"{jax.device_count()} x {d.device_kind} ({d.platform}); jax {jax.__version__}, '
           'flax {flax.__version__}, optax {optax.__version__}")')
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  try:
    device = subprocess.run([PY, '-c', probe], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120).stdout.strip().splitlines()[-1:] or ['?']
  except subprocess.TimeoutExpired:
    device = ['? (device probe timed out)']
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or 'unknown (no .git)'
  return (f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; {device[0]}; '
          f'{os.cpu_count()} CPU cores; commit {commit}')


def run_suite(parts: List[Part], budget: float, out_path: str, log_path: str,
              header: str, grace: float = 20.0) -> None:
  """Runs `parts` in order, each under min(its budget + time left over by earlier parts, time
  left in `budget`), appending each part's commands, status and results to `out_path` as soon
  as it ends (fsynced), and every run's full output to `log_path`. A part stopped at its budget
  gets `grace` s to exit after SIGTERM (so the suite can overrun `budget` by that much)."""
  t_start = time.time()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, 'a') as out, open(log_path, 'a') as log:
    def emit(text: str) -> None:
      out.write(text + '\n')
      out.flush()
      os.fsync(out.fileno())

    emit(f'{header}; budget {budget:.0f} s\n')
    carry = 0.0
    for part in parts:
      left = budget - (time.time() - t_start)
      emit(f'## {part.name}: {part.title}\n')
      for run in part.runs:
        emit(f'    {shlex.join(run.argv).replace(PY, "python")}')
      if part.skip or left < 5:
        emit(f'\nskipped: {part.skip or "no time left in the suite budget"}\n')
        continue
      timeout = min(part.budget + carry, left)
      results = run_concurrently(part.runs, timeout, log, grace)
      used = results[0]['seconds']
      carry = max(0.0, part.budget + carry - used)
      if part.runs[0].workdir:
        emit('\n' + training_table(part.runs, results))
      for run, res in zip(part.runs, results):
        if not part.runs[0].workdir:
          status = ('stopped at its budget: rows printed before then' if res['timed_out'] else
                    'ok' if res['rc'] == 0 else f'FAILED (rc {res["rc"]})')
          emit(f'\n{status}\n\n{table_lines(res["stdout"])}')
        if res['rc'] and not res['timed_out']:
          emit(f'\n{run.name} FAILED:\n```\n' + '\n'.join(res['stdout'].splitlines()[-15:])
               + '\n```')
      emit(f'\n{used:.0f} s (budget {timeout:.0f} s)\n')
    emit(f'suite total {time.time() - t_start:.0f} s\n')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='gpu_suite.md', help='results file (markdown), appended to')
  p.add_argument('--log', default='', help='full output of every run (default: OUT.log)')
  p.add_argument('--budget', type=float, default=0.0,
                 help='seconds for the whole suite (default 480; 40 with --smoke)')
  p.add_argument('--parts', default='', help='comma-separated part names (default: all)')
  p.add_argument('--workdir', default='/tmp/gpu_suite', help='training workdirs go here')
  p.add_argument('--data_dir', default='.data/cifar10', help='prepared CIFAR-10')
  p.add_argument('--smoke', action='store_true', help='tiny sizes on CPU: checks the suite')
  a = p.parse_args(argv)
  parts = build_parts(a)
  budget = a.budget or (40.0 if a.smoke else 480.0)
  if a.smoke:   # the same parts, budgets shrunk in proportion
    scale = budget / sum(part.budget for part in parts)
    for part in parts:
      part.budget *= scale
  header = (f'# GPU suite{" (smoke: sizes too small to mean anything)" if a.smoke else ""}\n\n'
            f'{environment()}')
  run_suite(parts, budget, a.out, a.log or a.out + '.log', header, 3.0 if a.smoke else 20.0)
  return 0


if __name__ == '__main__':
  sys.exit(main())
