r"""Few-shot linear probes on frozen pre-logits, big_vision's way (`evaluators/fewshot_lsr.py`).

  python -m evaluation.fewshot --workdir=W --data_dir=.data/caltech101 \
      [--shots=1,5,10,25] [--seeds=3] [--l2_reg=1024] [--max_test=0] [--name=caltech101]

The model in workdir W (latest checkpoint, its saved config) embeds images of the prepared
dataset at `--data_dir` (any dataset, resized to the model's input size) into its pre-logits:
the backbone features [N, D] every head receives. For each seed s and each n in `--shots`, n
training images per class are drawn (per class, a permutation seeded by s; the first n), and a
least-squares classifier is solved in closed form on them:
  features whitened by the mean and std of the n*K drawn examples (std + 1e-5), a constant
  feature 100 appended (the bias, almost unregularised), targets one-hot in {-1, +1},
  W = argmin |X W - Y|^2 + l2 |W|^2 = (X^T X + l2 I)^-1 X^T Y (or X^T (X X^T + l2 I)^-1 Y when
  there are fewer examples than dimensions), prediction argmax_k (x W)_k;
scored by top-1 accuracy on the whole test split (`--max_test` caps it, a seeded subset). As
big_vision: fixed l2 = 2^10, seeds 0..2, shots 1/5/10/25 (a class with fewer training images
than n uses all it has, and the record's `notes` say so). `majority_baseline`: the accuracy
of always answering the test split's most common class. Prints one JSON line, writes `W/fewshot_<name>.json` and TensorBoard
scalars `fewshot/<name>_<n>shot` (mean over seeds) at the checkpoint's step.
"""
import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from evaluation.collect import collect, prepared_dataset

BIAS_CONSTANT = 100.0


def probe_inputs(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Whitened features with the bias column: [N, D] -> [N, D + 1]."""
  x = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def ridge_weights(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
  """argmin_W |x W - y|^2 + l2 |W|^2 for x [N, D], y [N, C]: (x^T x + l2 I)^-1 x^T y, solved
  in the smaller of the two dimensions (the dual form x^T (x x^T + l2 I)^-1 y when N < D)."""
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)
  return x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), y)


def fit_probe(x: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> tuple:
  """(mean, std, W [D + 1, K]) of the big_vision least-squares probe on features x [N, D]."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
  y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  return mean, std, ridge_weights(probe_inputs(x, mean, std), y, l2)


def probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int, l2: float) -> float:
  """Top-1 accuracy on (test_x, test_y) of the probe fitted on (train_x, train_y)."""
  mean, std, w = fit_probe(train_x, train_y, num_classes, l2)
  return float(np.mean(np.argmax(probe_inputs(test_x, mean, std) @ w, 1) == test_y))


