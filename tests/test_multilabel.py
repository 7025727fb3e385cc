"""Multi-label data through the heads, the trainer and the evaluator, against numpy oracles."""
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from evaluation.evaluator import mean_average_precision, multi_hot
from heads.base import (class_targets, has_label, sigmoid_cross_entropy, softmax_cross_entropy,
                        top1_correct)
from input_pipeline import records
from input_pipeline.sources import LabelError, build_source
from tests.helpers import last_json, load_config, run_main

K = 12


def _label_sets(rng, batch=9, width=4):
  """Padded label sets with duplicates, empty sets and full rows."""
  labels = np.full((batch, width), -1, np.int32)
  for b in range(batch):
    n = b % (width + 1)
    labels[b, :n] = rng.integers(0, K, n)
  labels[1, :2] = [5, 5]            # a duplicate counts once
  return labels


def _numpy_multi_hot(labels):
  out = np.zeros((len(labels), K), np.float32)
  for b, row in enumerate(labels):
    for k in row:
      if k >= 0:
        out[b, k] = 1.0
  return out


# ------------------------------------------------------------------------ targets and losses


def test_targets_top1_and_labelled_against_numpy():
  rng = np.random.default_rng(0)
  labels = _label_sets(rng)
  logits = rng.normal(size=(len(labels), K)).astype(np.float32)
  y = _numpy_multi_hot(labels)
  np.testing.assert_array_equal(class_targets(jnp.asarray(labels), K), y)
  top = logits.argmax(-1)
  np.testing.assert_array_equal(top1_correct(jnp.asarray(logits), jnp.asarray(labels)),
                                y[np.arange(len(y)), top])
  np.testing.assert_array_equal(has_label(jnp.asarray(labels)), y.sum(1) > 0)
  ints = rng.integers(0, K, 7).astype(np.int32)      # single labels: one-hot
  np.testing.assert_array_equal(class_targets(jnp.asarray(ints), K), np.eye(K)[ints])


def test_multi_hot_with_classes_sharded_over_model():
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (fake) devices')
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  labels = _label_sets(np.random.default_rng(1), batch=8)
  fn = jax.jit(lambda l: class_targets(l, K), in_shardings=NamedSharding(mesh, P('data')),
               out_shardings=NamedSharding(mesh, P('data', 'model')))
  np.testing.assert_array_equal(fn(labels), _numpy_multi_hot(labels))


def test_sigmoid_and_softmax_losses_equal_numpy():
  rng = np.random.default_rng(2)
  labels = _label_sets(rng)
  logits = rng.normal(size=(len(labels), K)).astype(np.float32) * 3
  y = _numpy_multi_hot(labels)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  for a in (0.0, 1e-4):   # the ImageNet-21k recipe's 0.9999 / 0.0001 targets
    t = y * (1 - a) + (1 - y) * a
    want = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum(1)
    np.testing.assert_allclose(sigmoid_cross_entropy(logits, labels, a), want, rtol=1e-5)
  log_softmax = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
  normalised = y / np.maximum(y.sum(1, keepdims=True), 1)
  np.testing.assert_allclose(softmax_cross_entropy(logits, labels),
                             -(normalised * log_softmax).sum(1), rtol=1e-5, atol=1e-6)
  assert float(softmax_cross_entropy(logits, labels)[0]) == 0.0   # empty set: no loss


@pytest.mark.parametrize('kind', ['hetxl', 'het'])
def test_heteroscedastic_sigmoid_loss_on_label_sets_equals_numpy_mc(kind):
  """The head's MC sigmoid loss with label sets equals the numpy BCE of mean_s sigmoid(u_s / tau)
  over the head's own samples u_s (drawn with the same rngs)."""
  from hetxl.heads import HETHead, HETXLHead
  cls = HETXLHead if kind == 'hetxl' else HETHead
  head = cls(num_classes=K, num_factors=3, link='sigmoid', temperature=1.7,
             train_mc_samples=64, mc_chunk_size=16)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  labels = jnp.asarray(_label_sets(rng))
  rngs = {name: jax.random.key(i) for i, name in
          enumerate(('params', 'standard_norm_noise_samples', 'diag_noise_samples'))}
  params = head.init(rngs, x, labels, train=True)
  loss = head.apply(params, x, labels, train=True, rngs=rngs).loss
  u = np.asarray(head.apply(params, x, train=True, rngs=rngs, method=cls.sample_logits),
                 np.float64)
  p = (1 / (1 + np.exp(-u / 1.7))).mean(1)
  y = _numpy_multi_hot(np.asarray(labels))
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1)
  np.testing.assert_allclose(loss, want, rtol=1e-4)


# ------------------------------------------------------------------------ metrics


