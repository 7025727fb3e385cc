"""The eval accumulated on the devices (evaluation.evaluator): mAP from per-class top-k +
histograms against scikit-learn, padded classes left out, single-label metrics against numpy,
class-sharded accumulator, and the step lowered from abstract inputs. Head-free: the logits
are fed in as the batch's 'image'."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn.metrics import average_precision_score

from configs.schema import base_config
from evaluation.evaluator import EvalStep
from input_pipeline.pipeline import to_global
from training.mesh import batch_sharding, build_mesh

BATCH = 512


@pytest.fixture(scope='module')
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 devices')
  return build_mesh(('data', 'model'), (2, 4))


def _step(mesh, link, num_classes, **options):
  replicated = NamedSharding(mesh, P())
  options = ml_collections.ConfigDict({**base_config().eval, **options})
  return EvalStep(lambda params, batch_stats, logits: logits, link, num_classes, mesh,
                  (replicated, replicated), options)


def _run(step, logits, labels):
  """Metrics of `step` over logits [N, W] and labels, in padded batches of BATCH."""
  n = len(logits)
  pad = -n % BATCH
  logits = np.concatenate([logits, np.full((pad, logits.shape[1]), 5.0, np.float32)])
  labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
  mask = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
  acc, params = None, jnp.zeros(())
  for i in range(0, len(logits), BATCH):
    batch = to_global({'image': logits[i:i + BATCH], 'label': labels[i:i + BATCH],
                       'mask': mask[i:i + BATCH]}, batch_sharding(step.mesh))
    acc = step.accumulator(params, params, batch) if acc is None else acc
    acc = step(acc, params, params, batch)
  return step.results(acc)


def _label_sets(y):
  """Padded label sets [N, L] (-1 padding) of a multi-hot [N, K]."""
  width = max(1, int(y.sum(1).max()))
  out = np.full((len(y), width), -1, np.int32)
  for i, row in enumerate(y):
    ids = np.flatnonzero(row)
    out[i, :len(ids)] = ids
  return out


def _sklearn_map(p, y):
  keep = y.sum(0) > 0
  return average_precision_score(y[:, keep], p[:, keep], average='macro'), int(keep.sum())


def _sigmoid_case(rng, n, k, pos_mean, pos_sd, neg_mean, neg_sd, max_pos):
  y = np.zeros((n, k), np.float32)
  for c in range(k):
    y[rng.choice(n, rng.integers(0, max_pos + 1), replace=False), c] = 1
  y[:, :3] = 0                                 # classes without a positive: left out
  y[rng.integers(0, n, 20), 3] = 1             # and one with many
  logits = np.where(y > 0, rng.normal(pos_mean, pos_sd, (n, k)),
                    rng.normal(neg_mean, neg_sd, (n, k))).astype(np.float32)
  return logits, y


def _sigmoid(x):
  return np.asarray(jax.nn.sigmoid(jnp.asarray(x)))   # float32, as the device computes it


@pytest.mark.parametrize('pos, neg', [((-2.0, 3.0), (-8.0, 2.0)),     # JFT-like
                                      ((-2.5, 1.0), (-3.0, 1.0))])    # negatives crowd positives
def test_map_agrees_with_sklearn_within_its_bound(mesh, pos, neg):
  rng = np.random.default_rng(0)
  logits, y = _sigmoid_case(rng, 6000, 36, *pos, *neg, max_pos=6)
  want, classes = _sklearn_map(_sigmoid(logits), y)
  metrics, _ = _run(_step(mesh, 'sigmoid', 36), logits, _label_sets(y))
  assert metrics['map_classes'] == classes < 33
  assert metrics['map_method'] == 'top64+histogram(bins=512)'
  assert abs(metrics['map'] - want) <= metrics['map_error_bound'] + 1e-6
  assert metrics['map_error_bound'] < 1e-3
  assert metrics['map'] == pytest.approx(want, abs=1e-3)


def test_map_error_bound_holds_when_coarse(mesh):
  """64 bins and a top 4: the error is larger, the bound still holds and is not vacuous."""
  rng = np.random.default_rng(0)
  logits, y = _sigmoid_case(rng, 6000, 36, -2.0, 3.0, -8.0, 2.0, max_pos=6)
  want, _ = _sklearn_map(_sigmoid(logits), y)
  coarse, _ = _run(_step(mesh, 'sigmoid', 36, map_bins=64, map_top_k=4), logits, _label_sets(y))
  assert abs(coarse['map'] - want) > 1e-3
  assert abs(coarse['map'] - want) <= coarse['map_error_bound'] + 1e-6
  assert coarse['map_error_bound'] < 0.1


def test_map_is_the_same_on_any_mesh(mesh):
  """Each data row keeps its own summary; the merge (all_to_all of the top-k lists,
  psum_scatter of the histograms, class blocks padded to the row count) gives the same mAP on
  a (2, 4) mesh, on (8, 1) and on a 3-axis (replica, data, model) mesh."""
  rng = np.random.default_rng(6)
  logits, y = _sigmoid_case(rng, 3000, 36, -2.0, 3.0, -8.0, 2.0, max_pos=6)
  want, classes = _sklearn_map(_sigmoid(logits), y)
  auto = (jax.sharding.AxisType.Auto,) * 3
  meshes = [mesh, build_mesh(('data', 'model'), (8, 1)),
            jax.make_mesh((2, 2, 2), ('replica', 'data', 'model'), axis_types=auto)]
  results = [_run(_step(m, 'sigmoid', 36, map_top_k=8), logits, _label_sets(y))[0]
             for m in meshes]
  for r in results:
    assert r['map_classes'] == classes
    assert abs(r['map'] - want) <= r['map_error_bound'] + 1e-6
    assert r['map'] == pytest.approx(results[0]['map'], abs=1e-6)
    assert r['map_error_bound'] == pytest.approx(results[0]['map_error_bound'], abs=1e-6)


def test_map_softmax_many_classes(mesh):
  rng = np.random.default_rng(1)
  n, k = 3000, 200
  label = rng.integers(0, k, n)
  logits = rng.normal(0, 2, (n, k)).astype(np.float32)
  logits[np.arange(n), label] += rng.normal(4, 3, n).astype(np.float32)
  y = np.eye(k, dtype=np.float32)[label]
  want, classes = _sklearn_map(np.asarray(jax.nn.softmax(jnp.asarray(logits))), y)
  metrics, _ = _run(_step(mesh, 'softmax', k), logits, _label_sets(y))
  assert metrics['map_classes'] == classes
  assert abs(metrics['map'] - want) <= metrics['map_error_bound'] + 1e-6
  assert metrics['map'] == pytest.approx(want, abs=1e-3)


def test_map_exact_with_ties_when_every_example_is_in_the_top_k(mesh):
  """N below map_top_k: every rank is known, ties (as scikit-learn groups them) included; saturated
  probabilities (p = 1 and p = 0 in float32) are ties as well."""
  rng = np.random.default_rng(2)
  n, k = 60, 8
  logits = rng.choice([-200.0, -1.0, 0.0, 0.5, 30.0, 40.0], (n, k)).astype(np.float32)
  y = (rng.uniform(size=(n, k)) < 0.3).astype(np.float32)
  want, _ = _sklearn_map(_sigmoid(logits), y)
  metrics, _ = _run(_step(mesh, 'sigmoid', k), logits, _label_sets(y))
  assert metrics['map'] == pytest.approx(want, abs=1e-6)
  assert metrics['map_error_bound'] == 0.0
  # Far more examples than the top k, only 6 distinct scores: the tie bins and the
  # 'strictly above the k-th' rule keep it exact for p = 0 and p = 1; the rest is bounded.
  big = np.tile(logits, (40, 1))
  yb = (rng.uniform(size=big.shape) < 0.3).astype(np.float32)
  want, _ = _sklearn_map(_sigmoid(big), yb)
  metrics, _ = _run(_step(mesh, 'sigmoid', k, map_top_k=4), big, _label_sets(yb))
  assert abs(metrics['map'] - want) <= metrics['map_error_bound'] + 1e-6


def _padded(logits, width, rng):
  """logits with columns up to `width` that would win everything if not masked."""
  extra = rng.uniform(50, 60, (len(logits), width - logits.shape[1])).astype(np.float32)
  return np.concatenate([logits, extra], axis=1)


@pytest.mark.parametrize('link', ['sigmoid', 'softmax'])
def test_padded_classes_change_no_metric(mesh, link):
  rng = np.random.default_rng(3)
  k = 37                                         # the model axis (4) does not divide it
  logits, y = _sigmoid_case(rng, 700, k, 1.0, 2.0, -3.0, 2.0, max_pos=30)
  step = _step(mesh, link, k)
  for labels in (_label_sets(y), rng.integers(0, k, len(y)).astype(np.int32)):
    plain, plain_bins = _run(step, logits, labels)
    padded, padded_bins = _run(_step(mesh, link, k), _padded(logits, 48, rng), labels)
    for key, value in plain.items():
      assert padded[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                             else value), key
    for key in plain_bins:
      np.testing.assert_allclose(padded_bins[key], plain_bins[key], rtol=1e-6)


def _ece_reference(conf, correct, num_bins):
  total, n = 0.0, len(conf)
  for b in range(num_bins):
    sel = (conf >= b / num_bins) & ((conf < (b + 1) / num_bins) if b < num_bins - 1 else True)
    if sel.any():
      total += sel.sum() / n * abs(correct[sel].mean() - conf[sel].mean())
  return total


@pytest.mark.parametrize('link', ['softmax', 'sigmoid'])
def test_single_label_metrics_equal_numpy(mesh, link):
  rng = np.random.default_rng(4)
  n, k = 1100, 24
  logits = rng.normal(0, 3, (n, k)).astype(np.float32)
  labels = rng.integers(0, k, n).astype(np.int32)
  metrics, bins = _run(_step(mesh, link, k), _padded(logits, 32, rng), labels)
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(1, keepdims=True)) if link == 'softmax' else 1 / (1 + np.exp(-x))
  p /= p.sum(1, keepdims=True)
  correct = (p.argmax(1) == labels).astype(float)
  conf = p.max(1)
  assert metrics['num_examples'] == n
  assert metrics['accuracy'] == pytest.approx(correct.mean(), abs=1e-12)
  assert metrics['nll'] == pytest.approx(-np.log(p[np.arange(n), labels]).mean(), rel=1e-5)
  assert metrics['ece'] == pytest.approx(_ece_reference(conf, correct, 15), abs=1e-5)
  assert bins['count'].sum() == n
  np.testing.assert_allclose(bins['correct'].sum(), correct.sum())


def test_multilabel_scalars_equal_numpy(mesh):
  rng = np.random.default_rng(5)
  n, k = 900, 20
  logits, y = _sigmoid_case(rng, n, k, 1.0, 2.0, -3.0, 2.0, max_pos=60)
  y[:50] = 0                                           # images without labels
  metrics, _ = _run(_step(mesh, 'sigmoid', k, num_bins=10), _padded(logits, 24, rng),
                    _label_sets(y))
  x = logits.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  labelled = y.sum(1) > 0
  top = y[np.arange(n), x.argmax(1)]
  assert metrics['num_examples'] == n and metrics['num_labelled'] == labelled.sum()
  assert metrics['prec@1'] == pytest.approx(top[labelled].mean(), abs=1e-12)
  nll = -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum(1).mean()
  assert metrics['nll'] == pytest.approx(nll, rel=1e-5)
  assert metrics['ece'] == pytest.approx(
      _ece_reference(p.max(1)[labelled], top[labelled], 10), abs=1e-5)


def test_accumulator_is_class_sharded_and_the_step_lowers_abstractly(mesh):
  k, width, batch, labels = 1000, 1024, 64, 3
  step = _step(mesh, 'sigmoid', k)
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  replicated = NamedSharding(mesh, P())
  params = sds((), jnp.float32, replicated)
  data = batch_sharding(mesh)
  abstract = {'image': sds((batch, width), jnp.float32, data),
              'label': sds((batch, labels), jnp.int32, data),
              'mask': sds((batch,), jnp.float32, data)}
  acc = step.abstract_accumulator(params, params, abstract)
  assert acc['pos'].shape == (2, width, 512)                   # one summary per data row
  assert acc['pos'].sharding.shard_shape(acc['pos'].shape) == (1, width // 4, 512)
  assert acc['top_p'].sharding.shard_shape(acc['top_p'].shape) == (1, width // 4, 64)
  assert acc['count'].sharding.is_fully_replicated
  compiled = step.lower(params, params, abstract).compile()
  out = compiled.output_shardings
  assert out['pos'].shard_shape(acc['pos'].shape) == (1, width // 4, 512)
  assert set(out) == set(acc)                                # nothing [B, K] comes back