def draw_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` examples per class: per class a permutation seeded by `seed`, the first
  `shots` of it (all of a class that has fewer), as big_vision draws them."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
  return np.concatenate([idx[:shots] for idx in per_class])


def shot_notes(labels: np.ndarray, num_classes: int, shots: Sequence[int],
               seeds: int) -> list[str]:
  """A line for each n in `shots` that the training labels cannot honour: classes with fewer
  than n images use all they have, and when no class has more than n, every seed draws
  the same images (the n-shot result is then a whole-train-split result)."""
  counts = np.bincount(np.asarray(labels), minlength=num_classes)
  out = []
  for n in shots:
    if counts.max() <= n and n > counts.min():
      out.append(f'{n}-shot: no class has more than {counts.max()} training images (fewest '
                 f'{counts.min()}), so every class uses all it has: this is the whole train '
                 f'split, not {n} per class, and the {seeds} seeds draw the same images')
    elif counts.min() < n:
      out.append(f'{n}-shot: {int((counts < n).sum())} of {num_classes} classes have fewer '
                 f'than {n} training images (fewest {counts.min()}); they use all they have')
    elif counts.max() == n and seeds > 1:
      out.append(f'{n}-shot: every class has exactly {n} training images, so the {seeds} '
                 'seeds draw the same images')
  return out


class _Take:
  """The examples of `source` at `indices`, in that order."""

  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    return self._source[int(self._indices[i])]


def evaluate_fewshot(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                     shots: Sequence[int] = (1, 5, 10, 25), seeds: int = 3,
                     l2: float = 2.0**10, max_test: int = 0, name: str = '') -> dict:
  """The few-shot record of `workdir`'s model on the prepared dataset at `data_dir`."""
  from evaluation.from_checkpoint import restore_checkpoint
  from input_pipeline.sources import Subset, build_source
  ds = prepared_dataset(config, data_dir)
  k = ds.num_classes
  train, _ = build_source(ds, ds.train_split, config.seed, train=False)
  test, _ = build_source(ds, ds.eval_split, config.seed, train=False)
  if max_test:
    test = Subset(test, max_test)
  labels = np.array([train[i]['label'] for i in range(len(train))])
  draws = {(s, n): draw_shots(labels, k, n, s) for s in range(seeds) for n in shots}
  needed = np.unique(np.concatenate(list(draws.values())))   # embed each drawn image once

  exp, variables, step = restore_checkpoint(config, workdir)
  embed = lambda m, x: {'pre_logits': m.features(x, train=False)}
  side = exp.image_shape[0]
  train_out = collect(exp, variables, embed, _Take(train, needed), image_size=side)
  test_out = collect(exp, variables, embed, test, image_size=side)
  row = {int(i): r for r, i in enumerate(needed)}
  results = {}
  for (s, n), idx in draws.items():
    rows = [row[int(i)] for i in idx]
    results.setdefault(n, []).append(probe_accuracy(
        train_out['pre_logits'][rows], train_out['label'][rows], test_out['pre_logits'],
        test_out['label'], k, l2))
  name = name or os.path.basename(os.path.normpath(data_dir))
  majority = np.bincount(test_out['label'], minlength=k).max() / len(test_out['label'])
  return {'step': int(step), 'dataset': name, 'data_dir': data_dir, 'num_classes': k,
          'num_test': int(len(test_out['label'])), 'l2_reg': l2, 'seeds': seeds,
          'majority_baseline': float(majority), 'notes': shot_notes(labels, k, shots, seeds),
          'pre_logits_dim': int(test_out['pre_logits'].shape[1]),
          **{f'{name}_{n}shot': float(np.mean(v)) for n, v in results.items()},
          **{f'{name}_{n}shot_per_seed': v for n, v in results.items()},
          'definition': 'top-1 accuracy of a closed-form least-squares probe (big_vision '
                        'fewshot_lsr) on frozen pre-logits, mean over seeds'}


def main(argv) -> None:
  del argv
  from training.workdir import load_config
  from training.json_file import write_json
  from training.metric_writer import MetricWriter
  config = load_config(_WORKDIR.value)
  record = evaluate_fewshot(config, _WORKDIR.value, _DATA_DIR.value,
                            [int(n) for n in _SHOTS.value], _SEEDS.value, _L2.value,
                            _MAX_TEST.value, _NAME.value)
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)
    for note in record['notes']:
      print(f'note: {note}', flush=True)
    write_json(os.path.join(_WORKDIR.value, f"fewshot_{record['dataset']}.json"), record)
    writer = MetricWriter(_WORKDIR.value)
    writer.write(record['step'], {f'fewshot/{k}': v for k, v in record.items()
                                  if k.endswith('shot')})
    writer.close()


if __name__ == '__main__':
  from absl import flags
  _WORKDIR = flags.DEFINE_string('workdir', None, 'the trained workdir')
  _DATA_DIR = flags.DEFINE_string('data_dir', None, 'a prepared dataset (launch.prepare_data)')
  _SHOTS = flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'training images per class')
  _SEEDS = flags.DEFINE_integer('seeds', 3, 'draws of the training images (seeds 0..n-1)')
  _L2 = flags.DEFINE_float('l2_reg', 2.0**10, 'ridge regularisation (big_vision: 2^10)')
  _MAX_TEST = flags.DEFINE_integer('max_test', 0, 'test images at most (0: all)')
  _NAME = flags.DEFINE_string('name', '', 'dataset name in the results (default: the dir name)')
  flags.mark_flags_as_required(['workdir', 'data_dir'])

  from training import cli   # quiet library logs; a ValueError here is a user's mistake: one line
  cli.run(main, {}, user_errors_too=(ValueError,))
