"""The contract every classification head follows, and the losses heads share.

A head is a Flax Linen module called as

    out = head(features, labels=None, *, train)    # features: [B, D] float

and returning `HeadOutput(logits, loss)`:
  * `logits` [B, K]: `softmax(logits)` (or `sigmoid(logits)` for `link='sigmoid'`) is the
    head's predicted class probability, so evaluators treat every head alike;
  * `loss` [B]: the per-example training loss, or None when `labels` is None.

`labels` are integer class indices [B]. Each head owns its loss (label smoothing, MC estimate,
auxiliary terms), so the trainer never branches on the head type. A head declares its link with
the class attribute `link` ('softmax' or 'sigmoid'); extra scalars to log (a temperature, say)
go to `self.sow('head_metrics', name, value)`.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


class HeadOutput(NamedTuple):
  logits: jax.Array
  loss: Optional[jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy of integer labels, in float32. Returns [B]."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example multi-label BCE summed over classes, one-hot targets from int labels. [B]."""
  logits = logits.astype(jnp.float32)
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)


def link_loss(link: str, logits: jax.Array, labels: jax.Array,
              label_smoothing: float = 0.0) -> jax.Array:
  """The loss matching a head's link function."""
  if link == 'softmax':
    return softmax_cross_entropy(logits, labels, label_smoothing)
  if link == 'sigmoid':
    return sigmoid_cross_entropy(logits, labels)
  raise ValueError(f"link must be 'softmax' or 'sigmoid', got {link!r}")


def probabilities(link: str, logits: jax.Array) -> jax.Array:
  """Predicted class probabilities from head logits."""
  logits = logits.astype(jnp.float32)
  return jax.nn.softmax(logits) if link == 'softmax' else jax.nn.sigmoid(logits)


def class_sharded(init, class_axis: int = -1, ndim: int = 2):
  """Wraps a param initializer so the class dimension is sharded over the 'model' mesh axis.

  Use for every [.., K] head parameter (kernels [D, K], biases [K], tables [K, m] with
  `class_axis=0`). Outside a mesh this only boxes the value; `flax.linen.meta.unbox` removes it.
  """
  names = [None] * ndim
  names[class_axis] = 'model'
  return nn.with_partitioning(init, tuple(names))
