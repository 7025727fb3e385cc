"""Nested codebooks: m-bit sub-codebooks of a k-bit codebook, by bit selection.

A sub-codebook keeps the same m bit indices of every class code and every instance code, so a
model trained at k bits also decodes at m < k bits without retraining. The LLC paper does not
say which bits to keep (bits are unordered); two rules:
  * prefix: the first m bits;
  * greedy: grow the set one bit at a time, adding the bit that maximises (number of unique class
    codes, then the minimum Hamming distance between two classes' codes, then the mean pairwise
    distance), ties to the lowest index.
`benchmarks/llc_nested.py` compares them with codebooks trained at m bits.
"""
from typing import Sequence

import numpy as np

from llc.codes import as_bool, llc_metrics, min_class_distance


def prefix_bits(k: int, m: int) -> np.ndarray:
  """The first m of k bit indices."""
  _check_size(k, m)
  return np.arange(m)


def _check_size(k: int, m: int) -> None:
  if not 1 <= m <= k:
    raise ValueError(f'a sub-codebook keeps 1..k = {k} bits, got m = {m}')


def _unique_counts(keys: np.ndarray) -> np.ndarray:
  """Number of distinct values in each column of an integer array [L, C]."""
  ordered = np.sort(keys, axis=0)
  return 1 + np.count_nonzero(np.diff(ordered, axis=0), axis=0)


def greedy_bits(class_bits, m: int) -> np.ndarray:
  """m bit indices of a codebook [L, k], chosen greedily (see the module docstring).

  Per step and for all candidate bits at once: unique counts from the current code ids
  (2 * id + bit, one sort); the new minimum distance is d_min + 1 exactly when the candidate
  separates every pair now at d_min, else d_min; the mean distance grows by
  ones * zeros / pairs of the candidate column, so (ones * zeros) ranks it. Pairwise distances
  [L, L] are updated with the chosen bit's XOR: O(m * (L^2 + k * pairs at d_min)) time, O(L^2)
  memory (1000 classes, 30 bits: well under a second).
  """
  class_bits = as_bool(class_bits)
  num_classes, k = class_bits.shape
  _check_size(k, m)
  bits = class_bits.astype(np.int64)
  balance = bits.sum(0) * (num_classes - bits.sum(0))   # ones * zeros per column
  dist = np.zeros((num_classes, num_classes), np.uint8 if k < 256 else np.uint16)
  upper = np.triu(np.ones((num_classes, num_classes), bool), 1)
  code_id = np.zeros(num_classes, np.int64)
  chosen, remaining = [], np.arange(k)
  for _ in range(m):
    unique = _unique_counts(2 * code_id[:, None] + bits[:, remaining])
    if num_classes > 1:
      d_min = int(dist[upper].min())
      rows, cols = np.nonzero(upper & (dist == d_min))
      candidates = class_bits[:, remaining]
      separates = np.all(candidates[rows] != candidates[cols], axis=0)
      new_min = d_min + separates.astype(np.int64)
    else:
      new_min = np.zeros(len(remaining), np.int64)
    best = remaining[np.lexsort((remaining, -balance[remaining], -new_min, -unique))[0]]
    chosen.append(int(best))
    remaining = remaining[remaining != best]
    column = class_bits[:, best]
    dist += column[:, None] != column[None, :]
    _, code_id = np.unique(2 * code_id + bits[:, best], return_inverse=True)
  return np.asarray(chosen, np.int64)


def sub_metrics(inst_bits, labels, class_bits, indices: Sequence[int]) -> dict:
  """`llc_metrics` of the sub-codebook keeping bit `indices` of instance codes [N, k] and class
  codes [L, k], plus its min_class_distance and bit count."""
  indices = np.asarray(indices, np.int64)
  inst_bits, class_bits = as_bool(inst_bits)[:, indices], as_bool(class_bits)[:, indices]
  return {**llc_metrics(inst_bits, labels, class_bits), 'bits': int(indices.size),
          'min_class_distance': min_class_distance(class_bits)}
