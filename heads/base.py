"""The contract every classification head follows, and the losses heads share.

A head is a Flax Linen module derived from `Head` (the registry refuses any other class),
called as

    out = head(features, labels=None, *, train)    # features: [B, D] float

and returning `HeadOutput(logits, loss)`:
  * `logits` [B, K]: `softmax(logits)` (or `sigmoid(logits)` for `link='sigmoid'`) is the
    head's predicted class probability, so evaluators treat every head alike;
  * `loss` [B]: the per-example training loss, or None when `labels` is None.

`labels` are integer class ids: [B] (one class per example) or [B, L] (a set of classes per
example, padded with -1; multi-label data such as JFT). `class_targets` turns either into the
[B, K] multi-hot target on the device, so no [B, K] array ever travels from the host. Each head
owns its loss (label smoothing, MC estimate, auxiliary terms), so the trainer never branches on
the head type: it reads what it needs from the class attributes `Head` documents (the link, the
rng streams the head draws, what it sows, the fixed variables it keeps). A head built from the
dataset config (class names for captions) has a classmethod
`from_dataset(dataset, num_classes, **kwargs)`; one that derives kwargs from the class count has
`resolve_kwargs(num_classes, kwargs)` (`heads.registry`).

Every head also has `ood_scores(features, logits) -> {name: [B] float32}`: its own
out-of-distribution scores (HET / HET-XL 'mc_entropy', SOC 'max_log_density', LLC
'llc_no_match'; {} for DET), oriented so that higher = more likely out-of-distribution.
`evaluation.ood` adds the scores every head shares (MSP, entropy, max logit) from the logits.
"""
import dataclasses
from typing import ClassVar, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


METRICS = 'head_metrics'          # sown scalars the trainer logs every step (a temperature)
INTERMEDIATES = 'intermediates'   # sown arrays for analysis only (LLC's real-valued codes)
LINKS = ('softmax', 'sigmoid')
FALLBACK_NOISE_SEED = 0           # a head's noise key in eval when the caller passes no rngs
# The logit of a padded class (`Head.mask_padded`): finite, so 0 * logit stays 0 in every loss,
# and so negative that its softmax / sigmoid probability is exactly 0 in float32 after any
# temperature in use (tau <= 5) and any noise a heteroscedastic head adds.
PADDED_LOGIT = -1e9


class HeadOutput(NamedTuple):
  logits: jax.Array
  loss: Optional[jax.Array]


