r"""Trains and evaluates every head on one dataset with one recipe and prints one table.

  python benchmarks/quality.py --dataset=cifar10 --epochs=30 --out=/tmp/quality   # the real run
  python benchmarks/quality.py --dataset=cifar10 --epochs=2 --width=0.25          # CPU-sized
  python benchmarks/quality.py --dataset=cifar10 --noise=0.4 --heads=det,hetxl    # label noise

Each head is one `python -m launch.main --config=configs/compare_heads.py:...` run in its own
workdir under --out (re-running resumes / re-evaluates finished runs). Columns: test accuracy,
NLL, ECE (15 bins), training images/s (median over the run's progress lines), head parameter
count, wall time; for LLC also phase 2 from the phase-1 run (`llc.evaluate`: unique codes,
strict / lenient ED, MHD, bits right). With several --seeds, each cell is mean +- std. Also writes
`<out>/<dataset>_noise<fraction><kind>_acc_vs_nll.png`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list, log: str) -> str:
  """Runs `cmd` (logged to `log`); returns it as a re-runnable command line."""
  with open(log, 'w') as f:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f'failed: {" ".join(cmd[1:])}, see {log}')
  return 'python ' + ' '.join(cmd[1:])


def name_suffix(args: argparse.Namespace) -> str:
  """--config_args as a file-name part: 'tau=0.3:3.0' -> '_tau0.3-3.0'."""
  if not args.config_args:
    return ''
  return '_' + args.config_args.replace(',', '_').replace(':', '-').replace('=', '')


def run_one(out: str, dataset: str, head: str, seed: int, args: argparse.Namespace) -> dict:
  extra = f',{args.config_args}' if args.config_args else ''
  name = f'{dataset}_{head}{name_suffix(args)}_noise{args.noise}{args.noise_kind[0]}_s{seed}'
  workdir = os.path.join(out, name)
  config = (f'configs/compare_heads.py:dataset={dataset},head={head},epochs={args.epochs},'
            f'width={args.width},noise={args.noise},noise_kind={args.noise_kind}{extra}')
  cmd = [sys.executable, '-m', 'launch.main', f'--config={config}', f'--workdir={workdir}',
         f'--config.seed={seed}', f'--config.input.num_workers={args.workers}']
  t0 = time.time()
  commands = [run(cmd, os.path.join(out, name + '.log'))]
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    result = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [r['perf/images_per_sec'] for r in map(json.loads, f) if 'perf/images_per_sec' in r]
  with open(os.path.join(workdir, 'param_shapes.json')) as f:
    shapes = json.load(f)
  head_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("['head']"))
  record = {'accuracy': result['accuracy'], 'nll': result['nll'], 'ece': result['ece'],
            'images_per_sec': statistics.median(rates[1:] or rates), 'head_params': head_params,
            'wall_s': time.time() - t0, 'commands': commands}
  if head == 'llc':
    record['llc'] = llc_phase2(workdir, config, seed, args, commands)
  return record


def llc_phase2(p1: str, config: str, seed: int, args: argparse.Namespace,
               commands: list) -> dict:
  """Exports the phase-1 codebook, trains phase 2 (instance codes, 1/4 of the steps) from it
  and returns llc.evaluate's phase-2 record (strict ED, MHD, ...)."""
  p2 = p1 + '_p2'
  p2_config = f'{config},phase1={p1}'
  common = [f'--config.seed={seed}', f'--config.input.num_workers={args.workers}']
  for module, c, workdir in (('llc.evaluate', config, p1), ('launch.main', p2_config, p2),
                             ('llc.evaluate', p2_config, p2)):
    log = workdir + ('.llc_eval.log' if module == 'llc.evaluate' else '.log')
    commands.append(run([sys.executable, '-m', module, f'--config={c}', f'--workdir={workdir}',
                         *common], log))
  with open(os.path.join(p2, 'llc_eval.json')) as f:
    return json.load(f)


def cell(values: list, fmt: str) -> str:
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{format(np.mean(values), fmt)} +- {format(np.std(values), fmt)}'


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dataset', default='cifar10', choices=['cifar10', 'caltech101'])
  p.add_argument('--heads', default='det,het,hetxl,soc,llc')
  p.add_argument('--epochs', type=int, default=30)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--noise', type=float, default=0.0)
  p.add_argument('--noise_kind', default='symmetric')
  p.add_argument('--seeds', default='0')
  p.add_argument('--config_args', default='', help='more compare_heads arguments for every '
                 'head, e.g. tau=0.3:3.0 (also added to the workdir names)')
  p.add_argument('--workers', type=int, default=1)
  p.add_argument('--out', default='/tmp/quality')
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  heads = args.heads.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  results = {h: [run_one(args.out, args.dataset, h, s, args) for s in seeds] for h in heads}

  print(f'\n{args.dataset}, ResNet-18 width {args.width}, {args.epochs} epochs, label noise '
        f'{args.noise} ({args.noise_kind}), seeds {seeds}\n')
  print('| head | accuracy | NLL | ECE | train images/s | head params | wall s |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for h, rs in results.items():
    col = lambda k: [r[k] for r in rs]
    print(f'| {h} | {cell(col("accuracy"), ".4f")} | {cell(col("nll"), ".4f")} | '
          f'{cell(col("ece"), ".4f")} | {cell(col("images_per_sec"), ".0f")} | '
          f'{rs[0]["head_params"]:,} | {cell(col("wall_s"), ".0f")} |')
  llc = results.get('llc', [])
  if llc:
    print('\nLLC phase 2 (instance codes from the llc run, 1/4 of its steps, lr / 10):\n')
    print('| bits | unique codes | strict ED | lenient ED | no match | MHD | MHD ties | bits right |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|')
    col = lambda k: [r['llc'][k] for r in llc]
    print(f'| {llc[0]["llc"]["bits"]} | {cell(col("unique_codes"), ".0f")} '
          f'| {cell(col("ed_strict_accuracy"), ".4f")} | {cell(col("ed_lenient_accuracy"), ".4f")} '
          f'| {cell(col("ed_no_match_rate"), ".4f")} | {cell(col("mhd_accuracy"), ".4f")} '
          f'| {cell(col("mhd_tie_rate"), ".4f")} | {cell(col("bits_right"), ".2f")} |')
  print('\nCommands:')
  for rs in results.values():
    for r in rs:
      print('\n'.join(f'  {c}' for c in r['commands']))

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for h, rs in results.items():
    ax.scatter([r['nll'] for r in rs], [r['accuracy'] for r in rs], label=h)
  ax.set_xlabel('test NLL')
  ax.set_ylabel('test accuracy')
  ax.set_title(f'{args.dataset}, noise {args.noise} ({args.noise_kind})')
  ax.legend()
  fig.tight_layout()
  png = os.path.join(args.out, f'{args.dataset}{name_suffix(args)}_noise{args.noise}'
                               f'{args.noise_kind[0]}_acc_vs_nll.png')
  fig.savefig(png, dpi=100)
  print(f'\nPlot: {png}')


if __name__ == '__main__':
  main()
