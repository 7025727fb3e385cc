"""Oracles for llc.taxonomy: linkage heights, cut agreement, dendrogram drawing, CLI errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from llc import taxonomy
from tests.helpers import ROOT


def naive_average_linkage(bits: np.ndarray) -> list[tuple[float, frozenset]]:
  """UPGMA written out: merge the two clusters with the smallest mean pairwise Hamming / k."""
  k = bits.shape[1]
  dist = (bits[:, None, :] != bits[None, :, :]).sum(-1) / k
  clusters = [frozenset([i]) for i in range(len(bits))]
  merges = []
  while len(clusters) > 1:
    pairs = [(np.mean([dist[i, j] for i in a for j in b]), ia, ib)
             for ia, a in enumerate(clusters) for ib, b in enumerate(clusters) if ia < ib]
    pairs.sort()
    height, ia, ib = pairs[0]
    assert len(pairs) == 1 or pairs[1][0] > height, 'test codebook must have no tied merges'
    merged = clusters[ia] | clusters[ib]
    clusters = [c for i, c in enumerate(clusters) if i not in (ia, ib)] + [merged]
    merges.append((height, merged))
  return merges


def scipy_merges(link: np.ndarray, n: int) -> list[tuple[float, frozenset]]:
  members = {i: frozenset([i]) for i in range(n)}
  out = []
  for row, (a, b, height, _) in enumerate(link):
    members[n + row] = members[int(a)] | members[int(b)]
    out.append((float(height), members[n + row]))
  return out


def planted_codebook(k: int = 16):
  """Two groups of 4 classes, interleaved: each code is its group centre with <= 1 bit flipped;
  the centres differ in k / 2 bits."""
  centres = {'a': np.zeros(k, bool), 'b': np.arange(k) < k // 2}
  groups = ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']
  codes = []
  for i, g in enumerate(groups):
    code = centres[g].copy()
    if i > 1:
      code[i] ^= True
    codes.append(code)
  return np.stack(codes), groups


def test_linkage_heights_are_average_hamming_over_k():
  bits = np.array([[0, 0, 0, 0, 0, 0, 0, 0],
                   [1, 0, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 1, 1, 1, 1],
                   [0, 0, 1, 1, 1, 1, 1, 1]], bool)
  expected = naive_average_linkage(bits)
  got = scipy_merges(taxonomy.codebook_linkage(bits), len(bits))
  assert [m for _, m in got] == [m for _, m in expected]
  np.testing.assert_allclose([h for h, _ in got], [h for h, _ in expected], rtol=0, atol=1e-12)
  assert expected[0][0] == pytest.approx(1 / 8)   # first merge: classes 0 and 1, one bit apart


def test_linkage_accepts_real_codebook_signs():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((6, 9))
  np.testing.assert_array_equal(taxonomy.codebook_linkage(values),
                                taxonomy.codebook_linkage(values > 0))


def test_cut_agrees_with_planted_groups():
  bits, groups = planted_codebook()
  result = taxonomy.cut_agreement(bits, groups)
  assert result == {'groups': 2, 'clusters': 2, 'adjusted_rand_index': 1.0, 'purity': 1.0}
  shuffled = ['a', 'a', 'b', 'b', 'a', 'b', 'a', 'b']
  worse = taxonomy.cut_agreement(bits, shuffled)
  assert worse['adjusted_rand_index'] < 0.5
  assert worse['purity'] < 1.0


def test_cut_agreement_rejects_wrong_group_count():
  bits, groups = planted_codebook()
  with pytest.raises(ValueError, match='one group per class'):
    taxonomy.cut_agreement(bits, groups[:-1])


def test_draw_dendrogram_writes_png_with_every_name_once(tmp_path):
  bits, groups = planted_codebook()
  names = [f'{g}_class{i}' for i, g in enumerate(groups)]
  path = tmp_path / 'tree.png'
  leaves = taxonomy.draw_dendrogram(bits, names, str(path), title='planted')
  assert sorted(leaves) == sorted(names)
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert path.stat().st_size > 1000
  # The two planted groups are two subtrees, so each is contiguous in the drawn order.
  first = [name[0] for name in leaves]
  assert first in (['a'] * 4 + ['b'] * 4, ['b'] * 4 + ['a'] * 4)


def test_cifar10_superclasses_split_animals_and_vehicles():
  names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck']
  labels = taxonomy.superclass_labels(names, taxonomy.SUPERCLASSES['cifar10'])
  assert labels.count('vehicle') == 4 and labels.count('animal') == 6
  assert {n for n, s in zip(names, labels) if s == 'vehicle'} == {'airplane', 'automobile',
                                                                   'ship', 'truck'}


def test_report_fails_on_mismatched_names_and_uncovered_classes(tmp_path):
  bits = np.eye(10, 6, dtype=bool)
  names = [str(d) for d in range(10)]
  with pytest.raises(ValueError, match='10 classes but the dataset has 9'):
    taxonomy.report(bits, names[:9], str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='does not cover'):
    taxonomy.report(bits, names, str(tmp_path / 'x.png'), taxonomy.SUPERCLASSES['cifar10'])


def start_cli(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'llc.taxonomy', *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_draws_digits_codebook_and_rejects_wrong_class_count(tmp_path):
  rng = np.random.default_rng(1)
  good, bad = tmp_path / 'good.npy', tmp_path / 'bad.npy'
  np.save(good, rng.standard_normal((10, 5)).astype(np.float32))
  np.save(bad, rng.standard_normal((7, 5)).astype(np.float32))
  out = tmp_path / 'tax.png'
  runs = [start_cli(f'--codebook={path}', '--config=configs/quickstart.py', f'--out={out}')
          for path in (good, bad)]   # both at once: each pays ~1 s of imports
  (good_out, good_err), (_, bad_err) = [run.communicate(timeout=120) for run in runs]
  assert runs[0].returncode == 0, good_err[-2000:]
  record = json.loads(good_out.strip().splitlines()[-1])
  assert record['classes'] == 10 and record['bits'] == 5 and out.is_file()
  assert 'agreement' not in record
  assert runs[1].returncode != 0
  assert 'error: the codebook has 7 classes but the dataset has 10 class names' in bad_err
