"""Per-class accuracy and the confusion matrix (evaluation/confusion.py, issue 28 point 5):
brute-force counts on constructed labels, and a trained workdir's matrix against its own
eval_results.json (the shared evaluator, another code path)."""
import json

import numpy as np

from evaluation import confusion


def test_confusion_matrix_and_worst_classes_against_brute_force():
  rng = np.random.default_rng(0)
  labels, predictions = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
  labels[labels == 3] = 2   # class 3 has no images
  m = confusion.confusion_matrix(labels, predictions, 4)
  brute = np.zeros((4, 4), int)
  for y, p in zip(labels, predictions):
    brute[y, p] += 1
  np.testing.assert_array_equal(m, brute)
  acc = confusion.per_class_accuracy(m)
  np.testing.assert_allclose(acc[:3], [np.mean(predictions[labels == k] == k) for k in range(3)])
  assert np.isnan(acc[3])
  lines = confusion.report(m, ['a', 'b', 'c', 'd'], worst=2).splitlines()
  assert lines[0].startswith(f'accuracy {np.mean(labels == predictions):.4f} over 200 images, 4 '
                             'classes (chance 1/4 = 0.2500)')
  worst = int(np.argmin(acc[:3]))
  wrong = brute[worst].copy()
  wrong[worst] = 0
  assert lines[3] == (f'| {"abc"[worst]} | {acc[worst]:.4f} | {brute[worst].sum()} | '
                      f'{"abcd"[wrong.argmax()]} ({wrong.max()}) |')
  assert len(lines) == 5


def test_a_workdirs_matrix_agrees_with_its_eval_results(tmp_path):
  from launch.train import train_and_evaluate
  from tests.helpers import load_config
  c = load_config('quickstart.py', 'runlocal')
  c.train.num_steps, c.train.async_checkpointing = 2, False
  train_and_evaluate(c, str(tmp_path))
  record = confusion.evaluate_confusion(c, str(tmp_path))
  with open(tmp_path / 'eval_results.json') as f:
    evaluated = json.load(f)
  matrix = np.array(record['matrix'])
  assert matrix.shape == (10, 10) and matrix.sum() == evaluated['num_examples']
  assert record['accuracy'] == np.trace(matrix) / matrix.sum()
  assert abs(record['accuracy'] - evaluated['accuracy']) < 1e-6
  confusion.plot(matrix, record['class_names'], str(tmp_path / 'c.png'), 'run')
  assert (tmp_path / 'c.png').stat().st_size > 1000
