"""Speed and memory of one training step (fwd + bwd) of the DET, naive, MC and quadrature heads.

Each head is compiled as `jax.jit(jax.value_and_grad(mean loss, argnums=(params, x)))` and
reported side by side, one table per link:

softmax link (`--link softmax` or `both`):
  * det: `heads.softmax.SoftmaxHead`, the deterministic baseline;
  * naive: edward2-style HET-XL written out here: noise [B, S, D] with edward2's one scalar
    normal per sample on the diagonal, all [B, S, K] f32 logits materialised, softmax, mean over
    samples, clip at 1e-7, log, cross-entropy;
  * mc c=N: this project's `HETXLHead` (`diag_noise='independent'`, the paper's math), the
    rematerialised scan over sample chunks of size N (one row per `--chunks` entry);
  * rank1: `HETXLHead(diag_noise='rank1')`, the exact factorised path, B*K*(R+1)*(D+S). The
    naive head is fed its draws, so the two losses agree unless the 1e-7 clip is active.
sigmoid link (`--link sigmoid` or `both`):
  * det, naive (as above with sigmoid, mean probability, clip, BCE summed over classes),
    mc c=N (`mc_method='mc'`), and quad: `mc_method='quadrature'` with `--nodes` nodes, the
    S -> infinity limit of mc (its loss differs from mc's by MC noise and Jensen bias only;
    naive's differs more, as it uses edward2's rank-1 diagonal noise).

Columns: ms per step (median of `--repeats`; '-' for rows not in `--time_rows` or under
`--compile_only`); XLA's compiled temporaries (`memory_analysis().temp_size_in_bytes`); GFLOP
and GB accessed from `cost_analysis()`; the loss; ratios to naive and to the first mc row. XLA's
cost analysis counts a while-loop body once, so for mc / rank1 rows FLOPs and bytes come from the
same head compiled unchunked (`mc_chunk_size=None`: same math, no loop; its bytes are those of
the materialised program, an upper bound for the chunked one). Temporaries always come from the
program that is timed.

Defaults fit a 2-core CPU in a few minutes. `--jft` sets the JFT-4B sizes of the paper's HET-XL
run (B=16 per device, D=1024, K=29,593, R=50, S=1000, PE); with `--compile_only` it prints
temporaries and FLOPs without running anything:
  python benchmarks/head_speed.py --jft --compile_only
  python benchmarks/head_speed.py --jft --link sigmoid --time_rows det,quad,mc
`--accuracy 16,24,32` prints the quadrature rule's error against scipy's adaptive integration
instead (the measurement behind the default `quadrature_nodes=32`).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from heads.softmax import SoftmaxHead  # noqa: E402
from hetxl import HETXLHead  # noqa: E402

RNGS = {stream: jax.random.key(i) for i, stream in enumerate(HETXLHead.rng_streams, start=1)}
JFT = dict(B=16, D=1024, K=29593, R=50, S=1000, pe=True)


def naive_hetxl_loss(params, x, labels, eps_r, z, pe: bool, link: str, tau: float = 1.0):
  """Reference-style HET-XL: materialises [B, S, D] noise and [B, S, K] f32 logits.

  `eps_r` [B, S, R] and `z` [B, S, 1] are the standard normals (edward2's diagonal noise is one
  scalar per sample); with the draws of `HETXLHead(diag_noise='rank1')` the softmax losses agree
  wherever the 1e-7 clipping is inactive.
  """
  batch, dim = x.shape
  lin = lambda name, inp: inp @ params[name]['kernel'] + params[name]['bias']
  if pe:
    noise = lin('scale_layer_homoscedastic', eps_r) * lin('scale_layer_heteroscedastic', x)[:, None]
  else:
    scale = lin('scale_layer', x).reshape(batch, dim, -1)
    noise = jnp.einsum('bdr,bsr->bsd', scale, eps_r)
  diag = jax.nn.softplus(lin('diag_layer', x)) + 1e-3
  logits = lin('loc_layer', x[:, None] + noise + diag[:, None] * z) / tau     # [B, S, K] f32
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if link == 'softmax':
    probs = jnp.clip(jax.nn.softmax(logits).mean(1), 1e-7)
    return optax.softmax_cross_entropy(jnp.log(probs), targets).mean()
  probs = jnp.clip(jax.nn.sigmoid(logits).mean(1), 1e-7, 1 - 1e-7)
  return optax.sigmoid_binary_cross_entropy(jnp.log(probs) - jnp.log1p(-probs),
                                            targets).sum(-1).mean()


def compiled_costs(compiled):
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', float('nan')) if mem is not None else float('nan')
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return temp, cost.get('flops', float('nan')), cost.get('bytes accessed', float('nan'))


def bench(name, loss_fn, abstract, make_args, repeats, cost_fn=None):
  """Compiles value_and_grad of `loss_fn(params, x, *rest)` for the `abstract` argument shapes;
  times it on `make_args()` unless that is None."""
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  compiled = step.lower(*abstract).compile()
  temp, flops, nbytes = compiled_costs(compiled)
  if cost_fn is not None:   # the unchunked program, for loop-free FLOP / byte counts
    _, flops, nbytes = compiled_costs(
        jax.jit(jax.value_and_grad(cost_fn, argnums=(0, 1))).lower(*abstract).compile())
  row = dict(name=name, ms=float('nan'), temp=temp, flops=flops, bytes=nbytes,
             loss=float('nan'))
  if make_args is not None:
    args = make_args()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      loss, _ = jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    row.update(ms=1e3 * statistics.median(times), loss=float(loss))
  print(f"  {name}: temp {temp / 2**20:.1f} MiB, {flops / 1e9:.2f} GFLOP"
        + (f", {row['ms']:.1f} ms" if make_args else ''), file=sys.stderr, flush=True)
  return row


def fmt(v, spec):
  return '-' if v != v else format(v, spec)   # NaN -> '-'


def print_table(title, rows):
  naive = next(r for r in rows if r['name'] == 'naive')
  mc = next((r for r in rows if r['name'].startswith('mc')), None)
  print(f'\n{title}\n')
  print('| head | ms/step | temp MiB | GFLOP | GB accessed | loss | time vs naive | temp vs naive '
        '| FLOP vs naive | time vs mc | temp vs mc |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    ratio = lambda key, ref: fmt(r[key] / ref[key] if ref else float('nan'), '.3f') + 'x'
    print(f"| {r['name']} | {fmt(r['ms'], '.1f')} | {r['temp'] / 2**20:.1f} | "
          f"{r['flops'] / 1e9:.2f} | {r['bytes'] / 1e9:.3f} | {fmt(r['loss'], '.4f')} | "
          f"{ratio('ms', naive)} | {ratio('temp', naive)} | {ratio('flops', naive)} | "
          f"{ratio('ms', mc)} | {ratio('temp', mc)} |")


def exact_log_p(z: float, r: float) -> float:
  """log E[sigmoid(u)], u ~ N(z, r^2), by scipy's adaptive quadrature in float64 over the region
  carrying the integrand's mass (around z and the tilted mode z + r^2, clipped at 0)."""
  import numpy as np
  from scipy import integrate
  def f(u):
    return np.exp(-np.logaddexp(0.0, -u) - (u - z) ** 2 / (2 * r * r)) / (r * np.sqrt(2 * np.pi))
  c = min(z + r * r, 0.0) if z < 0 else max(z - r * r, 0.0)
  lo, hi = min(z, c) - 14 * r, max(z, c) + 14 * r
  points = sorted({p for p in (0.0, c, z) if lo < p < hi})
  value, _ = integrate.quad(f, lo, hi, points=points, limit=2000, epsabs=0, epsrel=1e-12)
  return float(np.log(value))


