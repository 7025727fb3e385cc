r"""Out-of-distribution detection: LLC's "no class code matches" against a tuned max-softmax
threshold.

Protocol (the spec's, for small data): train with `ood=F` in the config, which holds out a
seeded fraction F of the classes (`dataset.ood_classes`). The pool is the in-distribution test
split plus every example of the held-out classes (train and test splits: none was trained on).
  - LLC: an instance code that exactly matches no class code is OOD; nothing is tuned.
  - MSP: max softmax probability of a model trained on the same classes (`--det_workdir`, and
    the LLC model's own code posterior); an example is OOD when its MSP < t, with t chosen to
    maximise detection accuracy on n labelled pool examples, for n from 10 to 3000. Each n is
    drawn `--repeats` times (seeded); every method is scored on the pool minus the n tuning
    examples, so all columns see the same examples.

  python -m llc.ood --config=configs/llc_caltech101.py:phase=2,bits=10,phase1=P1,ood=0.25 \
      --workdir=P2 --det_config=configs/llc_caltech101.py:det,ood=0.25 --det_workdir=DET \
      --out=/tmp/ood

Prints a markdown table (and `<out>/ood.json`, `<out>/ood.png`: detection accuracy vs n). On a
cluster every process runs the same command; process 0 prints and writes.
"""
import json
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from llc import codes

SIZES = (10, 30, 100, 300, 1000, 3000)


def best_threshold(scores: np.ndarray, is_ood: np.ndarray) -> float:
  """The t maximising the accuracy of "OOD iff score < t" on these examples (midpoints between
  sorted scores, or +-inf; ties -> the smallest such t)."""
  scores = np.asarray(scores, np.float64)
  is_ood = np.asarray(is_ood, bool)
  order = np.argsort(scores, kind='stable')
  s, ood = scores[order], is_ood[order]
  # Cutting after position i (0..n) flags s[:i] as OOD; only cuts between distinct scores count.
  correct = np.concatenate([[0], np.cumsum(np.where(ood, 1, -1))]) + np.count_nonzero(~ood)
  valid = np.concatenate([[True], s[1:] > s[:-1], [True]])
  best = int(np.argmax(np.where(valid, correct, -1)))
  if best == 0:
    return -np.inf
  if best == len(s):
    return np.inf
  return float((s[best - 1] + s[best]) / 2)


def detection_accuracy(flagged: np.ndarray, is_ood: np.ndarray) -> float:
  return float(np.mean(np.asarray(flagged, bool) == np.asarray(is_ood, bool)))


def compare(llc_flags: np.ndarray, msp: dict, is_ood: np.ndarray,
            sizes: Sequence[int] = SIZES, repeats: int = 20, seed: int = 0) -> list[dict]:
  """Rows per n: mean and std over `repeats` draws of the detection accuracy on the pool minus
  the n tuning examples, for LLC's no-match flags and for each MSP score in `msp` (name ->
  scores) thresholded at `best_threshold` of the n drawn examples."""
  rng = np.random.default_rng(seed)
  n_pool = len(is_ood)
  rows = []
  for n in sizes:
    if n >= n_pool:
      continue
    acc = {name: [] for name in ['llc', *msp]}
    for _ in range(repeats):
      tune = np.zeros(n_pool, bool)
      tune[rng.choice(n_pool, n, replace=False)] = True
      rest = ~tune
      acc['llc'].append(detection_accuracy(llc_flags[rest], is_ood[rest]))
      for name, scores in msp.items():
        t = best_threshold(scores[tune], is_ood[tune])
        acc[name].append(detection_accuracy(scores[rest] < t, is_ood[rest]))
    rows.append({'n': n, **{name: (float(np.mean(v)), float(np.std(v)))
                            for name, v in acc.items()}})
  return rows


