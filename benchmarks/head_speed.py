"""Speed and memory of one training step (fwd + bwd) of the DET, naive HET-XL and HET-XL heads.

Each head is timed as `jax.jit(jax.value_and_grad(mean loss, argnums=(params, x)))`:
  * det: `heads.softmax.SoftmaxHead`, the deterministic baseline;
  * naive: edward2-style HET-XL written out here: noise [B, S, D] with edward2's one scalar
    normal per sample on the diagonal, all [B, S, K] f32 logits materialised, softmax, mean
    over samples, clip at 1e-7, log, cross-entropy;
  * hetxl: this project's `HETXLHead` (`diag_noise='independent'`, the paper's math), chunked
    over samples with `--chunk`, sample projection in `--dtype` with f32 accumulation;
  * hetxl-rank1: `HETXLHead(diag_noise='rank1')`, the exact factorised path, cost
    B*K*(R+1)*(D+S) instead of B*S*D*K. The naive head is fed the same draws (made outside
    its step), so its loss must equal this one unless the 1e-7 clip is active.

Columns: ms per step (median of `--repeats`), TFLOP/s of the nominal sample projection
(2*B*S*D*K flops over the whole fwd+bwd step time, so a lower bound on the matmul rate; for
rank1 an "effective" rate, since it does not do that matmul), XLA's compiled temporary memory
(`memory_analysis().temp_size_in_bytes`), the loss, and time / memory relative to naive.

Defaults fit a 2-core CPU in about a minute. GPU-sized run (JFT-4B class count, as in the paper):
  python benchmarks/head_speed.py --B 16 --D 1024 --K 29593 --R 50 --S 1000 --chunk 100 \
      --dtype bfloat16 --repeats 10
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

RNGS = {'standard_norm_noise_samples': jax.random.key(1), 'diag_noise_samples': jax.random.key(2)}


def naive_hetxl_loss(params, x, labels, eps_r, z, pe: bool, tau: float = 1.0):
  """Reference-style HET-XL: materialises [B, S, D] noise and [B, S, K] f32 logits.

  `eps_r` [B, S, R] and `z` [B, S, 1] are the standard normals (edward2's diagonal noise is one
  scalar per sample); passing the draws of `HETXLHead(diag_noise='rank1')` makes the two losses
  agree wherever the 1e-7 clipping is inactive.
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
  probs = jnp.clip(jax.nn.softmax(logits).mean(1), 1e-7)
  targets = jax.nn.one_hot(labels, probs.shape[-1])
  return optax.softmax_cross_entropy(jnp.log(probs), targets).mean()


def bench(name, loss_fn, params, x, repeats):
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', float('nan')) if mem is not None else float('nan')
  jax.block_until_ready(compiled(params, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    loss, _ = jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - t0)
  return dict(name=name, ms=1e3 * statistics.median(times), temp=temp, loss=float(loss))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--B', type=int, default=16)
  p.add_argument('--D', type=int, default=256)
  p.add_argument('--K', type=int, default=4096)
  p.add_argument('--R', type=int, default=16)
  p.add_argument('--S', type=int, default=64)
  p.add_argument('--chunk', type=int, default=16)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--pe', action='store_true', help='parameter-efficient variant')
  a = p.parse_args(argv)

  x = jax.random.normal(jax.random.key(0), (a.B, a.D))
  labels = jax.random.randint(jax.random.key(3), (a.B,), 0, a.K)
  kw = dict(num_classes=a.K, num_factors=a.R, parameter_efficient=a.pe, train_mc_samples=a.S,
            mc_chunk_size=a.chunk, compute_dtype=jnp.dtype(a.dtype))
  ours = HETXLHead(**kw)
  params = nn.meta.unbox(ours.clone(return_locs=True).init(
      {'params': jax.random.key(4)}, x)['params'])
  det = SoftmaxHead(num_classes=a.K)
  det_params = {'loc_layer': params['loc_layer']}

  rank1 = ours.clone(diag_noise='rank1')
  noise = rank1.apply({'params': params}, x, train=True, rngs=RNGS, method=rank1.draw_noise)

  def head_loss(head):
    return lambda p, x: head.apply({'params': p}, x, labels, train=True, rngs=RNGS).loss.mean()

  def naive_loss(p, x):
    return naive_hetxl_loss(p, x, labels, noise['eps_r'], noise['eps_diag'], a.pe)

  rows = [
      bench('det', head_loss(det), det_params, x, a.repeats),
      bench('naive HET-XL', naive_loss, params, x, a.repeats),
      bench('HET-XL (independent)', head_loss(ours), params, x, a.repeats),
      bench('HET-XL (rank1, factorised)', head_loss(rank1), params, x,
            a.repeats),
  ]
  flops = 2 * a.B * a.S * a.D * a.K
  naive = rows[1]
  print(f'B={a.B} D={a.D} K={a.K} R={a.R} S={a.S} chunk={a.chunk} dtype={a.dtype} '
        f'pe={a.pe} device={jax.devices()[0].device_kind}\n')
  print('| head | ms/step | TFLOP/s (proj) | temp MiB | loss | time vs naive | temp vs naive |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    tflops = '-' if r['name'] == 'det' else f"{flops / (r['ms'] * 1e-3) / 1e12:.3f}"
    print(f"| {r['name']} | {r['ms']:.2f} | {tflops} | {r['temp'] / 2**20:.1f} | "
          f"{r['loss']:.4f} | {r['ms'] / naive['ms']:.2f}x | {r['temp'] / naive['temp']:.2f}x |")


if __name__ == '__main__':
  main()