def _average_precision(scores, positives):
  """Brute force: mean over positives of the precision at each positive's rank."""
  order = np.argsort(-scores, kind='stable')
  hits = positives[order]
  ranks = np.flatnonzero(hits) + 1
  return np.mean(np.cumsum(hits)[ranks - 1] / ranks)


def test_mean_average_precision_by_hand_and_brute_force():
  # class 0: positives ranked 1 and 3 of 4 -> (1/1 + 2/3) / 2; class 1: ranked 2 -> 1/2;
  # class 2: no positive, left out.
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.15, 0.9, 0.3], [0.1, 0.3, 0.2]])
  targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
  value, classes = mean_average_precision(scores, targets)
  assert classes == 2
  assert value == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
  rng = np.random.default_rng(4)
  scores = rng.random((50, K))
  targets = (rng.random((50, K)) < 0.2).astype(np.float32)
  targets[:, 3] = 0
  want = np.mean([_average_precision(scores[:, k], targets[:, k]) for k in range(K) if k != 3])
  assert mean_average_precision(scores, targets) == (pytest.approx(want), K - 1)
  labels = _label_sets(rng)
  np.testing.assert_array_equal(multi_hot(labels, K), _numpy_multi_hot(labels))


# ------------------------------------------------------------------------ trainer and evaluator


def _synthetic_config(head='softmax', **head_kwargs):
  c = load_config('quickstart.py', 'runlocal')
  c.dataset.name, c.dataset.num_classes = 'synthetic', K
  c.dataset.image_size, c.dataset.channels, c.dataset.num_examples = 8, 1, 40
  c.dataset.multi_label, c.dataset.max_labels = True, 3
  c.model.head = head
  c.model.head_kwargs = type(c.model.head_kwargs)(dict(link='sigmoid', **head_kwargs))
  c.input.eval_batch_size = 16            # 40 examples: 3 batches, the last one padded
  c.train.num_steps = 2
  c.train.async_checkpointing = False
  return c


def test_multilabel_eval_equals_numpy_on_the_same_checkpoint(tmp_path):
  """Train 2 steps on a synthetic multi-label set, then recompute prec@1, mAP, NLL and the
  counts from the checkpoint's own probabilities with numpy."""
  from training.experiment import Experiment
  from training.checkpointing import Checkpointer
  from launch.train import train_and_evaluate
  from training.model import step_rngs
  from evaluation.evaluator import EVAL_SEED
  c = _synthetic_config()
  result = train_and_evaluate(c, str(tmp_path))
  exp = Experiment.build(c)
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=1, read_only=True)
  variables = ckpt.restore_variables(ckpt.latest_step(), exp.abstract_restore_target())
  examples = [exp.eval_source[i] for i in range(len(exp.eval_source))]
  images = np.stack([e['image'] for e in examples])
  labels = np.stack([e['label'] for e in examples])
  out = exp.model.apply(jax.device_get(variables), images, train=False,
                        rngs=step_rngs(jax.random.key(EVAL_SEED), 0, exp.model.head))
  logits = np.asarray(out.logits, np.float64)
  p = 1 / (1 + np.exp(-logits))
  y = _numpy_multi_hot(labels)
  labelled = y.sum(1) > 0
  top = logits.argmax(1)
  assert result['num_examples'] == 40 and result['num_labelled'] == labelled.sum()
  assert result['prec@1'] == pytest.approx(y[np.arange(40), top][labelled].mean())
  nll = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1).mean()
  assert result['nll'] == pytest.approx(nll, rel=1e-4)
  keep = y.sum(0) > 0
  want = np.mean([_average_precision(p[:, k], y[:, k]) for k in np.flatnonzero(keep)])
  assert result['map'] == pytest.approx(want, rel=1e-6)
  assert result['map_classes'] == keep.sum()


def test_label_sets_refused_by_llc_and_soc():
  from training.model import build_model
  for head, why in (('llc_codebook', 'one binary code per class'), ('soc', 'Gaussian')):
    c = _synthetic_config()
    c.model.head, c.model.head_kwargs = head, type(c.model.head_kwargs)()
    with pytest.raises(ValueError, match=f'cannot train on multi-label data.*{why}'):
      build_model(c)


MULTILABEL_CONFIG = """
from tests.test_multilabel import _synthetic_config

def get_config(arg=None):
  return _synthetic_config()
"""