def heldout_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose dataset is the held-out classes (labels 0..n-1, unused)."""
  held = config.dataset.ood_classes
  if not held:
    raise ValueError('the config holds out no classes: train and evaluate with the config '
                     'argument ood=F (e.g. ood=0.25)')
  out = ml_collections.ConfigDict(config.to_dict())
  out.dataset.classes = tuple(held)
  out.dataset.num_classes = len(held)
  out.dataset.ood_classes = ()
  out.dataset.label_noise = 0.0
  return out


def pool_sources(config: ml_collections.ConfigDict) -> list:
  """Sources of the held-out classes' examples: their train and eval splits."""
  from input_pipeline.sources import build_source
  held = heldout_config(config)
  return [build_source(held.dataset, split, config.seed, train=False)[0]
          for split in (config.dataset.train_split, config.dataset.eval_split)]


def collect_pool(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict]:
  """Outputs of the model in `workdir` on the in-distribution eval split and on the held-out
  classes ('is_ood' marks the latter), and its restored variables."""
  from evaluation.from_checkpoint import restore_checkpoint
  from llc.evaluate import collect_codes
  exp, variables, _ = restore_checkpoint(config, workdir)
  parts = [collect_codes(exp, variables)]
  parts += [collect_codes(exp, variables, source) for source in pool_sources(config)]
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out['is_ood'] = np.concatenate([np.zeros(len(parts[0]['label']), bool)] +
                                 [np.ones(len(p['label']), bool) for p in parts[1:]])
  return out, variables


def evaluate_ood(config: ml_collections.ConfigDict, workdir: str,
                 det_config: Optional[ml_collections.ConfigDict], det_workdir: Optional[str],
                 phase1_workdir: Optional[str] = None, repeats: int = 20) -> dict:
  """The OOD record of a phase-2 LLC workdir (and a DET workdir trained on the same classes)."""
  if config.model.head != 'llc_instance':
    raise ValueError('llc.ood takes a phase-2 LLC config (model.head llc_instance), got '
                     f'{config.model.head!r}')
  heldout_config(config)   # fails before any restore when nothing is held out
  if det_workdir and det_config is None:
    raise ValueError('--det_workdir needs --det_config (the DET config, with the same ood=F)')
  if det_config is not None:
    for field in ('classes', 'ood_classes'):
      if tuple(det_config.dataset[field]) != tuple(config.dataset[field]):
        raise ValueError(f'--det_config has different dataset.{field} from --config: train both '
                         'with the same ood=F')
  from llc.evaluate import phase2_class_bits
  llc, variables = collect_pool(config, workdir)
  bits = config.model.head_kwargs.bits
  class_bits, _ = phase2_class_bits(config, variables, phase1_workdir)
  _, status = codes.exact_decode(llc['codes'] >= 0, class_bits)
  llc_flags = status == codes.NO_MATCH
  is_ood = llc['is_ood']
  msp = {'msp_llc': llc['msp']}
  if det_workdir:
    det, _ = collect_pool(det_config, det_workdir)
    if not np.array_equal(det['is_ood'], is_ood) or not np.array_equal(det['label'],
                                                                      llc['label']):
      raise ValueError('the DET and LLC pools differ: were both configs built the same way?')
    msp['msp_det'] = det['msp']
  in_dist = ~is_ood
  return {
      'bits': bits, 'num_classes': config.dataset.num_classes,
      'held_out_classes': len(config.dataset.ood_classes),
      'pool': {'in_distribution': int(in_dist.sum()), 'ood': int(is_ood.sum())},
      'llc_no_match_rate': {'in_distribution': float(llc_flags[in_dist].mean()),
                            'ood': float(llc_flags[is_ood].mean())},
      'llc_detection_accuracy': detection_accuracy(llc_flags, is_ood),
      'in_distribution_accuracy': {
          'llc_logits': float(np.mean(llc['prediction'][in_dist] == llc['label'][in_dist])),
          **({'det': float(np.mean(det['prediction'][in_dist] == det['label'][in_dist]))}
             if det_workdir else {})},
      'rows': compare(llc_flags, msp, is_ood, repeats=repeats),
  }


