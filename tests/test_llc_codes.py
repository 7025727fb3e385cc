"""Oracles for LLC codes: STE, packing, Hamming, MHD/ED decoding, MAP@R, baseline codebooks."""
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

from llc import baselines, codes, retrieval

K_VALUES = (1, 7, 20, 33, 64, 65, 130)


def random_bits(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  return rng.integers(0, 2, size=(n, k)).astype(bool)


def reference_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (a[:, None, :] != b[None, :, :]).sum(-1)


def int_codes(values, k: int) -> np.ndarray:
  """Boolean [len(values), k] codes: bit j of each integer."""
  return (np.asarray(values)[:, None] >> np.arange(k)) & 1 == 1


# --- straight-through sign ---------------------------------------------------------------------

def test_ste_forward_is_exactly_plus_minus_one():
  c = jnp.array([-1e30, -3.7, -1e-8, 0.0, 1e-8, 0.3, 3.3, 5e7, 1e30], jnp.float32)
  out = np.asarray(codes.straight_through_sign(c))
  np.testing.assert_array_equal(out, [-1, -1, -1, -1, 1, 1, 1, 1, 1])
  assert out.dtype == np.float32


def test_ste_gradient_wrt_codebook_equals_gradient_wrt_binary_codes():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  labels = jnp.array([0, 1, 2, 3, 1, 0])

  def loss_of_b(b):
    logp = jax.nn.log_softmax(z @ b.T)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

  grad_c = jax.grad(lambda c: loss_of_b(codes.straight_through_sign(c)))(c)
  grad_b = jax.grad(loss_of_b)(jnp.where(c > 0, 1.0, -1.0))
  assert float(jnp.abs(grad_b).max()) > 0
  np.testing.assert_array_equal(np.asarray(grad_c), np.asarray(grad_b))


# --- packing and Hamming -----------------------------------------------------------------------

@pytest.mark.parametrize('k', K_VALUES)
def test_pack_round_trip_and_zero_padding(k):
  bits = random_bits(np.random.default_rng(k), 19, k)
  packed = codes.pack(bits)
  assert packed.dtype == np.uint64 and packed.shape == (19, -(-k // 64))
  np.testing.assert_array_equal(codes.unpack(packed, k), bits)
  np.testing.assert_array_equal(np.bitwise_count(packed).sum(1), bits.sum(1))


@pytest.mark.parametrize('k', K_VALUES)
@pytest.mark.parametrize('block_elems', (7, codes.BLOCK_ELEMS))
def test_packed_hamming_matches_numpy_reference(k, block_elems):
  rng = np.random.default_rng(100 + k)
  a, b = random_bits(rng, 37, k), random_bits(rng, 53, k)
  expected = reference_hamming(a, b)
  got = codes.hamming(codes.pack(a), codes.pack(b), block_elems=block_elems)
  np.testing.assert_array_equal(got, expected)
  narrowed = codes.hamming(codes.narrow(codes.pack(a), k), codes.narrow(codes.pack(b), k))
  np.testing.assert_array_equal(narrowed, expected)


# --- minimum Hamming decoding ------------------------------------------------------------------

@pytest.mark.parametrize('k', K_VALUES)
def test_mhd_matches_reference_argmin(k):
  rng = np.random.default_rng(200 + k)
  inst, book = random_bits(rng, 41, k), random_bits(rng, 29, k)
  dist = reference_hamming(inst, book)
  idx, tied = codes.min_hamming_decode(inst, book, return_ties=True)
  np.testing.assert_array_equal(idx, np.argmin(dist, axis=1))
  np.testing.assert_array_equal(tied, (dist == dist.min(1, keepdims=True)).sum(1) > 1)


def test_mhd_tie_goes_to_lowest_index_and_is_flagged():
  book = int_codes([0b1111, 0b0011, 0b0101, 0b1000], 4)
  inst = int_codes([0b0001, 0b0011, 0b1001], 4)
  # distances: 0001 -> [3, 1, 1, 2]; 0011 -> [2, 0, 2, 3]; 1001 -> [2, 2, 2, 1]
  idx, tied = codes.min_hamming_decode(inst, book, return_ties=True)
  np.testing.assert_array_equal(idx, [1, 1, 3])
  np.testing.assert_array_equal(tied, [True, False, False])
  np.testing.assert_array_equal(codes.min_hamming_decode(inst, book), [1, 1, 3])


# --- exact decoding and metrics ----------------------------------------------------------------

def planted_codebook(k: int) -> np.ndarray:
  """5 classes; class 3 duplicates class 1. k = 10 * r: the 10-bit codes repeated r times."""
  book10 = int_codes([5, 300, 77, 300, 1000], 10)
  return np.tile(book10, (1, k // 10))


def planted_instances(k: int) -> np.ndarray:
  """Codes of classes 0 and 3, an absent code (class 2 with bit 0 flipped), class 4."""
  inst = np.tile(int_codes([5, 300, 77, 1000], 10), (1, k // 10))
  inst[2, 0] = ~inst[2, 0]
  return inst


@pytest.mark.parametrize('k', (10, 70, 130))
def test_exact_decode_statuses_on_planted_duplicate(k):
  book, inst = planted_codebook(k), planted_instances(k)
  idx, status = codes.exact_decode(inst, book)
  np.testing.assert_array_equal(status, [0, 1, 2, 0])
  np.testing.assert_array_equal(idx, [0, 1, -1, 4])
  assert codes.unique_codes(book) == 4
  assert codes.shared_codes(book) == [[1, 3]]


def test_shared_codes_matches_pairwise_equality():
  book = random_bits(np.random.default_rng(4), 60, 4)        # 60 classes, 16 codes
  equal = np.all(book[:, None, :] == book[None, :, :], axis=-1)
  want = sorted({tuple(np.flatnonzero(row)) for row in equal if row.sum() > 1})
  assert [tuple(g) for g in codes.shared_codes(book)] == want
  assert codes.shared_codes(book[:1]) == []


def test_exact_decode_matches_dense_reference_with_many_duplicates():
  rng = np.random.default_rng(3)
  book, inst = random_bits(rng, 40, 5), random_bits(rng, 200, 5)
  equal = np.all(inst[:, None, :] == book[None, :, :], axis=-1)
  count = equal.sum(1)
  idx, status = codes.exact_decode(inst, codes.code_table(book))
  np.testing.assert_array_equal(status, np.select([count == 1, count > 1], [0, 1], 2))
  np.testing.assert_array_equal(idx, np.where(count > 0, np.argmax(equal, axis=1), -1))


@pytest.mark.parametrize('k', (10, 70))
def test_llc_metrics_strict_and_lenient_differ_on_planted_duplicate(k):
  book, inst = planted_codebook(k), planted_instances(k)
  labels = np.array([0, 3, 2, 4])
  m = codes.llc_metrics(inst, labels, book)
  # strict: class 0 and 4 match uniquely; the shared code (label 3) decodes to 1; absent fails.
  assert m['ed_strict_accuracy'] == 0.5
  # lenient (reference rule): the shared code equals the true class-3 code, so it counts.
  assert m['ed_lenient_accuracy'] == 0.75
  assert m['ed_ambiguous_rate'] == 0.25 and m['ed_no_match_rate'] == 0.25
  # MHD: the absent code is 1 bit from class 2 (others >= 3); the shared code ties 1 vs 3 -> 1.
  assert m['mhd_accuracy'] == 0.75 and m['mhd_tie_rate'] == 0.25
  assert m['unique_codes'] == 4
  assert m['bits_right'] == pytest.approx(k - 0.25)


# --- retrieval ---------------------------------------------------------------------------------

def test_map_on_hand_computed_ranking():
  db = int_codes([0b110, 0b100, 0b000, 0b001, 0b111], 3)   # bit j = (value >> j) & 1
  db_labels = np.array([1, 0, 1, 1, 1])
  queries = int_codes([0b000, 0b111, 0b101], 3)
  query_labels = np.array([1, 2, 0])
  # query 000: distances [2, 1, 0, 1, 3] -> ranking 2, 1, 3, 0 (top 4), relevant [1, 0, 1, 1]:
  #   AP = (1/1 + 2/3 + 3/4) / 3 = 29/36.
  # query 111 (label 2): nothing relevant in the top 4 -> AP = 0 (kept in the mean).
  # query 101: distances [2, 1, 2, 1, 1] -> ranking 1, 3, 4, 0 (ties by index), relevant
  #   [1, 0, 0, 0] -> AP = 1/1 = 1 (with reversed tie order it would be 1/3).
  expected = (Fraction(29, 36) + 0 + 1) / 3                  # = 65/108
  got = retrieval.mean_average_precision(queries, query_labels, db, db_labels, topk=4)
  assert got == pytest.approx(float(expected), abs=1e-12)
  # HashNet protocol: query 111 retrieves nothing relevant and leaves the mean.
  got = retrieval.mean_average_precision(queries, query_labels, db, db_labels, topk=4,
                                         protocol='hashnet')
  assert got == pytest.approx(float((Fraction(29, 36) + 1) / 2), abs=1e-12)


@pytest.mark.parametrize('multilabel', (False, True))
def test_map_protocols_equal_brute_force(multilabel):
  """Both MAP@R protocols against a brute force: full stable sort of (distance, index), AP
  as the mean of precision@i over relevant ranks i <= R, then the mean over all queries
  (strict) or over the queries with a relevant item in their top R (hashnet)."""
  rng = np.random.default_rng(11 + multilabel)
  k, nq, nd, r = 9, 60, 300, 7
  qb, db = random_bits(rng, nq, k), random_bits(rng, nd, k)
  if multilabel:
    ql, dl = rng.random((nq, 12)) < 0.08, rng.random((nd, 12)) < 0.08
  else:
    ql, dl = rng.integers(0, 40, nq), rng.integers(0, 40, nd)
  aps, found = [], []
  for i in range(nq):
    dist = np.sum(qb[i] != db, axis=1)
    top = sorted(range(nd), key=lambda j: (dist[j], j))[:r]
    rel = [bool(np.any(ql[i] & dl[j])) if multilabel else ql[i] == dl[j] for j in top]
    precisions = [sum(rel[:pos + 1]) / (pos + 1) for pos in range(r) if rel[pos]]
    aps.append(np.mean(precisions) if precisions else 0.0)
    found.append(bool(precisions))
  aps, found = np.array(aps), np.array(found)
  assert 0 < found.sum() < nq     # both protocols differ on this draw
  for protocol, want in (('strict', aps.mean()), ('hashnet', aps[found].mean())):
    got = retrieval.mean_average_precision(qb, ql, db, dl, topk=r, protocol=protocol)
    assert got == pytest.approx(want, abs=1e-12), protocol
  with pytest.raises(ValueError, match='protocol must be one of'):
    retrieval.mean_average_precision(qb, ql, db, dl, topk=r, protocol='hashNet')


def test_map_multilabel_relevance():
  db = int_codes([0b00, 0b11, 0b01], 2)
  db_labels = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
  # query 00, labels {1, 2}: ranking 0, 2, 1 -> relevant [0, 1, 1] -> AP = (1/2 + 2/3) / 2 = 7/12.
  got = retrieval.mean_average_precision(int_codes([0], 2), np.array([[0, 1, 1]]), db,
                                         db_labels, topk=3)
  assert got == pytest.approx(7 / 12)


@pytest.mark.parametrize('topk', (1, 10, 257, 5000))
def test_counting_sort_equals_stable_argsort(topk):
  rng = np.random.default_rng(topk)
  dist = rng.integers(0, 21, size=5000).astype(np.uint8)
  expected = np.lexsort((np.arange(dist.size), dist))[:topk]
  np.testing.assert_array_equal(retrieval.counting_sort_topk(dist, topk), expected)


@pytest.mark.parametrize('k', (12, 65))
def test_hamming_rank_equals_stable_argsort_by_distance_then_index(k):
  rng = np.random.default_rng(k)
  db, query = random_bits(rng, 3000, k), random_bits(rng, 1, k)
  dist = reference_hamming(query, db)[0]
  expected = np.argsort(dist, kind='stable')[:100]
  got = retrieval.hamming_rank(codes.pack(query)[0], codes.pack(db), 100)
  np.testing.assert_array_equal(got, expected)


# --- baseline codebooks ------------------------------------------------------------------------

def test_svd_codebook_recovers_known_singular_vectors():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((12, 8)))
  v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  weight = u @ np.diag([9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5]) @ v.T
  expected = baselines.fix_column_signs(u[:, :5]) > 0
  np.testing.assert_array_equal(baselines.svd_codebook(weight, 5), expected)
  flipped = baselines.svd_codebook(-weight, 5)       # sign-flipped SVD: same canonical codebook
  np.testing.assert_array_equal(flipped, expected)


def test_cca_codebook_unique_on_separable_classes():
  num_classes, bits = 16, 6                            # k = log2(L) + 2
  signs = hadamard(16)[:, [1, 2, 4, 8, 3, 12]].astype(float)   # orthogonal, balanced, distinct
  rng = np.random.default_rng(0)
  means = np.concatenate([signs * np.linspace(3.0, 1.5, bits), np.zeros((num_classes, 10))], 1)
  labels = np.repeat(np.arange(num_classes), 60)
  mixing = rng.standard_normal((16, 16))             # CCA is invariant to invertible mixing
  features = (means[labels] + rng.standard_normal((labels.size, 16))) @ mixing
  book = baselines.cca_codebook(features, labels, num_classes, bits)
  assert book.shape == (num_classes, bits) and book.dtype == bool
  assert codes.unique_codes(book) == num_classes
  same_up_to_sign = (book == (signs > 0)).all(0) | (book == (signs < 0)).all(0)
  assert same_up_to_sign.all()


def test_random_codebook_is_reproducible_by_seed():
  a, b = baselines.random_codebook(100, 20, seed=1), baselines.random_codebook(100, 20, seed=1)
  assert a.shape == (100, 20) and a.dtype == bool
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, baselines.random_codebook(100, 20, seed=2))


@pytest.mark.parametrize('source', ('bool', 'real'))
def test_warm_start_values_keep_signs_with_kaiming_std(source):
  rng = np.random.default_rng(0)
  real = rng.standard_normal((500, 20)) * 5 + 0.1
  book = real > 0
  values = baselines.warm_start_values(book if source == 'bool' else real, 20, seed=0)
  assert values.shape == (500, 20)
  np.testing.assert_array_equal(values > 0, book)
  assert values.std() == pytest.approx(np.sqrt(2 / 20), rel=1e-5)


@pytest.mark.parametrize('k', [16, 70])
def test_closest_class_pairs_and_the_close_codes_warning_against_brute_force(k):
  """Issue 28 point 7: a codebook with two classes one bit apart gets a one-line warning
  naming how many pairs and one of them; the pairs are the brute-force closest ones (one
  word and two-word codes); codes 2 bits apart or more get none."""
  rng = np.random.default_rng(k)
  book = rng.random((40, k)) < 0.5
  book[7] = book[3]
  book[7, 5] = ~book[7, 5]   # classes 3 and 7: 1 bit apart
  dist = (book[:, None, :] != book[None, :, :]).sum(-1)
  np.fill_diagonal(dist, k + 1)
  expected = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(dist == dist.min())) if i < j)
  distance, pairs = codes.closest_class_pairs(book)
  assert distance == dist.min() == 1 and sorted(pairs) == expected
  assert codes.min_class_distance(book) == 1
  warning = codes.close_codes_warning(book)
  assert warning.startswith(f'{len(expected)} pair(s) of classes have codes 1 bit apart in this '
                            f'{k}-bit codebook (e.g. classes {expected[0][0]} and ')
  book[7] = book[3]
  assert 'share a code' in codes.close_codes_warning(book)
  far = np.array([[0] * k, [1] * 2 + [0] * (k - 2), [1] * k], bool)
  assert codes.close_codes_warning(far) == '' and codes.min_class_distance(far) == 2
