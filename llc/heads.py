"""LLC heads (Kusupati et al., NeurIPS 2021): phase 1 learns k-bit class codes, phase 2 learns
instance codes that match them.

Both start with the same `projection` (Dense D -> k, no bias), so phase 2 warm-starts it with
`train.init_prefixes=('backbone', 'head/projection')`. The real projection output is sown as
`intermediates/head/codes` (z in phase 1, o in phase 2) for `llc.evaluate`.

Phase 1, `CodebookHead`: real codebook C [L, k] (param `codebook`, class dim sharded), binarised
on every forward pass with a straight-through sign, B = where(C > 0, +1, -1);
logits = z @ B^T (no scale, bias or temperature); loss = softmax CE with label smoothing.

Phase 2, `InstanceCodeHead`: the class codes B are fixed, read from a codebook .npy at init and
kept in the checkpoint as the non-trainable variable `batch_stats/head/class_codes` (+-1 [L, k],
class dim sharded: the optimizer and weight decay never see it, and no [L, k] constant is baked
into the compiled step). With o the per-bit logits and T = (B + 1) / 2 in {0, 1}:
  loss [B] = mean over bits of sigmoid BCE(o, T[y]);
  logits [B, L] = o @ T^T.
Under independent bits p(bit j = 1) = sigmoid(o_j),
  log p(T_c) = sum_j T_cj log sig(o_j) + (1 - T_cj) log sig(-o_j) = o . T_c + sum_j log sig(-o_j),
so the logits are the log-likelihoods of the class codes up to a per-row constant, and softmax
of them is the posterior over classes under a uniform prior: the shared evaluator's accuracy,
NLL and ECE apply as they are. With |o_j| all equal, argmax of the logits is minimum-Hamming
decoding (o . T_c = |o| (#ones of sign(o)) - |o| Hamming(sign(o), B_c)), ties to the lowest index.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from heads.base import INTERMEDIATES, Head, HeadOutput, class_sharded, softmax_cross_entropy
from llc import codebook_io
from llc.codes import straight_through_sign


CODES = 'codes'               # sown: the real projection output, intermediates/head/codes
CLASS_CODES = 'class_codes'   # phase 2's fixed +-1 class codes, batch_stats/head/class_codes

LLC_SINGLE_LABEL = (
    'LLC learns one binary code per class and decodes each image to exactly one class code '
    '(Kusupati et al. 2021 train single-label softmax); a set of labels has no one code to match.')


def default_bits(num_classes: int) -> int:
  """ceil(2 log2 K), at least 1: the code length `bits = 0` stands for (the paper's ~2 log2 K)."""
  return max(1, math.ceil(2 * math.log2(max(num_classes, 2))))


def _resolver(file_field: str):
  """`resolve_kwargs` of an LLC head (`heads.registry.resolve_head_kwargs`): bits 0 ->
  `default_bits(K)`; the codebook file in `file_field`, if any, must be [K, bits]."""
  def resolve_kwargs(num_classes: int, kwargs: dict) -> dict:
    if kwargs.get('bits') == 0:
      kwargs['bits'] = default_bits(num_classes)
    if kwargs.get(file_field):
      codebook_io.load_codebook(kwargs[file_field], num_classes, kwargs.get('bits', 20))
    return kwargs
  return staticmethod(resolve_kwargs)


def nearest_code_distance(codes: jax.Array, class_bits: jax.Array) -> jax.Array:
  """Hamming distance [B] from each instance code (bool [B, k]) to the nearest class code
  (bool [L, k]), as (k - s_x . s_c) / 2 with s = +-1 (a matmul, no [B, L, k] tensor). 0 means
  an exact match; > 0 is LLC's "no class code matches" (an OOD flag, Kusupati et al. 2021)."""
  signs = lambda b: 2.0 * b.astype(jnp.float32) - 1.0
  agree = signs(codes) @ signs(class_bits).T
  return (codes.shape[-1] - jnp.max(agree, axis=-1)) / 2.0


def _no_match(module: nn.Module, x: jax.Array, class_bits: jax.Array) -> dict:
  """{'llc_no_match': distance of sign(projection(x)) to the nearest class code}, [B]."""
  kernel = nn.meta.unbox(module.variables['params']['projection']['kernel'])
  return {'llc_no_match': nearest_code_distance(x.astype(jnp.float32) @ kernel >= 0,
                                                class_bits)}


class CodebookHead(Head):
  """Phase 1: logits = z @ sign(C)^T with a learnt real codebook C [L, k] (straight-through).

  `codebook_init`: '' for N(0, 2/k), or a .npy [L, k] of real values (kept as they are) or
  booleans (given seeded magnitudes by `baselines.warm_start_values`).
  """
  num_classes: int
  bits: int = 20
  label_smoothing: float = 0.1
  codebook_init: str = ''
  link = 'softmax'
  sows = {INTERMEDIATES: (CODES,)}
  label_sets_unsupported = LLC_SINGLE_LABEL
  resolve_kwargs = _resolver('codebook_init')

  def _codebook_initializer(self):
    if not self.codebook_init:
      return nn.initializers.normal(stddev=float(np.sqrt(2.0 / self.bits)))

    def from_file(key, shape, dtype=jnp.float32):
      del key
      values = codebook_io.init_values(self.codebook_init, self.num_classes, self.bits)
      assert values.shape == tuple(shape), (values.shape, shape)
      return jnp.asarray(values, dtype)
    return from_file

  @nn.compact
  def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False) -> HeadOutput:
    del train
    z = nn.Dense(self.bits, use_bias=False, name='projection')(x).astype(jnp.float32)
    codebook = self.param('codebook', class_sharded(self._codebook_initializer(), class_axis=0),
                          (self.num_classes, self.bits), jnp.float32)
    logits = z @ straight_through_sign(codebook).T
    self.sow(INTERMEDIATES, CODES, z)
    loss = None if labels is None else softmax_cross_entropy(logits, labels,
                                                             self.label_smoothing)
    return HeadOutput(logits, loss)

  def ood_scores(self, x: jax.Array, logits: jax.Array) -> dict:
    """'llc_no_match' [B]: Hamming distance from the instance code sign(z) to the nearest
    class code sign(C) (`nearest_code_distance`; > 0 = no class code matches)."""
    del logits
    return _no_match(self, x, nn.meta.unbox(self.variables['params']['codebook']) > 0)


