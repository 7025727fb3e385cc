"""SOC head: each class is a diagonal Gaussian in a learnt m-dim embedding space.

logits_k(x) = log N(x; mu_k, diag(s_k^2)) = sum_d -0.5((x_d - mu_kd)/s_kd)^2 - log s_kd - 0.5 log 2pi
computed as quadratic forms (x^2 @ (1/s^2)^T - 2 x @ (mu/s^2)^T + sum mu^2/s^2), so no [B, K, m]
tensor exists. With unit scale this is -0.5 |x - mu_k|^2 - (m/2) log 2pi.

loss = (CE(image logits, y) + CE(class logits, arange(K))) / 2, both with label smoothing, where
the class logits are the densities of the class means themselves ([K, K]): that term pushes
means apart and smoothing gives it a finite equilibrium. It costs K^2 m time, fine up to ~10^4
classes (beyond that it dominates the step), and O(CLASS_BLOCK * K) memory: rows of class
means are taken CLASS_BLOCK at a time with a rematerialised body, never the [K, K] matrix.

Parameters: `projection` (Dense D -> m), `class_means` [K, m] (uniform +-sqrt(0.3/m)),
`class_scales` [K, m] (only with learn_scale; the scale is |table|, initialised to 1). The class
dimension is sharded over the 'model' mesh axis.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from heads.base import Head, HeadOutput, class_sharded, softmax_cross_entropy

CLASS_BLOCK = 1024   # class-mean rows per block of the class term


def gaussian_log_density(x: jax.Array, means: jax.Array,
                         scales: Optional[jax.Array] = None) -> jax.Array:
  """log N(x_b; mu_k, diag(s_k^2)) for all b, k: [B, m] x [K, m] -> [B, K], in float32."""
  x, means = x.astype(jnp.float32), means.astype(jnp.float32)
  m = x.shape[-1]
  if scales is None:
    sq = (jnp.sum(x * x, -1)[:, None] - 2.0 * x @ means.T + jnp.sum(means * means, -1)[None, :])
    log_norm = 0.0
  else:
    inv_var = 1.0 / jnp.square(scales.astype(jnp.float32))
    sq = ((x * x) @ inv_var.T - 2.0 * x @ (means * inv_var).T
          + jnp.sum(means * means * inv_var, -1)[None, :])
    log_norm = jnp.sum(jnp.log(jnp.abs(scales.astype(jnp.float32))), -1)[None, :]
  return -0.5 * jnp.maximum(sq, 0.0) - log_norm - 0.5 * m * np.log(2 * np.pi)


def max_log_density(logits: jax.Array) -> jax.Array:
  """OOD / confidence score: the log density of the nearest class (low = far from all)."""
  return jnp.max(logits, axis=-1)


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of the predicted class distribution (high = uncertain)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class SOCHead(Head):
  num_classes: int
  dims: int = 10
  learn_scale: bool = False
  label_smoothing: float = 0.1
  link = 'softmax'
  label_sets_unsupported = (
      'SOC pulls each image towards the one Gaussian embedding of its class; a set of labels '
      'has no single class embedding to fit.')

  def setup(self):
    self.projection = nn.Dense(self.dims)
    bound = float(np.sqrt(0.3 / self.dims))
    self.class_means = self.param('class_means', class_sharded(
        lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound), class_axis=0),
        (self.num_classes, self.dims))
    self.class_scales = None
    if self.learn_scale:
      self.class_scales = self.param(
          'class_scales', class_sharded(nn.initializers.ones, class_axis=0),
          (self.num_classes, self.dims))

  def ood_scores(self, x: jax.Array, logits: jax.Array) -> dict:
    """'max_log_density' [B]: minus the log density of the nearest class Gaussian (the
    largest logit), so higher = farther from every class = more likely OOD."""
    del x
    return {'max_log_density': -max_log_density(logits)}

  def embed(self, x: jax.Array) -> jax.Array:
    """Backbone features [B, D] -> class-embedding space [B, m]."""
    return self.projection(x)

  def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False) -> HeadOutput:
    logits = gaussian_log_density(self.embed(x), self.class_means, self.class_scales)
    if labels is None:
      return HeadOutput(logits, None)
    return HeadOutput(logits, soc_loss(logits, labels, self.class_means, self.class_scales,
                                       self.label_smoothing))


def class_mean_term(means: jax.Array, scales: Optional[jax.Array],
                    label_smoothing: float) -> jax.Array:
  """mean over k of CE(log N(mu_k; mu_j, s_j) over j, target k), label-smoothed, in blocks of
  CLASS_BLOCK rows: CE = logsumexp(row) - (1 - eps) row_k - eps mean(row)."""
  num_classes = means.shape[0]
  block = min(CLASS_BLOCK, num_classes)
  num_blocks = -(-num_classes // block)
  rows = jnp.pad(means, ((0, num_blocks * block - num_classes), (0, 0)))
  eps = label_smoothing

  @jax.checkpoint
  def block_sum(start):
    x = jax.lax.dynamic_slice_in_dim(rows, start, block)
    logits = gaussian_log_density(x, means, scales)                           # [block, K]
    index = start + jnp.arange(block)
    own = jnp.take_along_axis(logits, jnp.minimum(index, num_classes - 1)[:, None], 1)[:, 0]
    ce = jax.nn.logsumexp(logits, -1) - (1 - eps) * own - eps * logits.mean(-1)
    return jnp.sum(jnp.where(index < num_classes, ce, 0.0))

  starts = jnp.arange(num_blocks) * block
  return jnp.sum(jax.lax.map(block_sum, starts)) / num_classes


def soc_loss(logits: jax.Array, labels: jax.Array, means: jax.Array,
             scales: Optional[jax.Array], label_smoothing: float) -> jax.Array:
  """Per-example (CE(image logits, y) + CE(class-mean logits, arange(K))) / 2."""
  image_term = softmax_cross_entropy(logits, labels, label_smoothing)
  return (image_term + class_mean_term(means, scales, label_smoothing)) / 2.0
