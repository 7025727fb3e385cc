r"""Nested codebooks: m-bit sub-codebooks of a phase-2 model trained at k bits, vs training at m.

Collects the instance codes of `--workdir` (a phase-2 workdir trained at k bits) on the eval
split once, then for each m of `--sizes` and each bit selection of `llc.nested` (prefix: the
first m bits; greedy: most unique codes, then largest min distance, then largest mean distance)
decodes with the same m bits of class and instance codes. `--trained=m=DIR` (repeatable) adds a
'trained at m' row from DIR/llc_eval.json, a phase-2 workdir trained at m bits and evaluated by
`llc.evaluate`. Class codes: `--phase1_workdir`'s codebook.npy, else the checkpoint's. Accepts
`--config.*` overrides like `llc.evaluate`. Prints a markdown table.

On the scaled-down Caltech-101 runs of `benchmarks/llc_codebooks.py` (k = 14 -> 7, 10):
  python benchmarks/llc_nested.py \
      --config=configs/llc_caltech101.py:phase=2,bits=14,phase1=/tmp/llc_bench/llc14_p1 \
      --workdir=/tmp/llc_bench/llc14_p2 --phase1_workdir=/tmp/llc_bench/llc14_p1 \
      --config.model.backbone_kwargs.width=0.25 --config.input.image_size=32 --sizes=7,10 \
      --trained=7=/tmp/llc_bench/llc7_p2 --trained=10=/tmp/llc_bench/llc10_p2
The paper's question (a 30-bit codebook, 20 and 25 bits for free), on CIFAR-10:
  python benchmarks/llc_nested.py --config=configs/llc_cifar10.py:phase=2,bits=30,phase1=P1_30 \
      --workdir=P2_30 --phase1_workdir=P1_30 --sizes=20,25 --trained=20=P2_20 --trained=25=P2_25
"""
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from llc import nested  # noqa: E402

METHODS = {'prefix': lambda class_bits, m: nested.prefix_bits(class_bits.shape[1], m),
           'greedy': nested.greedy_bits}


def instance_codes(config: ml_collections.ConfigDict, workdir: str,
                   phase1_workdir: Optional[str] = None) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
  """(instance bits [N, k], labels [N], class bits [L, k]) of a phase-2 workdir's eval split."""
  from evaluation.from_checkpoint import restore_checkpoint
  from llc.evaluate import collect_codes, phase2_class_bits
  if config.model.head != 'llc_instance':
    sys.exit(f'error: {config.model.head!r} is not the phase-2 head llc_instance: --config must '
             'be the phase-2 config of --workdir')
  exp, variables, _ = restore_checkpoint(config, workdir)
  out = collect_codes(exp, variables)
  class_bits, _ = phase2_class_bits(config, variables, phase1_workdir)
  return out['codes'] >= 0, out['label'], class_bits


def parse_trained(values: list[str], k: int) -> dict[int, dict]:
  """{m: llc_eval.json record} from `m=DIR` flag values."""
  out = {}
  for value in values:
    size, sep, workdir = value.partition('=')
    if not sep or not size.isdigit():
      sys.exit(f'error: --trained takes m=DIR (a phase-2 workdir trained at m bits), got {value!r}')
    path = os.path.join(workdir, 'llc_eval.json')
    if not os.path.isfile(path):
      sys.exit(f'error: {path} does not exist; evaluate that workdir with llc.evaluate first')
    with open(path) as f:
      record = json.load(f)
    if record.get('phase') != 2 or record.get('bits') != int(size):
      sys.exit(f'error: {path} is phase {record.get("phase")} at {record.get("bits")} bits, not '
               f'a phase-2 run at m = {size} bits')
    if int(size) > k:
      sys.exit(f'error: --trained m = {size} is more than the {k} bits of --workdir')
    out[int(size)] = record
  return out


def row(m, method: str, metrics: dict, num_classes: int, kept: str = '') -> str:
  return (f'| {m} | {method} | {metrics["unique_codes"]}/{num_classes} '
          f'| {metrics["min_class_distance"]} | {100 * metrics["ed_strict_accuracy"]:.2f} '
          f'| {100 * metrics["mhd_accuracy"]:.2f} | {100 * metrics["mhd_tie_rate"]:.2f} '
          f'| {metrics["bits_right"]:.2f} | {kept} |')


def table(inst_bits: np.ndarray, labels: np.ndarray, class_bits: np.ndarray, sizes: list[int],
          trained: dict[int, dict]) -> list[str]:
  num_classes, k = class_bits.shape
  lines = ['| m | bits from | unique codes | min dist | strict ED % | MHD % | MHD ties % '
           '| bits right | bits kept |', '|---|---|---|---|---|---|---|---|---|',
           row(k, f'all {k} (trained at k)',
               nested.sub_metrics(inst_bits, labels, class_bits, np.arange(k)), num_classes)]
  for m in sizes:
    for method, select in METHODS.items():
      indices = select(class_bits, m)
      lines.append(row(m, f'{method} of {k}',
                       nested.sub_metrics(inst_bits, labels, class_bits, indices), num_classes,
                       ' '.join(map(str, indices))))
    if m in trained:
      lines.append(row(m, f'trained at {m}', trained[m], num_classes))
  return lines


def main(argv) -> None:
  del argv
  from training.resolve import resolve
  config = resolve(_CONFIG.value)
  k = config.model.head_kwargs.bits
  sizes = [int(m) for m in _SIZES.value]
  if any(not 1 <= m <= k for m in sizes):
    sys.exit(f'error: --sizes must lie in 1..{k} (the bits of --workdir), got {sizes}')
  trained = parse_trained(_TRAINED.value, k)
  sizes = sorted(set(sizes) | set(trained))
  inst_bits, labels, class_bits = instance_codes(config, _WORKDIR.value, _PHASE1.value or None)
  print(f'{_WORKDIR.value}: {len(labels)} eval examples, {class_bits.shape[0]} classes, '
        f'k = {k}\n', flush=True)
  print('\n'.join(table(inst_bits, labels, class_bits, sizes, trained)), flush=True)


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'phase-2 config of --workdir (k bits)',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'phase-2 workdir trained at k bits')
  _PHASE1 = flags.DEFINE_string('phase1_workdir', None, 'phase-1 workdir whose codebook.npy '
                                'holds the class codes (default: the checkpoint\'s)')
  _SIZES = flags.DEFINE_list('sizes', [], 'sub-codebook sizes m, comma separated')
  _TRAINED = flags.DEFINE_multi_string('trained', [], 'm=DIR: phase-2 workdir trained at m '
                                       'bits, with its llc_eval.json (repeatable)')
  flags.mark_flags_as_required(['config', 'workdir', 'sizes'])
  from training import cli   # --config defaults to the workdir's config.json
  cli.run(main)
