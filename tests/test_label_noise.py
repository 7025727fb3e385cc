"""Input-dependent label noise (input_pipeline.sources.NoisyLabels, kind 'input_dependent'):
the flip probability and the wrong class follow the closed form of the docstring, the requested
rate is met within binomial error, the same seed gives the same flips, flips depend on the
image; the reference writer (evaluation.reference_probs) on a trained workdir."""
import json
import pickle

import numpy as np
import pytest

from input_pipeline.sources import ArraySource, NoisyLabels

K = 10


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 12, 12, 3), np.uint8)


def _two_halves_reference(tmp_path, n):
  """Labels y = i mod K. First half: the reference is sure of the label (p_y = 0.99, the rest
  on y+1); second half: p_y = 0.2, p_{y+3} = 0.6, p_{y+5} = 0.2."""
  labels = np.arange(n) % K
  probs = np.zeros((n, K), np.float32)
  half = n // 2
  rows = np.arange(n)
  probs[rows[:half], labels[:half]] = 0.99
  probs[rows[:half], (labels[:half] + 1) % K] = 0.01
  probs[rows[half:], labels[half:]] = 0.2
  probs[rows[half:], (labels[half:] + 3) % K] = 0.6
  probs[rows[half:], (labels[half:] + 5) % K] = 0.2
  path = tmp_path / 'probs.npy'
  np.save(path, probs)
  return ArraySource(_images(n, 0), labels), str(path)