class Head(nn.Module):
  """Base class of every head: the contract as class attributes, read by the trainer,
  evaluators and benchmarks (which never branch on the head type).

  * `link` ('softmax' | 'sigmoid'), no default, every head states it: which function of the
    logits is the class probability (`probabilities`) and which loss matches it
    (`link_loss`). A class attribute, or a field where the head lets the config choose.
  * `rng_streams`: the names of the rng streams the head draws with `make_rng` (besides
    'params'). In training the caller must pass them (`training.model.step_rngs`); a head
    falls back to fixed keys in eval when they are absent (`noise_key`).
  * `sows`: {collection: names} the head may `sow`: `METRICS` (scalars, e.g. a learnt
    temperature, logged every training step) or `INTERMEDIATES` (arrays for analysis, read
    with `apply(..., mutable=[INTERMEDIATES])` under `intermediates/head/<name>`).
  * `fixed_variables`: {collection: names} of non-trainable variables the head creates at
    init and never changes, checkpointed with the params under `<collection>/head/<name>`
    (LLC phase 2's class codes in 'batch_stats', so the optimizer never sees them).
  * `in_batch_loss`: True when the loss couples the examples of a batch (the in-batch
    contrastive loss of `hetxl.contrastive`); such a head is also called with `mask=` [B]
    (1 = real example, 0 = padding) and must keep padding out of every example's loss.
  * `label_sets_unsupported`: None, or a sentence saying why the head cannot train on label
    sets [B, L]; a config with `dataset.multi_label` is then refused when the model is built.
  * `pads_classes`: True when the head builds its class dimension with `padded_classes`
    entries (the first `num_classes` real, the rest padding that `mask_padded` removes from
    every probability, loss and prediction), so an odd K still splits over the 'model' mesh
    axis. The trainer sets `class_multiple` only on such heads (`training.experiment`).
  * `text_input`: None, or how the head reads each training example's own text (a captioned
    dataset, `input_pipeline.records` format 3): an `input_pipeline.captions.TextInput`. The
    input pipeline then puts `text_input(text)` of every example into the batch as 'text'
    [B, *text_input.shape], and the head is called in training with `text=` that array
    (`training.model.Classifier`); evaluation passes no text.
  """
  rng_streams: ClassVar[Tuple[str, ...]] = ()
  sows: ClassVar[Mapping[str, Tuple[str, ...]]] = {}
  fixed_variables: ClassVar[Mapping[str, Tuple[str, ...]]] = {}
  in_batch_loss: ClassVar[bool] = False
  label_sets_unsupported: ClassVar[Optional[str]] = None
  pads_classes: ClassVar[bool] = False
  text_input = None     # a class attribute here, a field of a head that reads texts
  # The class dimension is padded to a multiple of this (1: no padding); keyword-only, so every
  # head keeps its own positional fields.
  class_multiple: int = dataclasses.field(default=1, kw_only=True)

  @property
  def padded_classes(self) -> int:
    """num_classes rounded up to a multiple of `class_multiple`: the size of every class
    dimension of a `pads_classes` head (its parameters and its logits)."""
    return padded_size(self.num_classes, self.class_multiple)

  def mask_padded(self, logits: jax.Array) -> jax.Array:
    """`logits` [..., padded_classes] with every padded class set to PADDED_LOGIT (float32);
    unchanged when nothing is padded. Its gradient into a padded class is 0."""
    if self.padded_classes == self.num_classes:
      return logits
    return mask_padded(logits, self.num_classes)

  def ood_scores(self, x: jax.Array, logits: jax.Array) -> Dict[str, jax.Array]:
    """The head's own OOD scores {name: [B] float32} (higher = more likely OOD) of features
    x [B, D] and the head's eval logits [B, K]. None by default (DET, contrastive): the
    head's OOD scores are then those of its logits (`evaluation.ood`)."""
    del x, logits
    return {}

  def noise_key(self, stream: str, train: bool) -> jax.Array:
    """The key of rng `stream` (one of `rng_streams`). Without that stream: a ValueError when
    `train`, else the fixed fold_in(key(FALLBACK_NOISE_SEED), position of `stream` in
    `rng_streams`), so repeated evaluations draw the same noise."""
    if stream not in self.rng_streams:
      raise ValueError(f'{type(self).__name__} draws {stream!r}, which is not among its '
                       f'declared rng_streams {self.rng_streams}')
    if self.has_rng(stream):
      return self.make_rng(stream)
    if train:
      raise ValueError(f'{type(self).__name__} needs the rng stream {stream!r} when train=True')
    return jax.random.fold_in(jax.random.key(FALLBACK_NOISE_SEED),
                              self.rng_streams.index(stream))