def markdown(record: dict) -> str:
  """The table (detection accuracy, % mean +- std over the draws, per n), the accuracy of a
  constant answer on the pool (the trivial baselines), and `notes`."""
  names = [k for k in record['rows'][0] if k != 'n']
  lines = ['| n tuning samples | ' + ' | '.join(names) + ' |',
           '|---:|' + '---:|' * len(names)]
  for row in record['rows']:
    lines.append(f'| {row["n"]} | ' + ' | '.join(
        f'{100 * row[k][0]:.2f} +- {100 * row[k][1]:.2f}' for k in names) + ' |')
  share = _ood_share(record)
  lines.append(f'trivial baselines: everything OOD {100 * share:.2f}, nothing OOD '
               f'{100 * (1 - share):.2f} (the pool\'s OOD share and its complement)')
  return '\n'.join(lines + [f'note: {n}' for n in notes(record)])


def _ood_share(record: dict) -> float:
  pool = record['pool']
  return pool['ood'] / (pool['ood'] + pool['in_distribution'])


def notes(record: dict) -> list[str]:
  """What the table cannot say by itself: LLC saying 'no match' for most in-distribution
  images (its accuracy is then about the everything-OOD share, not detection), and columns
  that never beat a constant answer by more than a point."""
  out = []
  no_match = record['llc_no_match_rate']['in_distribution']
  share = _ood_share(record)
  if no_match > 0.5:
    out.append(f"LLC finds no matching class code for {100 * no_match:.1f}% of the "
               f"in-distribution images (and {100 * record['llc_no_match_rate']['ood']:.1f}% of "
               f"the OOD ones): its column is close to 'everything OOD' ({100 * share:.2f}), "
               'not a detector; its instance codes rarely hit a class code exactly (train '
               'phase 2 longer, or use fewer bits)')
  trivial = max(share, 1 - share)
  for name in (k for k in record['rows'][0] if k != 'n'):
    best = max(row[name][0] for row in record['rows'])
    if best <= trivial + 0.01:
      out.append(f'{name} never beats a constant answer by more than a point (best '
                 f'{100 * best:.2f} vs {100 * trivial:.2f})')
  return out


def plot(record: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = record['rows']
  n = [r['n'] for r in rows]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in [k for k in rows[0] if k != 'n']:
    mean = np.array([r[name][0] for r in rows])
    std = np.array([r[name][1] for r in rows])
    ax.plot(n, 100 * mean, marker='o', label=name)
    ax.fill_between(n, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
  ax.set_xscale('log')
  ax.set_xlabel('labelled samples used to tune the MSP threshold')
  ax.set_ylabel('OOD detection accuracy (%)')
  ax.set_title(f'{record["held_out_classes"]} held-out classes, {record["bits"]} bits')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv) -> None:
  del argv
  import jax
  from training.distributed import initialize_distributed
  initialize_distributed()
  from training.json_file import write_json
  from training.resolve import resolve   # held-out classes follow from the data's K
  det_config = _DET_CONFIG.value and resolve(_DET_CONFIG.value)
  record = evaluate_ood(resolve(_CONFIG.value), _WORKDIR.value, det_config, _DET_WORKDIR.value,
                        _PHASE1.value, _REPEATS.value)
  if jax.process_index() != 0:
    return
  os.makedirs(_OUT.value, exist_ok=True)
  write_json(os.path.join(_OUT.value, 'ood.json'), record)
  plot(record, os.path.join(_OUT.value, 'ood.png'))
  print(json.dumps({k: v for k, v in record.items() if k != 'rows'}))
  print(markdown(record), flush=True)


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'phase-2 LLC config[:args], ood=F',
                                            lock_config=True)
  _DET_CONFIG = config_flags.DEFINE_config_file('det_config', None, 'DET config, same ood=F',
                                                lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'the phase-2 LLC workdir')
  _DET_WORKDIR = flags.DEFINE_string('det_workdir', None, 'a DET workdir for the MSP baseline')
  _PHASE1 = flags.DEFINE_string('phase1_workdir', None,
                                "decode against this phase-1 workdir's codebook.npy")
  _REPEATS = flags.DEFINE_integer('repeats', 20, 'draws of the tuning samples per n')
  _OUT = flags.DEFINE_string('out', '/tmp/llc_ood', 'where ood.json and ood.png go')
  flags.mark_flags_as_required(['config', 'workdir'])
  from training import cli   # --config / --det_config default to their workdirs' config.json
  cli.run(main, {'config': 'workdir', 'det_config': 'det_workdir'})
