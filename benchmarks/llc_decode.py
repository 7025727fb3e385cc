"""LLC decoding and ranking throughput on the host CPU (numpy), printed as markdown tables.

Decoding: queries start from real outputs o [Q, k]; each method binarises, then decodes against
L class codes. Dense float = argmax of sign(o) @ B^T in float32 (BLAS); MHD = bit-packed XOR +
popcount argmin (`llc.codes`); ED = packed-code binary search in a prebuilt table. Class-side
preparation (float B, packed B, ED table) is done once, outside the timings.
Ranking: Hamming ranking of a database of codes, counting sort vs a full np.argsort per query.

  python benchmarks/llc_decode.py                       # defaults: < ~3 min on 2 cores
  python benchmarks/llc_decode.py --classes 1000 100000 --bits 20
"""
import argparse
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llc import codes, retrieval  # noqa: E402

DENSE_BLOCK_ELEMS = 1 << 24     # float32 logits per block (64 MB)


def best_time(fn: Callable[[], object], repeats: int) -> float:
  """Minimum wall time of `repeats` calls, in seconds."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def noisy_outputs(rng: np.random.Generator, class_bits: np.ndarray, n: int,
                  noise: float) -> np.ndarray:
  """Real outputs o [n, k] around the +-1 codes of random classes (a few bits flip)."""
  labels = rng.integers(0, class_bits.shape[0], size=n)
  signs = np.where(class_bits[labels], 1.0, -1.0)
  return (signs + noise * rng.standard_normal(signs.shape)).astype(np.float32)


def dense_decode(outputs: np.ndarray, class_pm1: np.ndarray) -> np.ndarray:
  """argmax of sign(o) @ B^T in float32, in query blocks of bounded size."""
  rows = max(1, DENSE_BLOCK_ELEMS // class_pm1.shape[0])
  out = np.empty(outputs.shape[0], np.int64)
  for start in range(0, outputs.shape[0], rows):
    signs = np.where(outputs[start:start + rows] >= 0, 1.0, -1.0).astype(np.float32)
    out[start:start + rows] = np.argmax(signs @ class_pm1.T, axis=1)
  return out


def mhd_decode(outputs: np.ndarray, class_packed: np.ndarray, k: int) -> np.ndarray:
  """Binarise (o >= 0), pack, narrow, then minimum Hamming decode."""
  return codes.min_hamming_decode_packed(codes.narrow(codes.pack(outputs >= 0), k),
                                         class_packed)


def decode_row(rng: np.random.Generator, num_classes: int, k: int, args) -> str:
  """Times dense / MHD / ED for one (L, k); checks MHD == dense; returns a table row."""
  class_bits = rng.standard_normal((num_classes, k)) > 0
  class_pm1 = np.where(class_bits, 1.0, -1.0).astype(np.float32)
  class_packed = codes.narrow(codes.pack(class_bits), k)
  build = time.perf_counter()
  table = codes.code_table(class_bits)
  build = time.perf_counter() - build
  queries = int(np.clip(args.pair_budget // num_classes, args.min_queries, args.max_queries))
  outputs = noisy_outputs(rng, class_bits, queries, args.noise)
  ed_outputs = noisy_outputs(rng, class_bits, args.ed_queries, args.noise)
  if not np.array_equal(mhd_decode(outputs, class_packed, k), dense_decode(outputs, class_pm1)):
    raise AssertionError(f'MHD != dense argmax at L={num_classes}, k={k}')
  dense = queries / best_time(lambda: dense_decode(outputs, class_pm1), args.repeats)
  mhd = queries / best_time(lambda: mhd_decode(outputs, class_packed, k), args.repeats)
  ed = args.ed_queries / best_time(lambda: codes.exact_decode(ed_outputs >= 0, table),
                                   args.repeats)
  return (f'| {num_classes:>9,} | {k:>2} | {queries:>5} | {dense:>12,.0f} | {mhd:>12,.0f} '
          f'| {mhd / dense:>6.1f}x | {ed:>13,.0f} | {ed / dense:>9,.0f}x | {build * 1e3:>7.1f} |')


def decode_table(args) -> None:
  rng = np.random.default_rng(args.seed)
  print('| L | k | queries | dense float q/s | MHD packed q/s | MHD/dense | ED q/s '
        '| ED/dense | ED table build ms |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for num_classes in args.classes:
    for k in args.bits:
      print(decode_row(rng, num_classes, k, args), flush=True)


def rank_table(args) -> None:
  """Hamming ranking of a clustered database: counting sort vs full argsort per query."""
  rng = np.random.default_rng(args.seed + 1)
  k = args.rank_bits
  centres = rng.standard_normal((args.rank_clusters, k)) > 0
  db = noisy_outputs(rng, centres, args.db_size, args.noise) >= 0
  query = noisy_outputs(rng, centres, args.rank_queries, args.noise) >= 0
  db_packed = codes.narrow(codes.pack(db), k)
  query_packed = codes.narrow(codes.pack(query), k)
  dists = [next(codes.distance_blocks(query_packed[i:i + 1], db_packed, 0))[1][0]
           for i in range(args.rank_queries)]
  for dist in dists:
    expected = np.lexsort((np.arange(dist.size), dist))[:args.topk]
    if not np.array_equal(retrieval.counting_sort_topk(dist, args.topk), expected):
      raise AssertionError('counting sort != stable (distance, index) order')
  methods = {
      'Hamming distances (XOR + popcount), shared':
          lambda: [next(codes.distance_blocks(query_packed[i:i + 1], db_packed, 0))
                   for i in range(args.rank_queries)],
      f'counting sort, top {args.topk} (stable)':
          lambda: [retrieval.counting_sort_topk(d, args.topk) for d in dists],
      'np.argsort (default quicksort, ties unordered)':
          lambda: [np.argsort(d)[:args.topk] for d in dists],
      "np.argsort(kind='stable') (radix on uint8)":
          lambda: [np.argsort(d, kind='stable')[:args.topk] for d in dists],
  }
  times = {name: best_time(fn, args.repeats) / args.rank_queries * 1e3
           for name, fn in methods.items()}
  reference = times['np.argsort (default quicksort, ties unordered)']
  print(f'\nRanking {args.db_size:,} codes of {k} bits ({args.rank_clusters} clusters), '
        f'{args.rank_queries} queries, top {args.topk}:\n')
  print('| step | ms / query | argsort / this |')
  print('|---|---:|---:|')
  for name, ms in times.items():
    ratio = '' if name.startswith('Hamming') else f'{reference / ms:.1f}x'
    print(f'| {name} | {ms:.2f} | {ratio} |')


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--classes', type=int, nargs='+', default=[1000, 100_000, 1_000_000])
  p.add_argument('--bits', type=int, nargs='+', default=[16, 20, 32, 64])
  p.add_argument('--pair-budget', type=float, default=2.56e8,
                 help='queries x classes per (L, k) cell for dense and MHD')
  p.add_argument('--min-queries', type=int, default=256)
  p.add_argument('--max-queries', type=int, default=8192)
  p.add_argument('--ed-queries', type=int, default=100_000)
  p.add_argument('--noise', type=float, default=0.6, help='std of noise on +-1 outputs')
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--db-size', type=int, default=1_000_000)
  p.add_argument('--rank-bits', type=int, default=20)
  p.add_argument('--rank-clusters', type=int, default=1000)
  p.add_argument('--rank-queries', type=int, default=20)
  p.add_argument('--topk', type=int, default=1000)
  p.add_argument('--skip-rank', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def main(argv: Sequence[str] = None) -> None:
  args = parse_args(argv)
  print(f'numpy {np.__version__}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f} at start\n')
  decode_table(args)
  if not args.skip_rank:
    rank_table(args)


if __name__ == '__main__':
  main()
