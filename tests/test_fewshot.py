"""The few-shot probe (big_vision's closed-form least squares) against numpy and scikit-learn."""
import numpy as np
import pytest
from sklearn.linear_model import Ridge, RidgeClassifier

from evaluation import fewshot


@pytest.mark.parametrize('n, d', [(40, 6), (5, 30)])   # primal and dual forms
def test_ridge_equals_augmented_least_squares(n, d):
  """(x^T x + l2 I)^-1 x^T y is the least-squares solution of [x; sqrt(l2) I] W = [y; 0]."""
  rng = np.random.default_rng(n)
  x, y, l2 = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), 0.7
  want = np.linalg.lstsq(np.vstack([x, np.sqrt(l2) * np.eye(d)]),
                         np.vstack([y, np.zeros((d, 3))]), rcond=None)[0]
  np.testing.assert_allclose(fewshot.ridge_weights(x, y, l2), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('shots', [1, 5])
def test_probe_equals_sklearn_ridge_and_ridge_classifier(shots):
  rng = np.random.default_rng(shots)
  k, d = 4, 12
  centres = rng.normal(size=(k, d)) * 2
  train_y = np.repeat(np.arange(k), shots)
  train_x = centres[train_y] + rng.normal(size=(len(train_y), d))
  test_y = rng.integers(0, k, 200)
  test_x = centres[test_y] + rng.normal(size=(200, d))
  l2 = 2.0**10 if shots > 1 else 3.0
  mean, std, w = fewshot.fit_probe(train_x, train_y, k, l2)
  np.testing.assert_allclose(mean, train_x.mean(0, keepdims=True))
  np.testing.assert_allclose(std, train_x.std(0, keepdims=True) + 1e-5)
  inputs = fewshot.probe_inputs(train_x, mean, std)
  targets = 2.0 * np.eye(k)[train_y] - 1.0
  ridge = Ridge(alpha=l2, fit_intercept=False).fit(inputs, targets)
  np.testing.assert_allclose(w, ridge.coef_.T, rtol=1e-6, atol=1e-9)
  clf = RidgeClassifier(alpha=l2, fit_intercept=False).fit(inputs, train_y)  # +-1 targets too
  np.testing.assert_allclose(w, clf.coef_.T, rtol=1e-6, atol=1e-9)
  test_inputs = fewshot.probe_inputs(test_x, mean, std)
  acc = fewshot.probe_accuracy(train_x, train_y, test_x, test_y, k, l2)
  assert acc == pytest.approx(np.mean(clf.predict(test_inputs) == test_y), abs=1e-12)
  assert acc > 0.5     # the separated classes are found


def test_draw_shots_per_class_and_seeded():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
  idx = fewshot.draw_shots(labels, 3, 5, seed=0)
  assert np.bincount(labels[idx], minlength=3).tolist() == [5, 3, 5]  # class 1 has only 3
  assert len(set(idx.tolist())) == len(idx)
  np.testing.assert_array_equal(idx, fewshot.draw_shots(labels, 3, 5, seed=0))
  assert not np.array_equal(idx, fewshot.draw_shots(labels, 3, 5, seed=1))
  # the 1-shot draw is the first of the same per-class permutation (nested draws)
  one = fewshot.draw_shots(labels, 3, 1, seed=0)
  assert set(one.tolist()) <= set(idx.tolist())


def test_shot_notes_say_when_a_shot_count_cannot_be_honoured():
  """Issue 28 point 4: 15 images per class cannot give 25 shots; every seed then draws the
  same images (checked on draw_shots itself), which the note says; a 5-shot draw with one
  class of 3 images names that class count; an honoured setting gets no note."""
  balanced = np.repeat(np.arange(4), 15)
  notes = fewshot.shot_notes(balanced, 4, (1, 5, 15, 25), seeds=3)
  assert notes[0] == ('15-shot: every class has exactly 15 training images, so the 3 seeds '
                      'draw the same images')
  assert len(notes) == 2 and notes[1].startswith('25-shot: no class has more than 15 ')
  assert 'the 3 seeds draw the same images' in notes[1]
  draws = [np.sort(fewshot.draw_shots(balanced, 4, 25, seed=s)) for s in range(3)]
  assert all(np.array_equal(d, np.arange(60)) for d in draws)
  uneven = np.array([0] * 10 + [1] * 3 + [2] * 7)
  assert fewshot.shot_notes(uneven, 3, (1, 3, 5), seeds=2) == [
      '5-shot: 1 of 3 classes have fewer than 5 training images (fewest 3); they use all '
      'they have']