def test_two_processes_count_each_multilabel_example_once(tmp_path):
  from tests.test_multihost import _run_two_processes
  config = tmp_path / 'multilabel.py'
  config.write_text(MULTILABEL_CONFIG)
  args = [f'--config={config}', '--config.optimizer.schedule=constant']
  one = last_json(run_main(*args, f'--workdir={tmp_path / "one"}', devices=4).stdout)
  two = [last_json(out) for out in _run_two_processes('launch.main', *args,
                                                      f'--workdir={tmp_path / "two"}')]
  assert two[0] == two[1]
  assert one['num_examples'] == two[0]['num_examples'] == 40
  for key in ('num_labelled', 'map_classes'):
    assert one[key] == two[0][key]
  for key in ('prec@1', 'map', 'nll', 'ece'):
    assert two[0][key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------ label checks


def _write_dataset(path, labels_per_record, multi_label, num_classes=K, version=2):
  os.makedirs(path, exist_ok=True)
  name = records.shard_name('train', 0, 1)
  writer = ArrayRecordWriter(os.path.join(path, name), records.WRITER_OPTIONS)
  for labels in labels_per_record:
    writer.write(records.encode_record(labels, b'\x89PNG not decoded here'))
  writer.close()
  meta = {'class_names': [f'c{k}' for k in range(num_classes)], 'num_classes': num_classes,
          'multi_label': multi_label,
          'max_labels_per_image': max(len(np.atleast_1d(l)) for l in labels_per_record),
          'splits': {'train': {'shards': [name], 'num_examples': len(labels_per_record)}}}
  records.write_metadata(str(path), meta)


def _arrayrecord_config(path, **dataset):
  c = _synthetic_config()
  c.dataset.name, c.dataset.data_dir = 'arrayrecord', str(path)
  c.dataset.multi_label, c.dataset.max_labels = False, 0
  for key, value in dataset.items():
    c.dataset[key] = value
  return c.dataset


def test_multilabel_records_read_as_padded_sets(tmp_path):
  sets = [[3, 7], [], [0], [11, 2, 5]]
  _write_dataset(tmp_path, sets, True)
  source, info = build_source(_arrayrecord_config(tmp_path, multi_label=True, max_labels=3),
                              'train', 0, train=True)
  got = [source[i]['label'].tolist() for i in range(len(source))]
  assert got == [s + [-1] * (3 - len(s)) for s in sets] and info.num_examples == 4


@pytest.mark.parametrize('case', ['multi_label_read_as_single', 'more_labels_than_max',
                                  'label_out_of_range', 'bad_label_past_the_probe'])
def test_labels_that_do_not_fit_the_config_are_refused(tmp_path, case):
  if case == 'multi_label_read_as_single':
    _write_dataset(tmp_path, [[1, 2], [3]], True)
    ds, match = _arrayrecord_config(tmp_path), 'is multi-label .*multi_label=True'
  elif case == 'more_labels_than_max':
    _write_dataset(tmp_path, [[1, 2, 3, 4], [3]], True)
    ds, match = (_arrayrecord_config(tmp_path, multi_label=True, max_labels=3),
                 'images with 4 labels .*max_labels=4')
  elif case == 'label_out_of_range':
    _write_dataset(tmp_path, [1, 12, 3, 14, 12], False)
    ds, match = _arrayrecord_config(tmp_path), r"split 'train'.*3 of 5 labels.*outside \[0, 12\).*12 \(x2\), 14 \(x1\)"
  else:   # 200 examples, the probe reads 64 of them: the per-example check finds index 1
    _write_dataset(tmp_path, [1, 40] + [2] * 198, False)
    ds, match = _arrayrecord_config(tmp_path), r'example 1: 1 of 1 labels.*outside \[0, 12\)'
  with pytest.raises(LabelError, match=match):
    source, _ = build_source(ds, 'train', 0, train=True)
    [source[i] for i in range(len(source))]


def test_unlabelled_tfds_split_is_refused_for_eval(tmp_path):
  """tfds allows label -1 (an unlabelled split): eval must stop with a message saying so,
  instead of accuracy 0 and an NLL from a wrapped class index."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from launch.train import train_and_evaluate

  class UnlabelledTestSplit(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 1)),
          'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in ('train', 'test')}

    def _generate_examples(self, split):
      for i in range(8):
        png = io.BytesIO()
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(png, 'PNG')
        yield i, {'image': io.BytesIO(png.getvalue()),
                  'label': i % 3 if split == 'train' else -1}

  UnlabelledTestSplit(data_dir=str(tmp_path / 'tfds'), file_format='array_record'
                      ).download_and_prepare()
  c = load_config('quickstart.py', 'runlocal')
  c.dataset.name, c.dataset.tfds_name = 'tfds', 'unlabelled_test_split'
  c.dataset.data_dir, c.dataset.num_classes = str(tmp_path / 'tfds'), 3
  c.train.num_steps = 1
  c.input.batch_size = c.input.eval_batch_size = 8
  with pytest.raises(LabelError, match=r"split 'test' .* is unlabelled: 8 of 8 labels.*-1 \(x8\)"):
    train_and_evaluate(c, str(tmp_path / 'work'))
