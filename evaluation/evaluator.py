"""One pass over the eval split, counted once per real example, accumulated on the devices.

Single-label data (labels [B]): accuracy, NLL of the label under the head's predicted
distribution, top-1 ECE. Multi-label data (label sets [B, L], see `heads.base`), the JFT
protocol of big_vision and uncertainty-baselines: prec@1 (the top-scoring class is one of the
image's labels; images without labels are left out), mAP (mean over classes with at least one
positive of the average precision of scikit-learn's `average_precision_score`), the per-example
NLL of the head's link (sigmoid: binary cross-entropy summed over classes; softmax:
cross-entropy against the normalised multi-hot), and top-1 ECE; `calibration`,
`nll_definition`, `map_method` and `map_error_bound` in the results name what the numbers are.

Nothing of size N (eval examples) x K (classes) exists anywhere, and no [B, K] array leaves
the devices: each batch's logits [B, K_pad] (class dimension split over the 'model' mesh axis,
batch over the others) are folded into an accumulator pytree that the step takes, donates and
returns (`EvalStep`): sums for accuracy / prec@1, NLL, counts and the reliability-bin
statistics (replicated), and for label sets per class a ranking summary (`MAP_DOC`) split over
'model' on the class dimension. Per-device memory: O(B x K / model) for the batch's
probabilities plus O(K x (map_bins + map_top_k) / model) for the accumulator.

Classes at or beyond `model.head.num_classes` (the padding of a class dimension split over
'model', `heads.base.padded_size`) are masked to `PADDED_LOGIT` before anything is computed
(probability 0, loss 0, never the top-1) and left out of mAP, whether or not the head already
masked them.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evaluation.calibration import expected_calibration_error
from heads.base import (class_targets, has_label, link_loss, mask_padded, probabilities,
                        top1_correct)
from input_pipeline.pipeline import device_batches
from training.mesh import batch_axes, batch_sharding
from training.model import step_rngs

EVAL_SEED = 20260101  # fixed: MC heads draw the same noise on every evaluation
LOGIT_RANGE = (-24.0, 17.0)  # logit(p) spanned by the mAP histogram (1 - 2^-24 -> 16.6)
NLL_DEFINITION = ('mean over images of the per-image NLL of the head\'s link, in nats: '
                  "link='sigmoid': binary cross-entropy summed over classes; link='softmax': "
                  'cross-entropy against the normalised multi-hot target')
CALIBRATION = ('top-1 ECE: confidence = predicted probability of the top-scoring class, '
               'correct = that class is one of the labels; {bins} equal-width bins, images '
               'with labels only')
MAP_DOC = """mAP from a per-class ranking summary, for any N and K.

Per class k the accumulator keeps (1) the `map_top_k` = M highest probabilities with their
labels, exactly, and (2) histograms pos[k, b], neg[k, b] of the positives and negatives of every
other example over `map_bins` bins of the probability p: bin 0 holds p = 0 exactly, the last bin
p = 1 exactly (ties, as float32 saturates), the bins between split logit(p) = log p - log(1 - p)
uniformly over LOGIT_RANGE (clipped). Logit space resolves both ends, where sigmoid probabilities
crowd (negatives near 0, confident positives near 1) and softmax probabilities at large K are
tiny (logit(p) ~ log p). Each data-parallel replica keeps its own summary of the examples it saw
(no communication per batch); they are merged once at the end.

