"""grain pipeline: per-process sharding, eval padding/masking, determinism, iterator resume."""
import jax
import numpy as np
import pytest

from input_pipeline import pipeline
from input_pipeline.sources import ArraySource, NoisyLabels, SyntheticSource


def _indexed_source(n, size=4):
  """Image pixel (0, 0, 0) and label both encode the index (mod 256 / as is)."""
  images = np.zeros((n, size, size, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 1, 0] = np.arange(n) // 256
  return ArraySource(images, np.arange(n))


def _ids(batch):
  return batch['image'][:, 0, 0, 0].astype(int) + 256 * batch['image'][:, 0, 1, 0].astype(int)


def _as_processes(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


@pytest.mark.parametrize('n,batch,processes', [(37, 8, 1), (37, 8, 2), (64, 16, 4), (5, 8, 2)])
def test_eval_counts_every_example_exactly_once(monkeypatch, n, batch, processes):
  seen, masks = [], []
  num_batches = None
  for p in range(processes):
    _as_processes(monkeypatch, p, processes)
    ds, num_batches = pipeline.eval_dataset(_indexed_source(n), global_batch=batch,
                                            eval_mode='none', image_size=0, channels=1)
    batches = list(ds)
    assert len(batches) == num_batches  # every process runs the same number of batches
    for b in batches:
      seen.append(b['label'][b['mask'] > 0])
      masks.append(b['mask'])
  seen = np.concatenate(seen)
  assert sorted(seen.tolist()) == list(range(n))
  assert np.concatenate(masks).sum() == n
  assert num_batches == -(-n // batch)


def test_train_shards_are_disjoint_and_cover_each_epoch(monkeypatch):
  n, processes, per_batch = 24, 3, 4
  epoch = []
  for p in range(processes):
    _as_processes(monkeypatch, p, processes)
    it = iter(pipeline.train_dataset(_indexed_source(n), global_batch=per_batch * processes,
                                     seed=1, augment='none', image_size=0, channels=1))
    ids = np.concatenate([_ids(next(it)) for _ in range(n // (per_batch * processes))])
    epoch.append(ids)
  all_ids = np.concatenate(epoch)
  assert sorted(all_ids.tolist()) == list(range(n))  # disjoint and complete
  assert not np.array_equal(all_ids, np.arange(n))   # and shuffled


def test_shuffle_differs_per_epoch_and_is_seeded():
  def first_epochs(seed):
    it = iter(pipeline.train_dataset(_indexed_source(16), global_batch=16, seed=seed,
                                     augment='none', image_size=0, channels=1))
    return _ids(next(it)), _ids(next(it))
  e1, e2 = first_epochs(0)
  assert sorted(e1) == sorted(e2) == list(range(16))
  assert not np.array_equal(e1, e2)
  np.testing.assert_array_equal(first_epochs(0)[1], e2)
  assert not np.array_equal(first_epochs(1)[0], e1)


def test_iterator_state_resumes_the_same_batches():
  def make():
    return iter(pipeline.train_dataset(_indexed_source(40, size=8), global_batch=8, seed=3,
                                       augment='cifar', image_size=0, channels=1))
  straight = make()
  expected = [next(straight) for _ in range(9)]
  first = make()
  for _ in range(4):
    next(first)
  state = first.get_state()
  second = make()
  second.set_state(state)
  for want in expected[4:]:
    got = next(second)
    np.testing.assert_array_equal(got['image'], want['image'])  # augmentation included
    np.testing.assert_array_equal(got['label'], want['label'])


def test_label_noise_rate_and_kinds():
  n, k = 20000, 10
  clean = ArraySource(np.zeros((n, 1, 1, 1), np.uint8), np.arange(n) % k)
  sym = NoisyLabels(clean, k, 0.4, 'symmetric', seed=0)
  flipped = np.array([sym[i]['label'] != i % k for i in range(n)])
  assert abs(flipped.mean() - 0.4) < 0.015
  pair = NoisyLabels(clean, k, 0.2, 'class_dependent', seed=0)
  labels = np.array([pair[i]['label'] for i in range(n)])
  changed = labels != np.arange(n) % k
  assert abs(changed.mean() - 0.2) < 0.015
  np.testing.assert_array_equal(labels[changed], (np.arange(n)[changed] % k + 1) % k)
  assert sym[123]['label'] == NoisyLabels(clean, k, 0.4, 'symmetric', seed=0)[123]['label']


def test_synthetic_source_is_a_function_of_seed_and_index():
  a, b = SyntheticSource(50, 7, 8, 3, seed=1), SyntheticSource(50, 7, 8, 3, seed=1)
  np.testing.assert_array_equal(a[13]['image'], b[13]['image'])
  assert a[13]['label'] == 13 % 7
  assert not np.array_equal(a[13]['image'], SyntheticSource(50, 7, 8, 3, seed=2)[13]['image'])


def test_global_batch_assembles_on_the_mesh():
  from training.mesh import batch_sharding, build_mesh
  mesh = build_mesh(('data', 'model'), (4, 2))
  local = {'image': np.arange(8 * 2 * 2 * 1, dtype=np.uint8).reshape(8, 2, 2, 1),
           'label': np.arange(8, dtype=np.int32)}
  glob = pipeline.to_global(local, batch_sharding(mesh))
  np.testing.assert_array_equal(np.asarray(glob['label']), local['label'])
  # the batch splits over every mesh axis: each of the 8 devices holds one distinct example
  assert glob['image'].sharding.spec == jax.sharding.PartitionSpec(('data', 'model'))
  assert sorted(int(s.data[0]) for s in glob['label'].addressable_shards) == list(range(8))
