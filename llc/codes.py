"""Binary codes: bit packing, Hamming distance, minimum-Hamming and exact decoding, LLC metrics.

Bits are boolean [N, k]; non-bool input means `x > 0` ({0,1} and {-1,+1} codes both work; real
instance outputs o should be binarised by the caller as o >= 0). Packed codes are uint64
[N, ceil(k/64)]: bit j of a code is bit j % 64 of word j // 64; pad bits are zero.
Everything runs in numpy on the host, except `straight_through_sign` (JAX).
"""
from typing import Iterator, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# Elements of one [rows, Nb] distance block; bounds temporary memory to a few bytes * this.
BLOCK_ELEMS = 1 << 16
# Class indices [N], or (indices [N], tie flags [N]) with return_ties=True.
DecodeResult = Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]


def as_bool(bits) -> np.ndarray:
  """Boolean numpy view of codes: bool input kept, anything else thresholded at > 0."""
  bits = np.asarray(bits)
  return bits if bits.dtype == np.bool_ else bits > 0


def pack(bits) -> np.ndarray:
  """Packs boolean codes [N, k] into uint64 words [N, ceil(k/64)] (little-endian bit order)."""
  bits = as_bool(bits)
  n, k = bits.shape
  words = -(-k // 64)
  packed = np.zeros((n, words * 8), np.uint8)
  packed[:, :-(-k // 8)] = np.packbits(bits, axis=1, bitorder='little')
  return packed.view('<u8').astype(np.uint64, copy=False)


def unpack(packed, k: int) -> np.ndarray:
  """Inverse of `pack`: uint64 [N, W] -> boolean [N, k]."""
  packed = np.ascontiguousarray(np.asarray(packed, np.uint64).astype('<u8', copy=False))
  as_bytes = packed.view(np.uint8).reshape(packed.shape[0], -1)
  return np.unpackbits(as_bytes, axis=1, count=k, bitorder='little').astype(bool)


def narrow(packed: np.ndarray, k: int) -> np.ndarray:
  """Same codes in the smallest word that holds k bits (uint8/16/32) when k <= 32; else unchanged.

  Hamming distances are unchanged; smaller words mean less memory traffic in `distance_blocks`.
  """
  for limit, dtype in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
    if k <= limit:
      return packed[:, :1].astype(dtype)
  return packed


def distance_blocks(packed_a: np.ndarray, packed_b: np.ndarray,
                    block_elems: int = BLOCK_ELEMS) -> Iterator[Tuple[int, np.ndarray]]:
  """Yields (row start, Hamming distances [rows, Nb]) over row blocks of `packed_a`.

  Distances are uint8 for one word (k <= 64), else uint16 (k < 65536).
  """
  a, b = np.asarray(packed_a), np.asarray(packed_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'word counts differ: {a.shape[1]} vs {b.shape[1]}')
  rows = max(1, block_elems // max(1, b.shape[0]))
  for start in range(0, a.shape[0], rows):
    block = a[start:start + rows]
    if a.shape[1] == 1:
      yield start, np.bitwise_count(block[:, :1] ^ b[:, 0])
      continue
    dist = np.zeros((block.shape[0], b.shape[0]), np.uint16)
    for w in range(a.shape[1]):
      dist += np.bitwise_count(block[:, w:w + 1] ^ b[:, w])
    yield start, dist


def hamming(packed_a, packed_b, block_elems: int = BLOCK_ELEMS) -> np.ndarray:
  """Pairwise Hamming distances int32 [Na, Nb] between packed codes (XOR + popcount)."""
  a, b = np.asarray(packed_a), np.asarray(packed_b)
  out = np.empty((a.shape[0], b.shape[0]), np.int32)
  for start, dist in distance_blocks(a, b, block_elems):
    out[start:start + dist.shape[0]] = dist
  return out


def min_hamming_decode_packed(inst_packed: np.ndarray, class_packed: np.ndarray,
                              return_ties: bool = False,
                              block_elems: int = BLOCK_ELEMS) -> DecodeResult:
  """MHD on packed codes: argmin over classes of Hamming distance, ties -> lowest class index.

  Returns indices int64 [N], plus a bool [N] flag "several classes at the minimum distance"
  when `return_ties`.
  """
  n = inst_packed.shape[0]
  idx = np.empty(n, np.int64)
  tied = np.empty(n, bool)
  for start, dist in distance_blocks(inst_packed, class_packed, block_elems):
    stop = start + dist.shape[0]
    idx[start:stop] = np.argmin(dist, axis=1)
    if return_ties:
      best = np.take_along_axis(dist, idx[start:stop, None], axis=1)
      tied[start:stop] = (dist == best).sum(axis=1) > 1
  return (idx, tied) if return_ties else idx


def min_hamming_decode(inst_bits, class_bits, return_ties: bool = False) -> DecodeResult:
  """Minimum Hamming decoding of instance codes [N, k] against a codebook [L, k].

  Class = argmin_c Hamming(code, B_c), ties -> lowest index. With `return_ties` also returns the
  tie flag [N] (more than one class at the minimum distance).
  """
  inst_bits, class_bits = as_bool(inst_bits), as_bool(class_bits)
  k = class_bits.shape[1]
  return min_hamming_decode_packed(narrow(pack(inst_bits), k), narrow(pack(class_bits), k),
                                   return_ties)


class CodeTable(NamedTuple):
  """Sorted lookup table {packed code -> classes} for exact decoding."""
  keys: np.ndarray      # sorted unique row keys of the codebook
  first: np.ndarray     # lowest class index holding each key
  counts: np.ndarray    # number of classes holding each key


def row_keys(packed: np.ndarray) -> np.ndarray:
  """One sortable, comparable key per packed row: the word itself, or a W-field record."""
  packed = np.ascontiguousarray(packed, np.uint64)
  if packed.shape[1] == 1:
    return packed[:, 0]
  fields = np.dtype([(f'w{i}', np.uint64) for i in range(packed.shape[1])])
  return packed.view(fields)[:, 0]


def code_table(class_bits) -> CodeTable:
  """Builds the exact-decoding table of a codebook [L, k] (one sort, O(L log L))."""
  keys, first, counts = np.unique(row_keys(pack(class_bits)), return_index=True,
                                  return_counts=True)
  return CodeTable(keys, first, counts)


MATCH, AMBIGUOUS, NO_MATCH = 0, 1, 2   # exact_decode statuses


def exact_decode(inst_bits, class_bits: Union[np.ndarray, CodeTable]
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Exact decoding: look the whole code up in {class code -> classes} (binary search).

  `class_bits` is a codebook [L, k] or a prebuilt `code_table`. Returns (index [N], status [N]):
  status 0 = match (exactly one class has the code), 1 = ambiguous (several classes share it;
  index = lowest of them), 2 = no match (index -1).
  """
  table = class_bits if isinstance(class_bits, CodeTable) else code_table(class_bits)
  query = row_keys(pack(inst_bits))
  pos = np.minimum(np.searchsorted(table.keys, query), len(table.keys) - 1)
  found = table.keys[pos] == query
  idx = np.where(found, table.first[pos], -1)
  status = np.where(found, np.where(table.counts[pos] > 1, AMBIGUOUS, MATCH),
                    NO_MATCH).astype(np.int8)
  return idx, status


def unique_codes(class_bits) -> int:
  """Number of distinct codes in a codebook [L, k]."""
  return int(np.unique(row_keys(pack(class_bits))).size)


def shared_codes(class_bits) -> list[list[int]]:
  """Groups of classes (ascending, each of 2 or more) whose codes are identical, by first class."""
  _, inverse, counts = np.unique(row_keys(pack(class_bits)), return_inverse=True,
                                 return_counts=True)
  groups = [np.flatnonzero(inverse == g).tolist() for g in np.flatnonzero(counts > 1)]
  return sorted(groups)


def bits_right(inst_bits, true_class_bits) -> float:
  """Mean over rows of k - Hamming(instance code, its true class code); inputs aligned [N, k]."""
  inst_bits, true_class_bits = as_bool(inst_bits), as_bool(true_class_bits)
  return float(np.mean(np.sum(inst_bits == true_class_bits, axis=1)))


def llc_metrics(inst_bits, labels, class_bits) -> dict:
  """LLC evaluation of instance codes [N, k] with labels [N] against a codebook [L, k].

  ed_strict_accuracy counts a unique match to the true class only; ed_lenient_accuracy is the
  reference rule (code == true class code, even when other classes share that code).
  """
  inst_bits, class_bits = as_bool(inst_bits), as_bool(class_bits)
  labels = np.asarray(labels)
  ed_idx, status = exact_decode(inst_bits, class_bits)
  mhd_idx, tied = min_hamming_decode(inst_bits, class_bits, return_ties=True)
  true_codes = class_bits[labels]
  return {
      'unique_codes': unique_codes(class_bits),
      'ed_strict_accuracy': float(np.mean((status == MATCH) & (ed_idx == labels))),
      'ed_lenient_accuracy': float(np.mean(np.all(inst_bits == true_codes, axis=1))),
      'ed_ambiguous_rate': float(np.mean(status == AMBIGUOUS)),
      'ed_no_match_rate': float(np.mean(status == NO_MATCH)),
      'mhd_accuracy': float(np.mean(mhd_idx == labels)),
      'mhd_tie_rate': float(np.mean(tied)),
      'bits_right': bits_right(inst_bits, true_codes),
  }


MAX_PAIRWISE_CLASSES = 50_000   # min_class_distance is O(L^2); skipped (None) above this


def min_class_distance(class_bits: np.ndarray) -> Optional[int]:
  """Smallest Hamming distance between two classes' codes (0 when codes collide); None for
  more than MAX_PAIRWISE_CLASSES classes."""
  closest = closest_class_pairs(class_bits)
  return None if closest is None else closest[0]


def closest_class_pairs(class_bits: np.ndarray) -> Optional[Tuple[int, list]]:
  """(the smallest Hamming distance between two classes' codes, the class pairs (i < j) at
  that distance); None for more than MAX_PAIRWISE_CLASSES classes."""
  if class_bits.shape[0] > MAX_PAIRWISE_CLASSES:
    return None
  packed = narrow(pack(class_bits), class_bits.shape[1])
  best, pairs = class_bits.shape[1], []
  for start, dist in distance_blocks(packed, packed):
    rows = np.arange(dist.shape[0])
    dist = dist.astype(np.int64)
    dist[rows, start + rows] = class_bits.shape[1] + 1
    low = int(dist.min())
    if low < best:
      best, pairs = low, []
    if low == best:
      i, j = np.nonzero(dist == best)
      pairs += [(int(a), int(b)) for a, b in zip(start + i, j) if a < b]
  return best, pairs


def close_codes_warning(class_bits: np.ndarray) -> str:
  """One line when two classes' codes are at most 1 bit apart (a shared code: exact decoding
  cannot tell them apart; 1 bit: one wrong bit turns one into the other, and min-Hamming
  decoding cannot correct it), else ''."""
  closest = closest_class_pairs(class_bits)
  if closest is None or closest[0] > 1:
    return ''
  distance, pairs = closest
  what = 'share a code' if distance == 0 else 'have codes 1 bit apart'
  cost = ('exact decoding cannot tell them apart' if distance == 0 else
          'one wrong bit turns one into the other, and min-Hamming decoding cannot correct it')
  (i, j), bits = pairs[0], class_bits.shape[1]
  return (f'{len(pairs)} pair(s) of classes {what} in this {bits}-bit codebook (e.g. classes {i} '
          f'and {j}): {cost}; train phase 1 longer or with more bits')


def straight_through_sign(c: jax.Array) -> jax.Array:
  """Forward where(c > 0, +1, -1) (float, exactly +-1); backward identity (straight-through).

  Written as sign + (c - stop_gradient(c)) rather than c + stop_gradient(sign - c): same
  gradient, but the forward value is exact even for |c| >= 2^24 where c + (sign - c) rounds.
  """
  sign = jnp.where(c > 0, 1.0, -1.0).astype(c.dtype)
  return sign + (c - jax.lax.stop_gradient(c))