class InstanceCodeHead(Head):
  """Phase 2: per-bit logits o [B, k] trained with BCE towards the fixed class code of the label.

  `codebook`: the .npy [L, k] whose signs are the class codes (phase 1's exported `codebook.npy`
  or a baseline); read once, at init, and checkpointed as `batch_stats/head/class_codes`.
  """
  num_classes: int
  bits: int = 20
  codebook: str = ''
  link = 'softmax'
  sows = {INTERMEDIATES: (CODES,)}
  fixed_variables = {'batch_stats': (CLASS_CODES,)}
  label_sets_unsupported = LLC_SINGLE_LABEL
  resolve_kwargs = _resolver('codebook')

  def _class_codes(self) -> jax.Array:
    def from_file():
      codes = codebook_io.class_codes(self.codebook, self.num_classes, self.bits)
      return nn.Partitioned(jnp.asarray(codes), names=('model', None))
    return self.variable('batch_stats', CLASS_CODES, from_file).value

  @nn.compact
  def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False) -> HeadOutput:
    del train
    o = nn.Dense(self.bits, use_bias=False, name='projection')(x).astype(jnp.float32)
    targets = (self._class_codes() + 1.0) / 2.0          # T in {0, 1}, [L, k]
    logits = o @ targets.T
    self.sow(INTERMEDIATES, CODES, o)
    loss = None
    if labels is not None:
      loss = jnp.mean(optax.sigmoid_binary_cross_entropy(o, targets[labels]), axis=-1)
    return HeadOutput(logits, loss)

  def ood_scores(self, x: jax.Array, logits: jax.Array) -> dict:
    """'llc_no_match' [B]: Hamming distance from the instance code (o >= 0) to the nearest
    fixed class code (`nearest_code_distance`; > 0 = no class code matches, llc.ood's flag)."""
    del logits
    return _no_match(self, x, nn.meta.unbox(self.variables['batch_stats'][CLASS_CODES]) > 0)
