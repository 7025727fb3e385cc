r"""Per-class accuracy and the confusion matrix of a trained single-label model.

  python -m evaluation.confusion --workdir=W [--worst=10] [--max_examples=N]

The model in workdir W (latest checkpoint, its saved config) predicts the eval split: the
argmax of its eval logits, the shared evaluator's top-1. Prints the accuracy of the `--worst`
classes (lowest first, with each one's most frequent wrong answer) beside the overall
accuracy and the chance baseline 1/K, and writes `W/confusion.json` ({'matrix' [K, K]: row =
true class, column = prediction, counts; 'per_class_accuracy' [K], null for a class without
eval images; 'class_names'}) and `W/confusion.png` (rows normalised to 1; up to
`MAX_PLOTTED` classes, the worst ones beyond that). Class names: W/classes.json, else ids.
"""
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

MAX_PLOTTED = 100


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Counts [K, K] int64: entry (i, j) = examples of class i predicted as j."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
  return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
  """[K] float: the diagonal over the row sums; NaN for a class with no examples."""
  rows = matrix.sum(1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(rows > 0, np.diag(matrix) / np.maximum(rows, 1), np.nan)


def report(matrix: np.ndarray, names: Sequence[str], worst: int = 10) -> str:
  """Overall accuracy and chance, then one line per class of the `worst` lowest accuracies:
  accuracy, images, and its most frequent wrong prediction."""
  k, acc = len(matrix), per_class_accuracy(matrix)
  total = matrix.sum()
  lines = [f'accuracy {np.trace(matrix) / max(total, 1):.4f} over {total} images, {k} classes '
           f'(chance 1/{k} = {1 / k:.4f}); the {min(worst, k)} worst classes:',
           '| class | accuracy | images | most often taken for |', '|---|---:|---:|---|']
  for i in np.argsort(np.where(np.isnan(acc), np.inf, acc), kind='stable')[:worst]:
    wrong = matrix[i].copy()
    wrong[i] = 0
    taken = (f'{names[int(wrong.argmax())]} ({int(wrong.max())})' if wrong.max() > 0 else '-')
    cell = '-' if np.isnan(acc[i]) else f'{acc[i]:.4f}'
    lines.append(f'| {names[i]} | {cell} | {int(matrix[i].sum())} | {taken} |')
  return '\n'.join(lines)


def plot(matrix: np.ndarray, names: Sequence[str], path: str, title: str) -> None:
  """The row-normalised matrix as a PNG (the `MAX_PLOTTED` worst classes when there are more)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  keep = np.arange(len(matrix))
  if len(keep) > MAX_PLOTTED:
    acc = per_class_accuracy(matrix)
    keep = np.sort(np.argsort(np.where(np.isnan(acc), np.inf, acc), kind='stable')[:MAX_PLOTTED])
    title += f' ({MAX_PLOTTED} worst classes)'
  shown = matrix[np.ix_(keep, keep)].astype(np.float64)
  shown /= np.maximum(matrix[keep].sum(1, keepdims=True), 1)
  side = min(12, 3 + 0.25 * len(keep))
  fig, ax = plt.subplots(figsize=(side, side))
  image = ax.imshow(shown, vmin=0, vmax=1, cmap='Blues')
  if len(keep) <= 40:
    ax.set_xticks(range(len(keep)), [names[i] for i in keep], rotation=90)
    ax.set_yticks(range(len(keep)), [names[i] for i in keep])
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title)
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def class_names(workdir: str, num_classes: int) -> list[str]:
  """The model's class names (`training.workdir.CLASSES_FILE`), else '0'..'K-1'."""
  from training.workdir import CLASSES_FILE
  path = os.path.join(workdir, CLASSES_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      names = [str(n) for n in json.load(f)['class_names']]
    if len(names) == num_classes:
      return names
  return [str(i) for i in range(num_classes)]


def evaluate_confusion(config, workdir: str, step: Optional[int] = None) -> dict:
  """The confusion record of `workdir`'s model on its eval split (module docstring). Raises
  ValueError for a multi-label config (a confusion matrix needs one label per image)."""
  from evaluation.collect import collect
  from evaluation.from_checkpoint import restore_checkpoint
  if config.dataset.multi_label:
    raise ValueError('evaluation.confusion needs single-label data; this config is '
                     'multi-label (dataset.multi_label)')
  exp, variables, step = restore_checkpoint(config, workdir, step)
  predict = lambda m, x: {'prediction': m.head(m.features(x, train=False),
                                                 train=False).logits.argmax(-1)}
  out = collect(exp, variables, predict)
  k = config.dataset.num_classes
  matrix = confusion_matrix(out['label'], out['prediction'], k)
  acc = per_class_accuracy(matrix)
  return {'step': int(step), 'num_examples': int(matrix.sum()),
          'accuracy': float(np.trace(matrix) / max(matrix.sum(), 1)),
          'class_names': class_names(workdir, k), 'matrix': matrix.tolist(),
          'per_class_accuracy': [None if np.isnan(a) else float(a) for a in acc]}


def main(argv) -> None:
  del argv
  from training.json_file import write_json
  from training.workdir import load_config
  config = load_config(_WORKDIR.value)
  if _MAX.value:
    config.eval.max_examples = _MAX.value
  record = evaluate_confusion(config, _WORKDIR.value)
  if jax.process_index() == 0:
    matrix, names = np.array(record['matrix']), record['class_names']
    print(report(matrix, names, _WORST.value), flush=True)
    write_json(os.path.join(_WORKDIR.value, 'confusion.json'), record)
    run = os.path.basename(os.path.normpath(os.path.abspath(_WORKDIR.value)))
    plot(matrix, names, os.path.join(_WORKDIR.value, 'confusion.png'),
         f'{run}, step {record["step"]}: accuracy {record["accuracy"]:.4f}')


if __name__ == '__main__':
  from absl import flags
  _WORKDIR = flags.DEFINE_string('workdir', None, 'the trained workdir')
  _WORST = flags.DEFINE_integer('worst', 10, 'classes listed, lowest accuracy first')
  _MAX = flags.DEFINE_integer('max_examples', 0, 'eval images at most (0: the config\'s)')
  flags.mark_flags_as_required(['workdir'])
  from training import cli   # quiet library logs; a ValueError here is a user's mistake: one line
  cli.run(main, {}, user_errors_too=(ValueError,))
