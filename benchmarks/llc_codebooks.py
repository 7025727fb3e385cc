r"""LLC codebooks vs random / SVD / CCA codebooks on real Caltech-101, scaled down for a CPU.

Protocol (every run through `launch.main` with `configs/llc_caltech101.py`, ResNet-18 CIFAR
stem at `--width`, images resized to `--image_size`, batch 64, the config's optimizer: SGD
momentum 0.9, lr 0.05, weight decay 5e-4, warmup + cosine), the paper's:
  1. DET: softmax head from scratch, `--epochs`; the real-valued reference and the source of the
     SVD (head kernel) and CCA (pooled training-split features) codebooks.
  2. per k: LLC phase 1 from scratch with the same budget (`--epochs`), codebook learnt from
     N(0, 2/k); export; phase 2 from phase 1 (backbone + projection), `--epochs / 4`, lr / 10
     (the config's phase-2 rule).
  3. per k and baseline (random seed 0, SVD, CCA): phase 2 with that fixed codebook from the DET
     backbone, `--epochs / 4`; its projection starts fresh, so it gets the phase-1 lr
     (`--baseline_lr`) instead of lr / 10. Each method thus trains `1.25 * --epochs` in all.
     The LLC codebook gets the same treatment (row `llc_codebook_det_backbone`): the codebooks
     then differ and nothing else, while row `LLC` also carries phase 1's own backbone.
  4. `--warm_starts svd cca`: LLC phase 1 from scratch with `codebook_init` = that baseline, at
     `--warm_start_bits` (default the first k): does a collapsed codebook end unique?
  5. per phase-1 run: its start codebook (the seeded N(0, 2/k) draw, re-drawn here as
     `launch.main` does, or the warm start) against the learnt one: which classes share a code.
Runs whose result file exists are skipped, so re-running continues. Logs go to
<workdir>.train.log / .llc_eval.log. Prints the commands (`--dry_run` prints only them) and
markdown tables.

  python benchmarks/llc_codebooks.py --root=/tmp/llc_bench --bits 10 7 14 --warm_starts svd cca \
      --warm_start_bits 7
"""
import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = sys.path[0]
CONFIG = 'configs/llc_caltech101.py'
TRAIN_EXAMPLES = 5784
BASELINES = ('random', 'svd', 'cca')
LLC_ON_DET = 'llc_codebook_det_backbone'   # the learnt codebook, phase 2 as the baselines'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--root', default='/tmp/llc_bench', help='directory for all workdirs')
  p.add_argument('--bits', type=int, nargs='+', default=[7, 10, 14])
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--epochs', type=float, default=10, help='DET and LLC phase 1')
  p.add_argument('--baseline_lr', type=float, default=0.0,
                 help="phase-2 lr of the fixed baseline codebooks (default: the config's "
                      "phase-1 lr, scaled to --batch_size)")
  p.add_argument('--warm_starts', nargs='*', default=[], choices=BASELINES,
                 help='baselines to warm-start phase 1 from')
  p.add_argument('--warm_start_bits', type=int, default=0, help='k of the warm starts '
                 '(default: the first of --bits)')
  p.add_argument('--dry_run', action='store_true')
  return p.parse_args(argv)


