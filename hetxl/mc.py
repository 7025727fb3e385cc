"""Monte-Carlo machinery: chunk-consistent noise draws and a chunked log-mean-exp over samples.

`mc_log_mean_exp` never holds more than one chunk of [B, chunk, K] logits: it scans over sample
chunks with a rematerialised (`jax.checkpoint`) body and keeps a running logsumexp per class.
Peak memory is O(B * chunk * K) for the chunk plus O(B * K * S / chunk) for the per-step carries
that the backward pass of the scan keeps.
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

SampleFn = Callable[[jax.Array], jax.Array]   # sample indices [C] -> pre-tau logits [B, C, K]
LogFn = Callable[[jax.Array], Sequence[jax.Array]]   # [B, C, K] -> tuple of log-values [B, C, K]


def normal_upfront(key: jax.Array, batch_size: int, num_samples: int, dim: int,
                   share: bool) -> jax.Array:
  """All S draws of a low-dimensional noise at once: [B, S, dim] (one [1, S, dim] if shared)."""
  eps = jax.random.normal(key, (1 if share else batch_size, num_samples, dim), jnp.float32)
  return jnp.broadcast_to(eps, (batch_size, num_samples, dim)) if share else eps


def normal_per_sample(key: jax.Array, idx: jax.Array, batch_size: int, dim: int,
                      share: bool) -> jax.Array:
  """Noise for the sample indices `idx` [C]: [B or 1, C, dim], sample s drawn from fold_in(key, s).

  Each sample's draw depends only on its index, so any chunking of the samples gives the same
  noise; only one chunk of it ever exists.
  """
  shape = (1 if share else batch_size, dim)
  eps = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), shape, jnp.float32))(idx)
  return jnp.swapaxes(eps, 0, 1)


def take_samples(eps: jax.Array, idx: jax.Array) -> jax.Array:
  """Samples `idx` [C] of upfront noise [B, S, d]; indices past S (chunk padding) are clipped."""
  return jnp.take(eps, idx, axis=1, mode='clip')


def mc_log_mean_exp(sample_fn: SampleFn, log_fn: LogFn, num_samples: int,
                    chunk_size: Optional[int] = None) -> Tuple[jax.Array, ...]:
  """For each output f of `log_fn`: log (1/S) sum_s exp(f(u_s)), [B, K], via chunks of samples.

  `sample_fn(idx)` returns the pre-tau logits of the samples `idx` [C]; `log_fn` maps them to
  per-sample log-values (log_softmax, log_sigmoid). Samples are processed `chunk_size` at a time
  (all at once if None); padding samples of the last chunk are masked out, so the result does
  not depend on the chunk size beyond float rounding.
  """
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples}')
  chunk = num_samples if not chunk_size else min(int(chunk_size), num_samples)
  num_chunks = math.ceil(num_samples / chunk)
  padded = num_chunks * chunk != num_samples
  idx = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)

  @jax.checkpoint
  def chunk_lse(idx_c):
    values = log_fn(sample_fn(idx_c))
    if padded:
      valid = (idx_c < num_samples)[None, :, None]
      values = [jnp.where(valid, v, -jnp.inf) for v in values]
    return tuple(jax.nn.logsumexp(v, axis=1) for v in values)

  # The first chunk initialises the carry, so it has the shardings of the chunk results.
  acc = chunk_lse(idx[0])
  if num_chunks > 1:
    def body(carry, idx_c):
      return tuple(jnp.logaddexp(a, b) for a, b in zip(carry, chunk_lse(idx_c))), None
    acc, _ = jax.lax.scan(body, acc, idx[1:])
  log_s = math.log(num_samples)
  return tuple(a - log_s for a in acc)