def test_reference_noise_follows_the_closed_form(tmp_path):
  n, rate = 4000, 0.4
  source, path = _two_halves_reference(tmp_path, n)
  noisy = NoisyLabels(source, K, rate, 'input_dependent', seed=3, reference=path)
  # mean over examples of min(1, c * doubt) = rate, doubt 0.01 / 0.8 on the two halves:
  c = rate / np.mean([0.01, 0.8])
  q_easy, wrong_easy = noisy.flip_distribution(0)
  q_hard, wrong_hard = noisy.flip_distribution(n - 1)
  np.testing.assert_allclose([q_easy, q_hard], [c * 0.01, c * 0.8], rtol=1e-6)
  y = (n - 1) % K
  want = np.zeros(K)
  want[(y + 3) % K], want[(y + 5) % K] = 0.75, 0.25
  np.testing.assert_allclose(wrong_hard, want, rtol=1e-6)
  np.testing.assert_allclose(wrong_easy, np.eye(K)[(0 + 1) % K], rtol=1e-6)

  record = noisy.record()
  flips = np.asarray(record['flips']).reshape(-1, 3)
  hard = flips[flips[:, 0] >= n // 2]
  for count, m, q in ((len(flips), n, rate), (len(hard), n // 2, c * 0.8),
                      (len(flips) - len(hard), n // 2, c * 0.01)):
    assert abs(count / m - q) < 4 * np.sqrt(q * (1 - q) / m) + 1 / m, (count, m, q)
  # wrong classes of the hard half: y+3 with probability 0.75, else y+5
  to_plus3 = np.mean(hard[:, 2] == (hard[:, 1] + 3) % K)
  assert abs(to_plus3 - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(hard))
  assert set((hard[:, 2] - hard[:, 1]) % K) <= {3, 5}
  # the labels read through the source are the recorded ones
  for i, clean, noisy_label in flips[:50]:
    assert noisy[int(i)]['label'] == noisy_label != clean
  assert record['num_flipped'] == len(flips) and record['realised_rate'] == len(flips) / n


def test_content_rule_meets_the_rate_and_is_seeded():
  n, rate = 3000, 0.3
  labels = np.random.default_rng(1).integers(0, K, n)
  source = ArraySource(_images(n, 0), labels)
  a = NoisyLabels(source, K, rate, 'input_dependent', seed=0).record()
  b = NoisyLabels(source, K, rate, 'input_dependent', seed=0).record()
  c = NoisyLabels(source, K, rate, 'input_dependent', seed=1).record()
  assert a['flips_sha256'] == b['flips_sha256'] and a['flips'] == b['flips']
  assert a['flips_sha256'] != c['flips_sha256']
  for r in (a, c):   # calibrated on all n examples: E[flips] = rate * n exactly
    assert abs(r['realised_rate'] - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
  assert json.loads(json.dumps(a)) == a


def test_content_rule_flips_depend_on_the_image():
  """Same indices, labels and seed; only the images differ: the flip probabilities and the
  wrong-class distributions differ, and one image repeated at many indices flips at its own
  rate q(x) to its own wrong classes."""
  n = 2000
  labels = np.zeros(n, np.int64)
  one = _images(2, 5)
  repeated = [ArraySource(np.repeat(one[j:j + 1], n, axis=0), labels) for j in range(2)]
  mixed = ArraySource(np.concatenate([np.repeat(one, n // 2, axis=0)]), labels)
  noisy_mixed = NoisyLabels(mixed, K, 0.4, 'input_dependent', seed=0)
  q0, w0 = noisy_mixed.flip_distribution(0)
  q1, w1 = noisy_mixed.flip_distribution(n - 1)
  assert abs(q0 - q1) > 1e-3 and np.abs(w0 - w1).max() > 1e-3
  for j, src in enumerate(repeated):
    noisy = NoisyLabels(src, K, 0.4, 'input_dependent', seed=0)
    q, wrong = noisy.flip_distribution(0)
    assert q == pytest.approx(0.4)   # every example is this image: calibration gives q = rate
    flips = np.asarray(noisy.record()['flips']).reshape(-1, 3)
    assert abs(len(flips) / n - q) < 4 * np.sqrt(q * (1 - q) / n)
    counts = np.bincount(flips[:, 2], minlength=K)
    expected = wrong * len(flips)
    big = expected >= 5   # cells large enough for the chi-square approximation
    chi2 = np.sum((counts - expected)[big] ** 2 / expected[big])
    assert chi2 < 40, (chi2, counts, expected)   # 9 degrees of freedom: p < 1e-5
  # the repeated-image sources share indices and seed, so their draws u_i are the same: flips
  # differ only through the image
  r0 = NoisyLabels(repeated[0], K, 0.4, 'input_dependent', seed=0).record()
  r1 = NoisyLabels(repeated[1], K, 0.4, 'input_dependent', seed=0).record()
  assert r0['flips'] != r1['flips']


def test_encoded_images_and_pickling(tmp_path):
  import io
  from PIL import Image
  n = 200
  images = _images(n, 2)
  encoded = []
  for im in images:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format='PNG')
    encoded.append(buf.getvalue())

  class Encoded:
    def __len__(self):
      return n

    def __getitem__(self, i):
      return {'image': encoded[i], 'label': i % K}

  from_bytes = NoisyLabels(Encoded(), K, 0.3, 'input_dependent', seed=0)
  from_arrays = NoisyLabels(ArraySource(images, np.arange(n) % K), K, 0.3, 'input_dependent',
                            seed=0)
  assert from_bytes.record()['flips'] == from_arrays.record()['flips']  # PNG is lossless
  source, path = _two_halves_reference(tmp_path, 100)
  noisy = NoisyLabels(source, K, 0.3, 'input_dependent', seed=0, reference=path)
  noisy[0]  # opens the memory map
  clone = pickle.loads(pickle.dumps(noisy))
  assert [clone[i]['label'] for i in range(100)] == [noisy[i]['label'] for i in range(100)]


def test_symmetric_and_class_dependent_draws_unchanged():
  """The older kinds keep their per-index draws (runs with them reproduce)."""
  n = 500
  source = ArraySource(_images(n, 0), np.arange(n) % K)
  for kind in ('symmetric', 'class_dependent'):
    noisy = NoisyLabels(source, K, 0.4, kind, seed=7)
    for i in range(n):
      rng = np.random.default_rng([7, 7919, i])
      y = i % K
      if rng.random() < 0.4:
        y = (y + (1 if kind == 'class_dependent' else int(rng.integers(1, K)))) % K
      assert noisy[i]['label'] == y


@pytest.mark.parametrize('kwargs, message', [
    (dict(kind='instance'), 'label_noise_kind must be one of'),
    (dict(rate=1.0), r'label_noise must be in \[0, 1\)'),
    (dict(kind='symmetric', reference='x.npy'), "used by label_noise_kind='input_dependent'"),
    (dict(reference='/no/such/file.npy'), 'cannot read label_noise_reference'),
])
def test_bad_settings_are_clear_errors(kwargs, message):
  args = dict(rate=0.2, kind='input_dependent', seed=0, reference='')
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    NoisyLabels(ArraySource(_images(20, 0), np.arange(20) % K), K, **args)


def test_reference_errors(tmp_path):
  source, path = _two_halves_reference(tmp_path, 100)
  with pytest.raises(ValueError, match=r'shape \(100, 10\).*has 50 examples'):
    NoisyLabels(ArraySource(_images(50, 0), np.arange(50) % K), K, 0.2, 'input_dependent', 0,
                path)
  sure = np.eye(K, dtype=np.float32)[np.arange(100) % K]
  sure[:10] = 0.1   # only 10% of examples can flip
  np.save(tmp_path / 'sure.npy', sure)
  with pytest.raises(ValueError, match='cannot reach rate 0.2.*at most 10.0%'):
    NoisyLabels(source, K, 0.2, 'input_dependent', 0, str(tmp_path / 'sure.npy'))


def test_label_sets_are_refused():
  class Sets:
    def __len__(self):
      return 4

    def __getitem__(self, i):
      return {'image': np.zeros((4, 4, 1), np.uint8), 'label': np.array([1, 2, -1])}

  noisy = NoisyLabels(Sets(), K, 0.2, 'symmetric', 0)
  with pytest.raises(ValueError, match='single-label data.*label set'):
    noisy[0]


def test_reference_probs_of_a_trained_workdir(tmp_path):
  """evaluation.reference_probs on a 30-step quickstart: rows sum to 1, one per training
  example (the K real classes, read on a (4, 2) mesh whose head pads K to 256), and its
  reported accuracy is the argmax accuracy against the clean labels."""
  from input_pipeline.sources import build_source
  from tests.helpers import last_json, load_config, run_main, run_module
  work = tmp_path / 'w'
  run_main('--config=configs/quickstart.py:runlocal', f'--workdir={work}',
           '--config.train.num_steps=30')
  out = tmp_path / 'probs.npy'
  proc = run_module('evaluation.reference_probs', '--config=configs/quickstart.py:runlocal',
                    f'--workdir={work}', f'--out={out}', '--config.mesh.shape=(4,2)',
                    devices=8)
  result = last_json(proc.stdout)
  probs = np.load(out)
  config = load_config('quickstart.py', 'runlocal')
  source, _ = build_source(config.dataset, config.dataset.train_split, 0, train=False)
  labels = np.array([source[i]['label'] for i in range(len(source))])
  assert probs.shape == (len(source), K) == tuple(result['shape'])
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  assert result['train_accuracy'] == pytest.approx(np.mean(probs.argmax(1) == labels))
  assert result['train_accuracy'] > 0.3   # trained: well above chance (0.1)
  noisy = NoisyLabels(source, K, 0.3, 'input_dependent', 0, str(out))
  record = noisy.record()
  assert abs(record['realised_rate'] - 0.3) < 4 * np.sqrt(0.21 / len(source))


def test_training_writes_the_realised_flips(tmp_path):
  """launch.main with label noise writes label_noise.json once: the flips equal those of the
  symmetric rule computed here from (seed, index) and the clean labels."""
  from input_pipeline.sources import build_source
  from tests.helpers import load_config, run_main
  run_main('--config=configs/quickstart.py:runlocal', f'--workdir={tmp_path}',
           '--config.dataset.label_noise=0.3', '--config.train.num_steps=1')
  record = json.loads((tmp_path / 'label_noise.json').read_text())
  config = load_config('quickstart.py', 'runlocal')
  clean, _ = build_source(config.dataset, config.dataset.train_split, 0, train=False)
  expected = []
  for i in range(len(clean)):
    rng = np.random.default_rng([config.seed, 7919, i])
    y = int(clean[i]['label'])
    if rng.random() < 0.3:
      expected.append([i, y, (y + int(rng.integers(1, K))) % K])
  assert record['flips'] == expected and record['kind'] == 'symmetric'
  assert record['realised_rate'] == len(expected) / len(clean)
