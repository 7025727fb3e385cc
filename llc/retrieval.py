"""Hamming-ranking retrieval with binary codes: counting-sort ranking and MAP@R."""
import numpy as np

from llc.codes import as_bool, distance_blocks, narrow, pack


def counting_sort_topk(dist: np.ndarray, topk: int) -> np.ndarray:
  """First `topk` database indices in (distance, index) order, for small integer distances.

  Counting sort: a histogram (bincount) and its cumsum give the cut-off distance t reached by
  the top `topk`; buckets below t (fewer than `topk` items together) are gathered one by one in
  index order, then the first items of bucket t. O(N + topk * t) per query, no comparison sort.
  """
  dist = np.asarray(dist)
  n = dist.shape[0]
  topk = min(topk, n)
  if topk <= 0:
    return np.empty(0, np.int64)
  counts = np.bincount(dist)
  cut = int(np.searchsorted(np.cumsum(counts), topk))
  out = np.empty(topk, np.int64)
  below = np.flatnonzero(dist < cut) if cut > 0 else np.empty(0, np.int64)
  below_dist = dist[below]
  pos = 0
  for value in range(cut):
    if counts[value]:
      out[pos:pos + counts[value]] = below[below_dist == value]
      pos += counts[value]
  out[pos:] = np.flatnonzero(dist == cut)[:topk - pos]
  return out


def hamming_rank(query_packed_row: np.ndarray, db_packed: np.ndarray, topk: int) -> np.ndarray:
  """Top-`topk` database indices for one packed query [W] (or [1, W]), by (distance, index)."""
  query = np.asarray(query_packed_row).reshape(1, -1)
  _, dist = next(distance_blocks(query, np.asarray(db_packed), block_elems=0))
  return counting_sort_topk(dist[0], topk)


def average_precision(relevant: np.ndarray) -> float:
  """AP of a ranked relevance list [R]: mean precision@i over relevant positions i; 0 if none."""
  relevant = np.asarray(relevant, bool)
  hits = np.cumsum(relevant)
  if relevant.size == 0 or hits[-1] == 0:
    return 0.0
  ranks = np.flatnonzero(relevant) + 1
  return float(np.sum(hits[relevant] / ranks) / hits[-1])


def is_relevant(query_label: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
  """Relevance of database items to one query: same class ([N] ints), or any shared label
  (multi-hot [N, C])."""
  if db_labels.ndim == 1:
    return db_labels == query_label
  return np.any(as_bool(db_labels) & as_bool(query_label), axis=1)


# MAP@R protocols: 'strict' (ours, the default) keeps every query in the mean, AP = 0 for a query
# whose top R holds nothing relevant; 'hashnet' drops such queries from the mean, as the
# evaluation code of HashNet (Cao et al., ICCV 2017) does, the protocol of the hashing baselines
# the LLC paper (Kusupati et al., NeurIPS 2021) compares with. 'hashnet' >= 'strict' always.
PROTOCOLS = ('strict', 'hashnet')


def average_precisions(query_bits, query_labels, db_bits, db_labels,
                       topk: int) -> tuple[np.ndarray, np.ndarray]:
  """(AP@topk [Nq], found [Nq] bool: the top `topk` holds at least one relevant item) of
  Hamming ranking (ties broken by database index) with codes [Nq, k], [Nd, k].

  AP@R = (1 / #relevant in the top R) * sum over relevant positions i <= R of precision@i
  (0 when none is relevant). Labels are class indices [N] or multi-hot [N, C] (relevant = at
  least one shared label).
  """
  query_bits, db_bits = as_bool(query_bits), as_bool(db_bits)
  query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
  k = db_bits.shape[1]
  query_packed, db_packed = narrow(pack(query_bits), k), narrow(pack(db_bits), k)
  aps = np.zeros(query_bits.shape[0])
  found = np.zeros(query_bits.shape[0], bool)
  for start, dist in distance_blocks(query_packed, db_packed):
    for row, query_dist in enumerate(dist):
      relevant = is_relevant(query_labels[start + row], db_labels[counting_sort_topk(query_dist,
                                                                                     topk)])
      aps[start + row] = average_precision(relevant)
      found[start + row] = np.any(relevant)
  return aps, found


def map_from_aps(aps: np.ndarray, found: np.ndarray, protocol: str = 'strict') -> float:
  """MAP over queries under `protocol` (see PROTOCOLS): 'strict' averages every AP, 'hashnet'
  only those of queries with a relevant item in their top R (0.0 when there is none)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'MAP protocol must be one of {PROTOCOLS}, got {protocol!r}')
  kept = aps if protocol == 'strict' else aps[np.asarray(found, bool)]
  return float(kept.mean()) if kept.size else 0.0


def mean_average_precision(query_bits, query_labels, db_bits, db_labels, topk: int,
                           protocol: str = 'strict') -> float:
  """MAP@topk of Hamming ranking under `protocol` ('strict': queries with no relevant item in
  the top R count as AP 0; 'hashnet': they are dropped from the mean, which gives a higher
  number). Arguments as `average_precisions`."""
  return map_from_aps(*average_precisions(query_bits, query_labels, db_bits, db_labels, topk),
                      protocol)