class Runner:
  """Builds the commands, runs the missing ones, logs each to <workdir>.log."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.commands = []

  def steps(self, epochs: float) -> int:
    return max(1, round(epochs * TRAIN_EXAMPLES / self.args.batch_size))

  def shape_overrides(self) -> list[str]:
    return [f'--config.model.backbone_kwargs.width={self.args.width}',
            f'--config.input.image_size={self.args.image_size}']

  def overrides(self, steps: int, lr: float | None = None) -> list[str]:
    out = [*self.shape_overrides(), f'--config.input.batch_size={self.args.batch_size}',
           f'--config.train.num_steps={steps}', '--config.train.eval_every=0',
           f'--config.train.checkpoint_every={steps}', '--config.train.log_every=50',
           f'--config.optimizer.warmup_steps={min(200, steps // 10)}']
    return out + ([f'--config.optimizer.learning_rate={lr}'] if lr else [])

  def run(self, argv: list[str], done_file: str, log: str) -> None:
    command = ' '.join(shlex.quote(x) for x in ['python', *argv[1:]])
    self.commands.append(command)
    if self.args.dry_run or os.path.exists(done_file):
      return
    start = time.time()
    print(f'$ {command}', flush=True)
    with open(log, 'w') as f:
      proc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
      raise SystemExit(f'failed ({proc.returncode}), see {log}')
    print(f'  done in {time.time() - start:.0f} s', flush=True)

  def train(self, arg: str, workdir: str, steps: int, lr: float | None = None) -> None:
    argv = [sys.executable, '-m', 'launch.main', f'--config={CONFIG}:{arg}',
            f'--workdir={workdir}', *self.overrides(steps, lr)]
    self.run(argv, os.path.join(workdir, 'eval_results.json'), workdir + '.train.log')

  def llc_eval(self, arg: str, workdir: str) -> None:
    argv = [sys.executable, '-m', 'llc.evaluate', f'--config={CONFIG}:{arg}',
            f'--workdir={workdir}', *self.shape_overrides()]
    self.run(argv, os.path.join(workdir, 'llc_eval.json'), workdir + '.llc_eval.log')

  def baseline(self, kind: str, bits: int, det: str, out: str) -> None:
    argv = [sys.executable, '-m', 'llc.baseline_codebooks', f'--kind={kind}', f'--bits={bits}',
            f'--out={out}']
    argv += {'random': ['--num_classes=101', '--seed=0'], 'svd': [f'--det_workdir={det}'],
             'cca': [f'--det_workdir={det}', f'--config={CONFIG}:det',
                     *self.shape_overrides()]}[kind]
    self.run(argv, out, os.path.splitext(out)[0] + '.log')


def read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def main(argv=None) -> None:
  a = parse_args(argv)
  os.makedirs(a.root, exist_ok=True)
  r = Runner(a)
  det = os.path.join(a.root, 'det')
  p1_steps, p2_steps = r.steps(a.epochs), r.steps(a.epochs / 4)
  r.train('det', det, p1_steps)
  for k in a.bits:
    p1, p2 = os.path.join(a.root, f'llc{k}_p1'), os.path.join(a.root, f'llc{k}_p2')
    r.train(f'phase=1,bits={k}', p1, p1_steps)
    r.llc_eval(f'phase=1,bits={k}', p1)
    r.train(f'phase=2,bits={k},phase1={p1}', p2, p2_steps)
    r.llc_eval(f'phase=2,bits={k},phase1={p1}', p2)
    for kind in (*BASELINES, LLC_ON_DET):
      book = os.path.join(p1, 'codebook.npy')
      if kind != LLC_ON_DET:
        book = os.path.join(a.root, f'{kind}{k}.npy')
        r.baseline(kind, k, det, book)
      w = os.path.join(a.root, f'{kind}{k}_p2')
      r.train(f'phase=2,bits={k},codebook={book},backbone_from={det}', w, p2_steps,
              lr=a.baseline_lr or 0.05 * a.batch_size / 64)
      r.llc_eval(f'phase=2,bits={k},codebook={book}', w)
    if k == (a.warm_start_bits or a.bits[0]):
      for kind in a.warm_starts:
        ws = os.path.join(a.root, f'llc{k}_from_{kind}_p1')
        r.train(f'phase=1,bits={k},codebook_init={os.path.join(a.root, f"{kind}{k}.npy")}', ws,
                p1_steps)
        r.llc_eval(f'phase=1,bits={k}', ws)
  print('\n'.join(['', '## commands', *r.commands]))
  if not a.dry_run:
    print_tables(a, det)


def print_tables(a: argparse.Namespace, det: str) -> None:
  det_acc = read(os.path.join(det, 'eval_results.json')).get('accuracy', float('nan'))
  print(f'\nDET (real-valued softmax) test accuracy: {100 * det_acc:.2f}%\n')
  print('| k | codebook | unique codes | min dist | strict ED % | lenient ED % | no match % '
        '| MHD % | MHD ties % | bits right | code-logit acc % |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for k in a.bits:
    p1 = read(os.path.join(a.root, f'llc{k}_p1', 'llc_eval.json'))
    rows = [('LLC', os.path.join(a.root, f'llc{k}_p2'))]
    rows += [(kind, os.path.join(a.root, f'{kind}{k}_p2')) for kind in (*BASELINES, LLC_ON_DET)]
    for name, workdir in rows:
      e = read(os.path.join(workdir, 'llc_eval.json'))
      if not e:
        continue
      print(f'| {k} | {name} | {e["unique_codes"]}/101 | {e["min_class_distance"]} '
            f'| {100 * e["ed_strict_accuracy"]:.2f} | {100 * e["ed_lenient_accuracy"]:.2f} '
            f'| {100 * e["ed_no_match_rate"]:.1f} | {100 * e["mhd_accuracy"]:.2f} '
            f'| {100 * e["mhd_tie_rate"]:.1f} | {e["bits_right"]:.2f} '
            f'| {100 * e["logit_accuracy"]:.2f} |')
    if p1:
      print(f'| {k} | LLC phase 1 | {p1["unique_codes"]}/101 | {p1["min_class_distance"]} '
            f'| class-code accuracy {100 * p1["class_code_accuracy"]:.2f} | | | | | | |')
  print_phase1_codebooks(a)


def initial_codebook(a: argparse.Namespace, bits: int) -> tuple[np.ndarray, tuple]:
  """(phase 1's codebook before training, as launch.main draws it from the config's seed;
  the class names)."""
  import jax
  from configs.llc_caltech101 import get_config
  from training.experiment import Experiment
  from training.state import create_state
  c = get_config(f'phase=1,bits={bits}')
  c.model.backbone_kwargs.width, c.input.image_size = a.width, a.image_size
  exp = Experiment.build(c)
  state = create_state(exp.model, exp.tx, exp.image_shape, exp.shardings, jax.random.key(c.seed))
  return np.asarray(jax.device_get(state.params['head']['codebook'])), exp.info.class_names


def print_phase1_codebooks(a: argparse.Namespace) -> None:
  """What phase 1 did to its starting codebook (N(0, 2/k) or a warm start): distinct codes,
  bits flipped, and the groups of classes sharing a code (kept: exactly the same classes still
  share one code; resolved: the other groups of the start; new: groups the start did not have)."""
  from llc import codes
  groups = lambda book: {tuple(g) for g in codes.shared_codes(book)}
  runs = [(k, 'N(0, 2/k)', f'llc{k}_p1', None) for k in a.bits]
  ws_bits = a.warm_start_bits or a.bits[0]
  runs += [(ws_bits, kind, f'llc{ws_bits}_from_{kind}_p1', f'{kind}{ws_bits}.npy')
           for kind in a.warm_starts]
  print('\n| k | phase-1 start | unique codes: start -> learnt | bits flipped % | shared-code '
        'groups at start: resolved / kept | new groups | class-code acc % | classes sharing a '
        'code, learnt |')
  print('|---|---|---|---|---|---|---|---|')
  draw = functools.lru_cache(lambda k: initial_codebook(a, k))   # one model init per k
  for k, start, workdir, start_file in runs:
    e = read(os.path.join(a.root, workdir, 'llc_eval.json'))
    if not e:
      continue
    init, names = draw(k)
    before = (np.load(os.path.join(a.root, start_file)) if start_file else init) > 0
    after = np.load(os.path.join(a.root, workdir, 'codebook.npy')) > 0
    start_groups, learnt_groups = groups(before), groups(after)
    kept = start_groups & learnt_groups
    shared = '; '.join('/'.join(names[c] for c in g) for g in sorted(learnt_groups)) or '-'
    print(f'| {k} | {start} | {codes.unique_codes(before)} -> {codes.unique_codes(after)} '
          f'| {100 * np.mean(before != after):.1f} | {len(start_groups) - len(kept)} / '
          f'{len(kept)} | {len(learnt_groups - start_groups)} '
          f'| {100 * e["class_code_accuracy"]:.2f} | {shared} |')

if __name__ == '__main__':
  main()
