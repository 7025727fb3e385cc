"""benchmarks/frozen_features.py: extracted features are the model's backbone outputs (checked
against a direct `Classifier.features` call), and a head trained on features matches
scikit-learn's logistic regression on separable data and is seeded."""
import os
import sys
import types

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, last_json, load_benchmark, load_config, run_main, run_module

frozen_features = load_benchmark('frozen_features')


def _args(**kw):
  base = dict(epochs=20, batch=32, lr=1e-2, factors=2, samples=8, seeds=1, out='')
  base.update(kw)
  return types.SimpleNamespace(**base)


def _blobs(n, seed):
  rng = np.random.default_rng(seed)
  centres = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]], np.float32)
  labels = rng.integers(0, 3, n)
  return (centres[labels] + rng.normal(size=(n, 4))).astype(np.float32), labels


def test_det_head_on_features_matches_logistic_regression():
  from sklearn.linear_model import LogisticRegression
  x, y = _blobs(600, 0)
  xt, yt = _blobs(600, 1)
  data = {'train_features': x, 'train_labels': y, 'test_features': xt, 'test_labels': yt,
          'train_probs': np.full((600, 3), 1 / 3, np.float32)}
  result = frozen_features.train_head(data, y, 'det', 0, _args())
  oracle = LogisticRegression(max_iter=1000).fit(x, y)
  assert result['accuracy'] >= oracle.score(xt, yt) - 0.02
  probs = oracle.predict_proba(xt)
  oracle_nll = float(np.mean(-np.log(probs[np.arange(600), yt])))
  assert result['nll'] < oracle_nll + 0.05
  again = frozen_features.train_head(data, y, 'det', 0, _args())
  assert again['accuracy'] == result['accuracy'] and again['nll'] == result['nll']
  hetxl = frozen_features.train_head(data, y, 'hetxl', 0, _args(epochs=3))
  assert len(hetxl['temperature_per_epoch']) == 3 and 0.05 < hetxl['temperature'] < 5.0


def test_extracted_features_are_the_backbone_outputs(tmp_path):
  from evaluation.from_checkpoint import restore_checkpoint
  from input_pipeline.pipeline import preprocess
  from input_pipeline.sources import build_source
  work, out = tmp_path / 'w', tmp_path / 'f.npz'
  run_main('--config=configs/quickstart.py:runlocal', f'--workdir={work}',
           '--config.train.num_steps=10')
  proc = run_module('benchmarks.frozen_features', '--mode=extract',
                    '--config=configs/quickstart.py:runlocal', f'--workdir={work}',
                    f'--features={out}')
  summary = last_json(proc.stdout)
  data = np.load(out)
  config = load_config('quickstart.py', 'runlocal')
  exp, variables, _ = restore_checkpoint(config, str(work))
  for split, name in ((config.dataset.train_split, 'train'), (config.dataset.eval_split, 'test')):
    source, _ = build_source(config.dataset, split, config.seed, train=False)
    assert data[f'{name}_features'].shape[0] == len(source) == len(data[f'{name}_labels'])
    idx = [0, len(source) // 2, len(source) - 1]
    images = np.stack([preprocess(source[i], None, eval_mode=config.input.eval_preprocess,
                                  image_size=config.input.image_size,
                                  channels=config.dataset.channels)['image'] for i in idx])
    direct = exp.model.apply(jax.device_get(variables), images, train=False,
                             method=type(exp.model).features)
    np.testing.assert_allclose(data[f'{name}_features'][idx], direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data[f'{name}_labels'][idx], [source[i]['label'] for i in idx])
  np.testing.assert_allclose(data['train_probs'].sum(1), 1.0, rtol=1e-5)
  assert summary['train_accuracy'] == pytest.approx(
      np.mean(data['train_probs'].argmax(1) == data['train_labels']))


def test_set_overrides_reach_the_head_and_typos_are_errors():
  """--set (the ablations' switch): values are typed, a fixed temperature stays fixed (no learnt
  tau is logged), and a field the config lacks is an error naming it."""
  assert frozen_features.parse_overrides(
      ['model.head_kwargs.temperature_bounds=(0.3, 3.0)', 'model.head_kwargs.link=softmax',
       'model.head_kwargs.learn_temperature=False']) == {
           'model.head_kwargs.temperature_bounds': (0.3, 3.0),
           'model.head_kwargs.link': 'softmax', 'model.head_kwargs.learn_temperature': False}
  c = frozen_features.head_config('hetxl', 3, _args(set=['model.head_kwargs.num_factors=4']))
  assert c.model.head_kwargs.num_factors == 4
  with pytest.raises(ValueError, match="no field 'num_factor'"):
    frozen_features.head_config('hetxl', 3, _args(set=['model.head_kwargs.num_factor=4']))
  with pytest.raises(ValueError, match='expected key=value'):
    frozen_features.parse_overrides(['model.head_kwargs.num_factors'])
  x, y = _blobs(300, 0)
  data = {'train_features': x, 'train_labels': y, 'test_features': x, 'test_labels': y,
          'train_probs': np.full((300, 3), 1 / 3, np.float32)}
  fixed = frozen_features.train_head(data, y, 'hetxl', 0, _args(epochs=1, set=[
      'model.head_kwargs.learn_temperature=False', 'model.head_kwargs.temperature=1.5']))
  assert fixed['temperature'] is None
