r"""Trains and evaluates every head on one dataset with one recipe and prints one table.

  python benchmarks/quality.py --dataset=cifar10 --epochs=30 --out=/tmp/quality   # the real run
  python benchmarks/quality.py --dataset=cifar10 --epochs=2 --width=0.25          # CPU-sized
  python benchmarks/quality.py --dataset=cifar10 --noise=0.4 --heads=det,hetxl    # label noise
  python benchmarks/quality.py --heads=det,hetxl/tau_lr=10 --seeds=0,1 --report   # table only

Each head is one `python -m launch.main --config=configs/compare_heads.py:...` run in its own
workdir under --out (re-running resumes / re-evaluates finished runs). Columns: test accuracy,
NLL, ECE (15 bins), training images/s (median over the run's progress lines), head parameter
count, wall time; for LLC also phase 2 from the phase-1 run (`llc.evaluate`: unique codes,
strict / lenient ED, MHD, bits right), and for HET / HET-XL the learnt temperature at the end.
A head may carry its own compare_heads arguments after slashes (`hetxl/tau_lr=10/tau=0.3:3.0`,
added to its workdir name like --config_args). With several --seeds, each cell is mean +- standard
error over the seeds. --report reads finished workdirs instead of running them. Also writes
`<out>/<dataset>_noise<fraction><kind>_acc_vs_nll.png` and, when a head learns its temperature,
`..._tau.png` (tau per step, every run).
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


def name_suffix(config_args: str) -> str:
  """Config arguments as a file-name part: 'tau=0.3:3.0' -> '_tau0.3-3.0'."""
  if not config_args:
    return ''
  return '_' + config_args.replace(',', '_').replace(':', '-').replace('=', '')


TAU_KEY = 'head/temperature/temperature'


def run_one(out: str, dataset: str, spec: str, seed: int, args: argparse.Namespace) -> dict:
  """Trains and evaluates head `spec` ('hetxl' or 'hetxl/tau_lr=10/...') with one seed, or
  with --report reads its finished workdir; returns its table record."""
  head, *head_args = spec.split('/')
  config_args = ','.join(filter(None, [args.config_args, *head_args]))
  extra = f',{config_args}' if config_args else ''
  name = (f'{dataset}_{head}{name_suffix(config_args)}_noise{args.noise}{args.noise_kind[0]}'
          f'_s{seed}')
  workdir = os.path.join(out, name)
  config = (f'configs/compare_heads.py:dataset={dataset},head={head},epochs={args.epochs},'
            f'width={args.width},noise={args.noise},noise_kind={args.noise_kind}{extra}')
  cmd = [sys.executable, '-m', 'launch.main', f'--config={config}', f'--workdir={workdir}',
         f'--config.seed={seed}', f'--config.input.num_workers={args.workers}']
  t0 = time.time()
  if args.report:
    if not os.path.exists(os.path.join(workdir, 'eval_results.json')):
      raise SystemExit(f'--report: {workdir} has no eval_results.json; run without --report')
    commands = ['python ' + ' '.join(cmd[1:])]
  else:
    commands = [run(cmd, os.path.join(out, name + '.log'))]
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    result = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  rates = [r['perf/images_per_sec'] for r in rows if 'perf/images_per_sec' in r]
  taus = [(r['step'], r[TAU_KEY]) for r in rows if TAU_KEY in r]
  with open(os.path.join(workdir, 'param_shapes.json')) as f:
    shapes = json.load(f)
  head_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("['head']"))
  record = {'accuracy': result['accuracy'], 'nll': result['nll'], 'ece': result['ece'],
            'images_per_sec': statistics.median(rates[1:] or rates), 'head_params': head_params,
            'wall_s': time.time() - t0, 'commands': commands, 'taus': taus, 'seed': seed}
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
    cmd = [sys.executable, '-m', module, f'--config={c}', f'--workdir={workdir}', *common]
    commands.append('python ' + ' '.join(cmd[1:]) if args.report else run(cmd, log))
  with open(os.path.join(p2, 'llc_eval.json')) as f:
    return json.load(f)


def cell(values: list, fmt: str) -> str:
  """One value, or mean +- standard error (sample std / sqrt(n)) of several seeds' values."""
  if len(values) == 1:
    return format(values[0], fmt)
  se = np.std(values, ddof=1) / np.sqrt(len(values))
  return f'{format(np.mean(values), fmt)} +- {format(se, fmt)}'


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
  p.add_argument('--report', action='store_true', help='read finished workdirs, run nothing')
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  heads = args.heads.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  results = {h: [run_one(args.out, args.dataset, h, s, args) for s in seeds] for h in heads}

  print(f'\n{args.dataset}, ResNet-18 width {args.width}, {args.epochs} epochs, label noise '
        f'{args.noise} ({args.noise_kind}), seeds {seeds}\n')
  print('| head | accuracy | NLL | ECE | final tau | train images/s | head params | wall s |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for h, rs in results.items():
    col = lambda k: [r[k] for r in rs]
    tau = cell([r['taus'][-1][1] for r in rs], '.3f') if rs[0]['taus'] else '-'
    print(f'| {h} | {cell(col("accuracy"), ".4f")} | {cell(col("nll"), ".4f")} | '
          f'{cell(col("ece"), ".4f")} | {tau} | {cell(col("images_per_sec"), ".0f")} | '
          f'{rs[0]["head_params"]:,} | {"-" if args.report else cell(col("wall_s"), ".0f")} |')
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
  stem = os.path.join(args.out, f'{args.dataset}{name_suffix(args.config_args)}_noise'
                                f'{args.noise}{args.noise_kind[0]}')
  fig.savefig(stem + '_acc_vs_nll.png', dpi=100)
  print(f'\nPlot: {stem}_acc_vs_nll.png')
  learnt = {h: rs for h, rs in results.items() if rs[0]['taus']}
  if learnt:
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for h, rs in learnt.items():
      for r in rs:
        ax.plot(*zip(*r['taus']), label=f'{h} seed {r["seed"]}')
    ax.set_xlabel('training step')
    ax.set_ylabel('learnt temperature tau')
    ax.set_title(f'{args.dataset}, noise {args.noise} ({args.noise_kind})')
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(stem + '_tau.png', dpi=100)
    print(f'Plot: {stem}_tau.png')


if __name__ == '__main__':
  main()