Let E be the examples whose p is above every example outside the merged top M (all of the top
M but a tie at the M-th value; every example when N < M). Their ranks are known, so their
precisions are those of scikit-learn, ties included. For a positive in bin b below E, with
T'_b, F'_b the positives / negatives of E and of the bins above b, and p_b, n_b those inside b,
the precision at its threshold, P = tp / (tp + fp), has tp in [T'_b + 1, T'_b + p_b] and fp in
[F'_b, F'_b + n_b], so P lies in [lo_b, hi_b] = [(T'_b + 1) / (T'_b + 1 + F'_b + n_b),
(T'_b + p_b) / (T'_b + p_b + F'_b)]. We estimate it by the midpoint ranks (the bin's examples in
random order) est_b = (T'_b + (p_b + 1) / 2) / (T'_b + F'_b + (p_b + 1) / 2 + n_b / 2), which
lies in that interval (tie bins: the tie precision, exact). So per class

  |AP_hist - AP_sklearn| <= (1 / npos) sum_b p_b max(hi_b - est_b, est_b - lo_b)
                         <= (1 / npos) sum_b p_b (p_b - 1 + n_b) / (T_b + F_b),

T_b + F_b = T'_b + p_b + F'_b + n_b (>= |E|, ~M) the examples at or above bin b (hi_b - lo_b
<= (p_b - 1 + n_b) / (T_b + F_b), through the tie precision T_b / (T_b + F_b) between them):
the error is the share of the examples ranked at or above a positive that share its bin. The
mean of the first bound over the classes averaged is returned as `map_error_bound`, a guarantee
for the data at hand (0: exact).
The top-M set makes the bound small where fixed bins cannot (at the top of a class's ranking,
where few examples are above); the bins need only resolve the bulk. With M = 64, 512 bins, at
JFT's eval N = 49,511 on JFT-like sigmoid scores (positives' logits N(-2, 3) among negatives'
N(-8, 2)) and on negatives crowding the positives (N(-2.5, 1) vs N(-3, 1)) the measured error
was 1e-5 and the bound 3e-4 at most (benchmarks/eval_map.py, BENCHMARKS.md); without the top-M
list (M = 1) the bound is 6e-3. tests/test_eval_scaling.py checks the bound, and 1e-3, against
scikit-learn on such inputs and on softmax scores.
"""


def _row_axes(mesh: Mesh) -> tuple:
  """The mesh axes a batch's logits split their rows over: every batch axis but 'model'."""
  return tuple(a for a in batch_axes(mesh) if a != 'model')


def _class_axis(mesh: Mesh) -> Optional[str]:
  return 'model' if 'model' in mesh.axis_names else None


def map_bin(p: jax.Array, map_bins: int) -> jax.Array:
  """The histogram bin (int32, same shape) of probabilities p in [0, 1] (`MAP_DOC`)."""
  lo, hi = LOGIT_RANGE
  logit = jnp.log(p) - jnp.log1p(-p)
  inner = 1 + jnp.clip(jnp.floor((logit - lo) * ((map_bins - 2) / (hi - lo))), 0, map_bins - 3)
  return jnp.where(p <= 0, 0, jnp.where(p >= 1, map_bins - 1, inner)).astype(jnp.int32)


def _rank_update(top_p, top_y, pos, neg, probs, labels, mask, *, class_axis, map_bins):
  """shard_map body: folds one data shard's [b, k] probabilities into its class block's summary.

  top_p / top_y [1, k, M]: the M highest p seen so far and their labels (1 positive, 0
  negative, -1 none yet, p = -1); pos / neg [1, k, map_bins] int32: everything else."""
  k, m = probs.shape[1], top_p.shape[-1]
  first = jax.lax.axis_index(class_axis) * k if class_axis else 0
  classes = first + jnp.arange(k, dtype=labels.dtype)
  positive = jnp.any(labels[:, :, None] == classes, axis=1).T          # [k, b], fused
  real = mask[None, :] > 0
  p = jnp.concatenate([top_p[0], jnp.where(real, probs.T, -1.0)], axis=1)
  y = jnp.concatenate([top_y[0], jnp.where(real, positive.astype(jnp.int8), -1)], axis=1)
  neg_p, y = jax.lax.sort((-p, y), dimension=1, num_keys=1)
  p = -neg_p
  rows, bins = jnp.arange(k)[:, None], map_bin(p[:, m:], map_bins)
  pos = pos[0].at[rows, bins].add((y[:, m:] == 1).astype(jnp.int32))
  neg = neg[0].at[rows, bins].add((y[:, m:] == 0).astype(jnp.int32))
  return p[None, :, :m], y[None, :, :m], pos[None], neg[None]


def _merge_rows(top_p, top_y, pos, neg, classes, *, row_axes, row_count):
  """This device's share of its class block with every data row's summary merged: the block's
  k classes (padded to a multiple of row_count) split over the rows, each row device getting
  its k / row_count classes' top-k lists from all rows [k / rows, rows x M] (all_to_all) and
  their histograms summed (psum_scatter): O(k (M + bins)) memory, as the accumulator."""
  pad = -len(classes) % row_count
  rows = lambda a, value: jnp.pad(a, ((0, pad), (0, 0)), constant_values=value)
  top_p, top_y, pos, neg = rows(top_p, -1), rows(top_y, -1), rows(pos, 0), rows(neg, 0)
  classes = jnp.pad(classes, (0, pad), constant_values=-1)
  share = (len(classes) // row_count)
  classes = jax.lax.dynamic_slice(classes, (jax.lax.axis_index(row_axes) * share,), (share,))
  to_rows = lambda a: jax.lax.all_to_all(a, row_axes, 0, 1, tiled=True)
  summed = lambda a: jax.lax.psum_scatter(a, row_axes, scatter_dimension=0, tiled=True)
  return to_rows(top_p), to_rows(top_y), summed(pos), summed(neg), classes


def _mean_average_precision(top_p, top_y, pos, neg, *, row_axes, row_count, class_axis,
                            num_classes, map_bins):
  """shard_map body: (sum of AP, sum of its error bound, number) over the real classes with a
  positive, psum'd over the mesh, from every data row's summary (`MAP_DOC`)."""
  m = top_p.shape[-1]
  top_p, top_y, pos, neg = top_p[0], top_y[0], pos[0], neg[0]
  k = top_p.shape[0]
  classes = (jax.lax.axis_index(class_axis) * k if class_axis else 0) + jnp.arange(k)
  if row_axes:
    top_p, top_y, pos, neg, classes = _merge_rows(top_p, top_y, pos, neg, classes,
                                                  row_axes=row_axes, row_count=row_count)
  ap, bound, npos = _average_precision(top_p, top_y, pos, neg, m, map_bins)
  keep = (classes >= 0) & (classes < num_classes) & (npos > 0)
  sums = tuple(jnp.sum(jnp.where(keep, x, 0.0)) for x in (ap, bound, keep))
  axes = tuple(row_axes) + ((class_axis,) if class_axis else ())
  return jax.lax.psum(sums, axes) if axes else sums


def _average_precision(top_p, top_y, pos, neg, m, map_bins):
  """Per class (AP, its error bound, number of positives), [k] each, from the merged top-k
  lists [k, >= m] and histograms [k, map_bins] (`MAP_DOC`)."""
  neg_p, y = jax.lax.sort((-top_p, top_y), dimension=1, num_keys=1)
  p = -neg_p
  # E: the top M strictly above the M-th value; the rest joins the histograms.
  exact = p[:, :m] > p[:, m - 1:m]
  rest_y = jnp.concatenate([jnp.where(exact, -1, y[:, :m]), y[:, m:]], axis=1)
  rows, bins = jnp.arange(p.shape[0])[:, None], map_bin(p, map_bins)
  pos = (pos.at[rows, bins].add((rest_y == 1).astype(jnp.int32))).astype(jnp.float32)
  neg = (neg.at[rows, bins].add((rest_y == 0).astype(jnp.int32))).astype(jnp.float32)
  # Exact precisions in E, at the end of each tie group (scikit-learn's thresholds).
  tp = jnp.cumsum(exact & (y[:, :m] == 1), axis=1).astype(jnp.float32)
  fp = jnp.cumsum(exact & (y[:, :m] == 0), axis=1).astype(jnp.float32)
  last = jnp.concatenate([p[:, 1:m] != p[:, :m - 1], jnp.ones_like(p[:, :1], bool)], axis=1)
  end = jax.lax.cummin(jnp.where(last, jnp.arange(m), m), axis=1, reverse=True)
  tp_end, fp_end = jnp.take_along_axis(tp, end, 1), jnp.take_along_axis(fp, end, 1)
  exact_sum = jnp.sum(jnp.where(exact & (y[:, :m] == 1), tp_end / jnp.maximum(tp_end + fp_end,
                                                                             1.0), 0.0), 1)
  # Histogram bins from the top down, after E.
  above_t = tp[:, -1:] + jnp.cumsum(pos[:, ::-1], 1)[:, ::-1] - pos      # T'_b
  above_f = fp[:, -1:] + jnp.cumsum(neg[:, ::-1], 1)[:, ::-1] - neg      # F'_b
  safe = lambda a, b: a / jnp.maximum(b, 1e-9)
  est = safe(above_t + (pos + 1) / 2, above_t + above_f + (pos + 1) / 2 + neg / 2)
  hi = safe(above_t + pos, above_t + pos + above_f)
  lo = safe(above_t + 1, above_t + 1 + above_f + neg)
  tie = (jnp.arange(map_bins) == 0) | (jnp.arange(map_bins) == map_bins - 1)
  est = jnp.where(tie, safe(above_t + pos, above_t + pos + above_f + neg), est)
  bound = jnp.where(tie, 0.0, jnp.maximum(hi - est, est - lo))
  npos = tp[:, -1] + pos.sum(1)
  ap = (exact_sum + jnp.sum(pos * est, 1)) / jnp.maximum(npos, 1.0)
  return ap, jnp.sum(pos * bound, 1) / jnp.maximum(npos, 1.0), npos


class EvalStep:
  """An eval step on `mesh` over the logits [B, K_pad] of `logits_fn(params, batch_stats,
  image)`, whose class probabilities are `heads.base.probabilities(link, logits)` with
  `num_classes` real classes; and what turns its accumulator into metrics.

    step = make_eval_step(model, mesh, state_shardings, config.eval)
    acc = step.accumulator(params, batch_stats, batch)      # zeros, placed on the mesh
    acc = step(acc, params, batch_stats, batch)             # per batch; `acc` is donated
    metrics, bins = step.results(acc)                       # host floats; reliability bins

  `batch` is {'image' [B, ...], 'label' [B] or [B, L], 'mask' [B]} sharded as
  `training.mesh.batch_sharding`. Ahead-of-time: `step.lower(params, batch_stats, batch)` with
  jax.ShapeDtypeStructs (carrying their shardings) lowers the step without data.
  """

  def __init__(self, logits_fn: Callable, link: str, num_classes: int, mesh: Mesh,
               in_shardings: tuple, options: ml_collections.ConfigDict):
    """in_shardings: those of (params, batch_stats); options: `config.eval` (num_bins,
    map_bins, map_top_k)."""
    self.logits_fn, self.link, self.num_classes, self.mesh = logits_fn, link, num_classes, mesh
    self.num_bins, self.map_bins = int(options.num_bins), int(options.map_bins)
    self.map_top_k = int(options.map_top_k)
    if self.map_bins < 3 or self.map_top_k < 1:
      raise ValueError(f'eval.map_bins must be >= 3 and eval.map_top_k >= 1, got '
                       f'{self.map_bins} and {self.map_top_k}')
    self._rows, self._classes = _row_axes(mesh), _class_axis(mesh)
    self._row_count = int(np.prod([mesh.shape[a] for a in self._rows]))
    self._class_count = mesh.shape[self._classes] if self._classes else 1
    self._in = (*in_shardings, batch_sharding(mesh))
    self._jit_steps, self._jit_zeros = {}, {}
    self._jit_map = jax.jit(self._map, out_shardings=NamedSharding(mesh, P()))

  # ----- The accumulator: its layout, zeros, and the jitted step over it.

  def _layout(self, params, batch_stats, batch) -> dict:
    """{name: (shape, dtype, PartitionSpec)} of the accumulator for batches like `batch`."""
    width = jax.eval_shape(self.logits_fn, params, batch_stats, batch['image']).shape[-1]
    width = -(-width // self._class_count) * self._class_count
    count, bins = ((), jnp.int32, P()), ((self.num_bins,), jnp.int32, P())
    layout = {'count': count, 'weight': count, 'correct': count, 'nll': ((), jnp.float32, P()),
              'bin_count': bins, 'bin_correct': bins,
              'bin_confidence': ((self.num_bins,), jnp.float32, P())}
    if batch['label'].ndim == 2:
      rows = self._rows or None
      ranked = P(rows, self._classes, None)
      layout.update(top_p=((self._row_count, width, self.map_top_k), jnp.float32, ranked),
                    top_y=((self._row_count, width, self.map_top_k), jnp.int8, ranked),
                    pos=((self._row_count, width, self.map_bins), jnp.int32, ranked),
                    neg=((self._row_count, width, self.map_bins), jnp.int32, ranked))
    return layout

  def abstract_accumulator(self, params, batch_stats, batch) -> dict:
    """The accumulator as jax.ShapeDtypeStructs with their shardings (inputs may be too)."""
    return {k: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(self.mesh, spec))
            for k, (s, d, spec) in self._layout(params, batch_stats, batch).items()}

  def accumulator(self, params, batch_stats, batch) -> dict:
    """A zero accumulator for batches like `batch`, placed on the mesh."""
    layout = self._layout(params, batch_stats, batch)
    key = tuple(sorted((k, s, jnp.dtype(d).name, spec) for k, (s, d, spec) in layout.items()))
    if key not in self._jit_zeros:
      empty = lambda k, s, d: jnp.full(s, -1 if k in ('top_p', 'top_y') else 0, d)
      self._jit_zeros[key] = jax.jit(
          lambda: {k: empty(k, s, d) for k, (s, d, _) in layout.items()},
          out_shardings={k: NamedSharding(self.mesh, spec) for k, (_, _, spec) in layout.items()})
    return self._jit_zeros[key]()

  def _step(self, acc, params, batch_stats, batch):
    logits = self.logits_fn(params, batch_stats, batch['image']).astype(jnp.float32)
    logits = mask_padded(logits, self.num_classes)
    probs = probabilities(self.link, logits)
    acc = {**acc, **accumulate(acc, logits, probs, batch['label'], batch['mask'],
                               link=self.link, num_bins=self.num_bins)}
    if 'top_p' in acc:
      acc.update(self._rank(acc, probs, batch['label'], batch['mask']))
    return acc

  def _rank(self, acc, probs, labels, mask) -> dict:
    """The mAP summary after this batch (class-sharded, `_rank_update` on each device)."""
    width = acc['top_p'].shape[1]
    if probs.shape[-1] < width:    # a width 'model' does not divide: pad (it is unsplit)
      probs = jnp.pad(probs, ((0, 0), (0, width - probs.shape[-1])))
    rows = self._rows or None
    ranked = P(rows, self._classes, None)
    body = jax.shard_map(
        lambda *a: _rank_update(*a, class_axis=self._classes, map_bins=self.map_bins),
        mesh=self.mesh, in_specs=(ranked,) * 4 + (P(rows, self._classes), P(rows), P(rows)),
        out_specs=(ranked,) * 4)
    names = ('top_p', 'top_y', 'pos', 'neg')
    return dict(zip(names, body(*(acc[n] for n in names), probs, labels, mask)))

  def _jitted(self, acc):
    """The jitted step for accumulators like `acc` (one for label sets, one for labels)."""
    kind = tuple(sorted(acc))
    if kind not in self._jit_steps:
      shardings = jax.tree.map(lambda a: a.sharding, acc)
      self._jit_steps[kind] = jax.jit(self._step, in_shardings=(shardings, *self._in),
                                      out_shardings=shardings, donate_argnums=0)
    return self._jit_steps[kind]

  def __call__(self, acc, params, batch_stats, batch) -> dict:
    return self._jitted(acc)(acc, params, batch_stats, batch)

  def lower(self, params, batch_stats, batch) -> jax.stages.Lowered:
    """The step lowered for inputs like these (jax.ShapeDtypeStructs with shardings are
    enough): `.compile().memory_analysis()` gives its per-device memory."""
    acc = self.abstract_accumulator(params, batch_stats, batch)
    return self._jitted(acc).lower(acc, params, batch_stats, batch)

  # ----- Results.

  def _map(self, acc) -> dict:
    ranked = P(self._rows or None, self._classes, None)
    body = jax.shard_map(
        lambda *a: _mean_average_precision(
            *a, row_axes=self._rows, row_count=self._row_count, class_axis=self._classes,
            num_classes=self.num_classes, map_bins=self.map_bins),
        mesh=self.mesh, in_specs=(ranked,) * 4, out_specs=(P(),) * 3)
    ap, bound, classes = body(acc['top_p'], acc['top_y'], acc['pos'], acc['neg'])
    return {'map': ap / jnp.maximum(classes, 1), 'map_classes': classes,
            'map_error_bound': bound / jnp.maximum(classes, 1)}

  def results(self, acc) -> tuple[dict, dict]:
    """(metrics, reliability bins {'count', 'confidence', 'correct'} [num_bins]) on the host."""
    scalars = {k: v for k, v in acc.items() if k not in ('top_p', 'top_y', 'pos', 'neg')}
    if 'top_p' in acc:
      scalars.update(self._jit_map(acc))
    host = {k: np.asarray(v, np.float64) for k, v in jax.device_get(scalars).items()}
    bins = {k: np.asarray(host[f'bin_{k}'], np.float64) for k in ('count', 'confidence',
                                                                   'correct')}
    n = float(host['count'])
    if 'map' not in host:
      return {'num_examples': int(n),
              'accuracy': float(host['correct'] / n),
              'nll': float(host['nll'] / n),
              'ece': expected_calibration_error(bins)}, bins
    labelled = float(host['weight'])
    classes = int(host['map_classes'])
    return {'num_examples': int(n), 'num_labelled': int(labelled),
            'prec@1': float(host['correct'] / max(labelled, 1.0)),
            'map': float(host['map']) if classes else None, 'map_classes': classes,
            'map_error_bound': float(host['map_error_bound']) if classes else None,
            'map_method': f'top{self.map_top_k}+histogram(bins={self.map_bins})',
            'nll': float(host['nll'] / n),
            'ece': expected_calibration_error(bins),
            'nll_definition': NLL_DEFINITION,
            'calibration': CALIBRATION.format(bins=self.num_bins)}, bins


def accumulate(acc: dict, logits: jax.Array, probs: jax.Array, labels: jax.Array,
               mask: jax.Array, *, link: str, num_bins: int) -> dict:
  """The scalar sums and reliability bins of `acc` after one batch (jit-able, any sharding).

  logits [B, K_pad] float32 with the padded classes masked (`heads.base.mask_padded`), probs their
  `probabilities(link, logits)`, labels [B] or label sets [B, L], mask [B] (1 = real example).
  Sums (counts int32, exact): 'count' (real examples), 'weight' (examples in top-1 and ECE:
  real ones, or for label sets those with a label), 'correct' (accuracy / prec@1 numerator),
  'nll', and 'bin_count', 'bin_confidence', 'bin_correct' [num_bins] over equal-width
  confidence bins [i / n, (i + 1) / n) as `evaluation.calibration.bin_statistics`.
  """
  if labels.ndim == 2:
    weight = mask * has_label(labels)
    correct = top1_correct(logits, labels)
    nll = link_loss(link, logits, labels)
  else:   # one label: the head's distribution over classes (sigmoid heads' normalised)
    weight = mask
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    p_label = jnp.sum(probs * class_targets(labels, probs.shape[-1]), axis=-1)
    correct = (jnp.argmax(probs, -1) == labels).astype(jnp.float32)
    nll = -jnp.log(jnp.maximum(p_label, 1e-30))
  confidence = probs.max(-1)
  in_bin = jnp.clip((confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)
  one_hot = (in_bin[:, None] == jnp.arange(num_bins)) * weight[:, None]
  count = lambda x, axis=None: jnp.round(jnp.sum(x, axis)).astype(jnp.int32)   # exact
  return {'count': acc['count'] + count(mask), 'weight': acc['weight'] + count(weight),
          'correct': acc['correct'] + count(correct * weight),
          'nll': acc['nll'] + jnp.sum(nll * mask),
          'bin_count': acc['bin_count'] + count(one_hot, 0),
          'bin_confidence': acc['bin_confidence'] + jnp.sum(one_hot * confidence[:, None], 0),
          'bin_correct': acc['bin_correct'] + count(one_hot * correct[:, None], 0)}


def make_eval_step(model: nn.Module, mesh: Mesh, state_shardings: Any,
                   options: ml_collections.ConfigDict) -> EvalStep:
  """The `EvalStep` of `model` on `mesh` (its head's link and `num_classes`; the eval noise of
  MC heads fixed by EVAL_SEED); `options` is `config.eval` (num_bins, map_bins, map_top_k)."""
  def logits_fn(params, batch_stats, image):
    out = model.apply({'params': params, 'batch_stats': batch_stats}, image, train=False,
                      rngs=step_rngs(jax.random.key(EVAL_SEED), 0, model.head))
    return out.logits
  return EvalStep(logits_fn, model.head.link, model.head.num_classes, mesh,
                  (state_shardings.params, state_shardings.batch_stats), options)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
  """Host reference: mAP over the classes with at least one positive, (mAP, their number).

  scores [N, K] float, targets [N, K] in {0, 1}; per-class average precision as
  `sklearn.metrics.average_precision_score` (step-wise, no interpolation). (nan, 0) when no
  class has a positive. The evaluator computes mAP on the devices instead (`MAP_DOC`).
  """
  from sklearn.metrics import average_precision_score
  keep = targets.sum(0) > 0
  if not keep.any():
    return float('nan'), 0
  return (float(average_precision_score(targets[:, keep], scores[:, keep], average='macro')),
          int(keep.sum()))


def multi_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Host-side multi-hot [N, K] float32 of padded label sets [N, L] (-1 is padding)."""
  out = np.zeros((len(labels), num_classes), np.float32)
  rows, cols = np.nonzero(labels >= 0)
  out[rows, labels[rows, cols]] = 1.0
  return out


def evaluate(eval_step: EvalStep, params: Any, batch_stats: Any,
             dataset: Any) -> tuple[dict, dict]:
  """Runs `dataset` (padded, masked batches) once. Returns (metrics, reliability bins)."""
  acc = None
  for batch in device_batches(iter(dataset), batch_sharding(eval_step.mesh)):
    if acc is None:
      acc = eval_step.accumulator(params, batch_stats, batch)
    acc = eval_step(acc, params, batch_stats, batch)
  if acc is None:
    raise ValueError('evaluate: the eval dataset yielded no batch')
  return eval_step.results(acc)
