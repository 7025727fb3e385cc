"""Oracles for llc.nested: prefix / greedy bit selection and sub-codebook metrics."""
import itertools

import numpy as np
import pytest

from llc import codes, nested


def criterion(class_bits: np.ndarray, indices) -> tuple:
  """(unique class codes, min pairwise Hamming, mean pairwise Hamming) of the kept columns."""
  sub = class_bits[:, list(indices)]
  dist = (sub[:, None, :] != sub[None, :, :]).sum(-1)
  pairs = dist[np.triu_indices(len(sub), 1)]
  return len({row.tobytes() for row in sub}), int(pairs.min()), float(pairs.mean())


def brute_force_pick(class_bits: np.ndarray, chosen: list) -> int:
  """The bit j not in `chosen` maximising criterion(chosen + [j]), ties to the lowest j."""
  remaining = [j for j in range(class_bits.shape[1]) if j not in chosen]
  return max(remaining, key=lambda j: (criterion(class_bits, chosen + [j]), -j))


def test_prefix_bits():
  np.testing.assert_array_equal(nested.prefix_bits(30, 20), np.arange(20))
  for m in (0, 31):
    with pytest.raises(ValueError, match='1..k = 30'):
      nested.prefix_bits(30, m)


def test_greedy_reaches_unique_codes_where_prefix_does_not():
  # 8 classes, 6 bits: bits 0-2 constant over classes, bits 3-5 the class index in binary.
  bits = np.zeros((8, 6), bool)
  bits[:, 3:] = (np.arange(8)[:, None] >> np.arange(3)) & 1
  greedy = nested.greedy_bits(bits, 3)
  assert sorted(greedy.tolist()) == [3, 4, 5]
  assert codes.unique_codes(bits[:, greedy]) == 8
  assert codes.unique_codes(bits[:, nested.prefix_bits(6, 3)]) == 1


@pytest.mark.parametrize('num_classes,k,seed', [(12, 8, 0), (6, 7, 1), (20, 9, 2), (5, 10, 3)])
def test_greedy_picks_equal_brute_force(num_classes, k, seed):
  rng = np.random.default_rng(seed)
  bits = rng.integers(0, 2, size=(num_classes, k)).astype(bool)
  bits[:, k - 1] = bits[:, 1]      # a duplicate column: ties go to the lower index
  bits[:, k - 2] = True            # a constant column: never useful
  greedy = nested.greedy_bits(bits, k).tolist()
  first = brute_force_pick(bits, [])
  assert first == max(range(k), key=lambda j: (criterion(bits, [j]), -j))
  second = max((pair for pair in itertools.permutations(range(k), 2) if pair[0] == first),
               key=lambda pair: (criterion(bits, pair), -pair[1]))[1]
  assert greedy[:2] == [first, second]
  chosen = []                      # every later pick too, by the same brute force
  for _ in range(k):
    chosen.append(brute_force_pick(bits, chosen))
  assert greedy == chosen


def test_greedy_uses_min_distance_once_codes_are_unique():
  # 4 classes: bits 0 and 1 make codes unique (min distance 1); bit 2 is balanced but repeats
  # bit 0, bit 3 separates the two pairs at distance 1 and lifts the minimum to 2.
  bits = np.array([[0, 0, 0, 0],
                   [0, 1, 0, 1],
                   [1, 0, 1, 1],
                   [1, 1, 1, 0]], bool)
  assert criterion(bits, [0, 1, 3])[1] == 2 and criterion(bits, [0, 1, 2])[1] == 1
  assert nested.greedy_bits(bits, 3).tolist() == [0, 1, 3]


def test_greedy_full_length_is_a_permutation():
  rng = np.random.default_rng(4)
  bits = rng.standard_normal((1000, 30)) > 0
  order = nested.greedy_bits(bits, 30)
  assert sorted(order.tolist()) == list(range(30))
  assert codes.unique_codes(bits[:, order[:20]]) == 1000   # 20 random bits: all unique


def noisy_instances(rng, class_bits, n, flip):
  labels = rng.integers(0, class_bits.shape[0], size=n)
  return class_bits[labels] ^ (rng.random((n, class_bits.shape[1])) < flip), labels


def test_sub_metrics_equal_llc_metrics_on_the_kept_columns():
  rng = np.random.default_rng(5)
  class_bits = rng.integers(0, 2, size=(30, 12)).astype(bool)
  inst_bits, labels = noisy_instances(rng, class_bits, 400, 0.1)
  full = nested.sub_metrics(inst_bits, labels, class_bits, range(12))
  assert {k: full[k] for k in codes.llc_metrics(inst_bits, labels, class_bits)} == \
      codes.llc_metrics(inst_bits, labels, class_bits)
  subset = [9, 2, 7, 0, 11]
  sub = nested.sub_metrics(inst_bits, labels, class_bits, subset)
  sliced_inst, sliced_class = inst_bits[:, subset].copy(), class_bits[:, subset].copy()
  expected = codes.llc_metrics(sliced_inst, labels, sliced_class)
  assert {k: sub[k] for k in expected} == expected
  dist = (sliced_class[:, None] != sliced_class[None]).sum(-1)
  assert sub['min_class_distance'] == dist[np.triu_indices(30, 1)].min()
  assert sub['bits'] == 5