def accuracy_table(node_counts):
  """Max error of `hetxl.quadrature` (float32) against float64 adaptive integration, on a grid
  z = m / tau in +-[0.01, 300] (40 values), r = s / tau in [1e-3, 300] (30 values)."""
  import numpy as np
  from hetxl.quadrature import sigmoid_log_marginals
  zs = np.concatenate([-np.geomspace(0.01, 300, 20), np.geomspace(0.01, 300, 20)])
  z, r = np.meshgrid(zs, np.geomspace(1e-3, 300, 30))
  want = np.vectorize(exact_log_p)(z, r), np.vectorize(exact_log_p)(-z, r)
  low = np.minimum(*want)
  print('\nquadrature accuracy: max |error| of log p and log(1 - p) against float64 adaptive '
        'integration\n')
  print('| nodes | where log p, log(1-p) > -40 | > -100 | relative, all cells |')
  print('|---:|---:|---:|---:|')
  for n in node_counts:
    got = jax.jit(lambda m, v: sigmoid_log_marginals(m, v, 1.0, n))(
        jnp.asarray(z, jnp.float32), jnp.asarray(r * r, jnp.float32))
    err = np.maximum(*(np.abs(np.asarray(g, np.float64) - w) for g, w in zip(got, want)))
    print(f'| {n} | {err[low > -40].max():.1e} | {err[low > -100].max():.1e} | '
          f'{(err / np.maximum(1, np.abs(low))).max():.1e} |')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--B', type=int, default=16)
  p.add_argument('--D', type=int, default=256)
  p.add_argument('--K', type=int, default=4096)
  p.add_argument('--R', type=int, default=16)
  p.add_argument('--S', type=int, default=256)
  p.add_argument('--chunks', default='32', help='comma-separated mc chunk sizes, one row each')
  p.add_argument('--nodes', type=int, default=32, help='quadrature nodes')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--pe', action='store_true', help='parameter-efficient variant')
  p.add_argument('--link', default='both', choices=['softmax', 'sigmoid', 'both'])
  p.add_argument('--jft', action='store_true', help='B=16 D=1024 K=29593 R=50 S=1000, PE')
  p.add_argument('--compile_only', action='store_true', help='temporaries and FLOPs only')
  p.add_argument('--time_rows', default='all',
                 help="rows to time: 'all' or a comma-separated subset of "
                      "det,naive,mc,rank1,quad (the rest are compiled only)")
  p.add_argument('--accuracy', default='',
                 help='comma-separated node counts: print the quadrature accuracy table only')
  a = p.parse_args(argv)
  if a.accuracy:
    accuracy_table([int(n) for n in a.accuracy.split(',')])
    return
  if a.jft:
    for key, value in JFT.items():
      setattr(a, key, value)
  chunks = [int(c) for c in a.chunks.split(',')]
  timed_keys = set() if a.compile_only else (
      {'det', 'naive', 'mc', 'rank1', 'quad'} if a.time_rows == 'all'
      else set(a.time_rows.split(',')))

  x = jax.random.normal(jax.random.key(0), (a.B, a.D))
  labels = jax.random.randint(jax.random.key(3), (a.B,), 0, a.K)
  kw = dict(num_classes=a.K, num_factors=a.R, parameter_efficient=a.pe, train_mc_samples=a.S,
            compute_dtype=jnp.dtype(a.dtype))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(HETXLHead(**kw, return_locs=True).init(
      {'params': jax.random.key(4)}, x)['params']))

  def make_params():
    return nn.meta.unbox(HETXLHead(**kw, return_locs=True).init(
        {'params': jax.random.key(4)}, x)['params'])

  def noise_shapes():
    return {'eps_r': jax.ShapeDtypeStruct((a.B, a.S, a.R), jnp.float32),
            'eps_diag': jax.ShapeDtypeStruct((a.B, a.S, 1), jnp.float32)}

  def draws(params):
    rank1 = HETXLHead(**kw, diag_noise='rank1')
    return rank1.apply({'params': params}, x, train=True, rngs=RNGS, method=rank1.draw_noise)

  print(f'B={a.B} D={a.D} K={a.K} R={a.R} S={a.S} chunks={chunks} nodes={a.nodes} '
        f'dtype={a.dtype} pe={a.pe} device={jax.devices()[0].device_kind} '
        f'cpus={os.cpu_count()}', flush=True)

  def head_loss(head):
    return lambda p, x: head.apply({'params': p}, x, labels, train=True, rngs=RNGS).loss.mean()

  def run(key, name, fn, cost_fn=None, with_noise=False):
    abstract = (shapes, x) + ((noise_shapes(),) if with_noise else ())
    def make_args():
      params = make_params()
      return (params, x) + ((draws(params),) if with_noise else ())
    return bench(name, fn, abstract, make_args if key in timed_keys else None, a.repeats,
                 cost_fn)

  for link in (['softmax', 'sigmoid'] if a.link == 'both' else [a.link]):
    print(f'\n== link={link}', file=sys.stderr)
    det = SoftmaxHead(num_classes=a.K, link=link)
    det_loss = lambda p, x: det.apply({'params': {'loc_layer': p['loc_layer']}}, x,
                                      labels).loss.mean()
    rows = [run('det', 'det', det_loss),
            run('naive', 'naive',
                lambda p, x, n: naive_hetxl_loss(p, x, labels, n['eps_r'], n['eps_diag'],
                                                 a.pe, link), with_noise=True)]
    mc_head = HETXLHead(**kw, link=link)
    for chunk in chunks:
      rows.append(run('mc', f'mc c={chunk}', head_loss(mc_head.clone(mc_chunk_size=chunk)),
                      cost_fn=head_loss(mc_head.clone(mc_chunk_size=None))))
    if link == 'softmax':
      rank1 = mc_head.clone(diag_noise='rank1', mc_chunk_size=chunks[0])
      rows.append(run('rank1', f'rank1 c={chunks[0]}', head_loss(rank1),
                      cost_fn=head_loss(rank1.clone(mc_chunk_size=None))))
    else:
      quad = mc_head.clone(mc_method='quadrature', quadrature_nodes=a.nodes)
      rows.append(run('quad', f'quad n={a.nodes}', head_loss(quad)))
    print_table(f'link={link}', rows)


if __name__ == '__main__':
  main()