def padded_size(num_classes: int, multiple: int) -> int:
  """`num_classes` rounded up to a multiple of `multiple` (>= 1)."""
  return -(-num_classes // max(multiple, 1)) * max(multiple, 1)


def real_classes(width: int, num_classes: int) -> jax.Array:
  """[width] bool: True for the `num_classes` real classes of a (padded) class dimension."""
  return jnp.arange(width) < num_classes


def mask_padded(logits: jax.Array, num_classes: int) -> jax.Array:
  """`logits` [..., width] with every column from `num_classes` on set to PADDED_LOGIT (the
  padding of a class dimension: probability 0, loss 0, never top-1)."""
  return jnp.where(real_classes(logits.shape[-1], num_classes), logits,
                   jnp.asarray(PADDED_LOGIT, logits.dtype))


def class_targets(labels: jax.Array, num_classes: int) -> jax.Array:
  """Multi-hot float32 targets [B, K] from integer labels [B] or padded label sets [B, L].

  In a label set, ids < 0 are padding and a repeated id counts once; an example whose set is
  empty gets an all-zero row. Computed as a compare-and-reduce that XLA fuses, so no [B, L, K]
  buffer exists and a class dimension sharded over 'model' stays sharded.
  """
  classes = jnp.arange(num_classes, dtype=labels.dtype)
  if labels.ndim == 1:
    return (labels[:, None] == classes).astype(jnp.float32)
  return jnp.any(labels[:, :, None] == classes, axis=1).astype(jnp.float32)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the top-scoring class is the label (or one of the label set): prec@1 per
  example, [B] float32. For a label set that is empty the value is 0 (mask such examples)."""
  top = jnp.argmax(logits, axis=-1).astype(labels.dtype)
  if labels.ndim == 1:
    return (top == labels).astype(jnp.float32)
  return jnp.any(labels == top[:, None], axis=1).astype(jnp.float32)


def has_label(labels: jax.Array) -> jax.Array:
  """1.0 for examples with at least one label, [B] float32 (int labels [B]: always 1)."""
  if labels.ndim == 1:
    return jnp.ones(labels.shape, jnp.float32)
  return jnp.any(labels >= 0, axis=1).astype(jnp.float32)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0,
                          num_classes: Optional[int] = None) -> jax.Array:
  """Per-example cross-entropy, in float32. Returns [B].

  A label set is turned into the normalised multi-hot target (each of its n classes 1/n), as
  big_vision's `softmax_xent` does; an empty set gives a zero loss. `label_smoothing` a mixes in
  the uniform distribution over the `num_classes` real classes (default: every column of
  `logits`; the rest are padding, `Head.mask_padded`): (1 - a) y + a / K (optax.smooth_labels).
  """
  logits = logits.astype(jnp.float32)
  targets = class_targets(labels, logits.shape[-1])
  if labels.ndim == 2:
    targets = targets / jnp.maximum(targets.sum(-1, keepdims=True), 1.0)
  if label_smoothing:
    k = logits.shape[-1] if num_classes is None else num_classes
    uniform = real_classes(logits.shape[-1], k).astype(jnp.float32) / k
    targets = (1.0 - label_smoothing) * targets + label_smoothing * uniform
  return optax.softmax_cross_entropy(logits, targets)


def sigmoid_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0,
                    real: Optional[int] = None) -> jax.Array:
  """Multi-hot BCE targets [B, num_classes]; with smoothing a, positives are 1 - a and negatives
  a (the ImageNet-21k recipe's 0.9999 / 0.0001 is a = 1e-4), on the first `real` classes only
  (default all; the rest are padding, whose target stays 0)."""
  targets = class_targets(labels, num_classes)
  if label_smoothing:
    smoothed = targets * (1.0 - 2.0 * label_smoothing) + label_smoothing
    if real is not None and real < num_classes:
      smoothed = jnp.where(real_classes(num_classes, real), smoothed, targets)
    targets = smoothed
  return targets


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0,
                          num_classes: Optional[int] = None) -> jax.Array:
  """Per-example binary cross-entropy summed over classes (the big_vision and
  uncertainty-baselines convention; averaging over examples is the trainer's), float32, [B].
  Padded classes (columns from `num_classes` on, at PADDED_LOGIT) add exactly 0."""
  logits = logits.astype(jnp.float32)
  targets = sigmoid_targets(labels, logits.shape[-1], label_smoothing, num_classes)
  return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)


def link_loss(link: str, logits: jax.Array, labels: jax.Array,
              label_smoothing: float = 0.0, num_classes: Optional[int] = None) -> jax.Array:
  """The loss matching a head's link function; `num_classes`: the real classes when `logits`
  has padded columns (`Head.mask_padded`)."""
  if link == 'softmax':
    return softmax_cross_entropy(logits, labels, label_smoothing, num_classes)
  if link == 'sigmoid':
    return sigmoid_cross_entropy(logits, labels, label_smoothing, num_classes)
  raise ValueError(f"link must be 'softmax' or 'sigmoid', got {link!r}")


def probabilities(link: str, logits: jax.Array) -> jax.Array:
  """Predicted class probabilities from head logits."""
  logits = logits.astype(jnp.float32)
  return jax.nn.softmax(logits) if link == 'softmax' else jax.nn.sigmoid(logits)


def class_sharded(init, class_axis: int = -1, ndim: int = 2, num_classes: Optional[int] = None):
  """Wraps a param initializer so the class dimension is sharded over the 'model' mesh axis.

  Use for every [.., K] head parameter (kernels [D, K], biases [K], tables [K, m] with
  `class_axis=0`). With `num_classes` (a padded class dimension, `Head.padded_classes`), the
  first `num_classes` entries are `init` of the unpadded shape and the padding is zeros, so a
  padded model starts from exactly the unpadded one's values. Outside a mesh this only boxes
  the value; `flax.linen.meta.unbox` removes it.
  """
  names = [None] * ndim
  names[class_axis] = 'model'
  if num_classes is not None:
    init = _pad_classes(init, class_axis, num_classes)
  return nn.with_partitioning(init, tuple(names))


def _pad_classes(init, class_axis: int, num_classes: int):
  def padded(key, shape, dtype=jnp.float32):
    axis = class_axis % len(shape)
    if shape[axis] <= num_classes:
      return init(key, shape, dtype)
    real = init(key, shape[:axis] + (num_classes,) + shape[axis + 1:], dtype)
    pad = [(0, 0)] * len(shape)
    pad[axis] = (0, shape[axis] - num_classes)
    return jnp.pad(real, pad)
  return padded
