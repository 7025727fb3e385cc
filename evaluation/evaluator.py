"""One pass over the eval split, counted once per real example.

Single-label data (labels [B]): accuracy, NLL of the label under the head's predicted
distribution, top-1 ECE. Multi-label data (label sets [B, L], see `heads.base`), the JFT
protocol of big_vision and uncertainty-baselines: prec@1 (the top-scoring class is one of the
image's labels; images without labels are left out), mAP (mean over classes with at least one
positive of scikit-learn's average precision), the per-example NLL of the head's link
(sigmoid: binary cross-entropy summed over classes; softmax: cross-entropy against the
normalised multi-hot), and top-1 ECE; `calibration` and `nll_definition` in the results
name what the numbers are.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evaluation.calibration import bin_statistics, expected_calibration_error
from heads.base import has_label, link_loss, probabilities, top1_correct
from input_pipeline.pipeline import device_batches
from training.mesh import batch_sharding
from training.model import step_rngs

EVAL_SEED = 20260101  # fixed: MC heads draw the same noise on every evaluation
MAP_MAX_SCORES = 2**28  # eval examples x classes kept on the host for mAP (1 GiB of float32)
NLL_DEFINITION = ('mean over images of the per-image NLL of the head\'s link, in nats: '
                  "link='sigmoid': binary cross-entropy summed over classes; link='softmax': "
                  'cross-entropy against the normalised multi-hot target')
CALIBRATION = ('top-1 ECE: confidence = predicted probability of the top-scoring class, '
               'correct = that class is one of the labels; {bins} equal-width bins, images '
               'with labels only')


def make_eval_step(model: nn.Module, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(params, batch_stats, batch) -> per-example results, replicated.

  Always 'confidence', 'correct', 'nll', 'mask' [B]; for label sets also 'labelled' [B],
  'scores' [B, K] (class probabilities, for mAP) and 'label' [B, L].
  """
  link = model.head.link

  def step(params, batch_stats, batch):
    out = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                      train=False, rngs=step_rngs(jax.random.key(EVAL_SEED), 0, model.head))
    probs = probabilities(link, out.logits)
    labels = batch['label']
    if labels.ndim == 2:
      return {'confidence': probs.max(-1), 'correct': top1_correct(out.logits, labels),
              'nll': link_loss(link, out.logits, labels), 'mask': batch['mask'],
              'labelled': batch['mask'] * has_label(labels), 'scores': probs, 'label': labels}
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)  # sigmoid heads: normalised
    p_label = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return {'confidence': probs.max(-1),
            'correct': (probs.argmax(-1) == labels).astype(jnp.float32),
            'nll': -jnp.log(jnp.maximum(p_label, 1e-30)),
            'mask': batch['mask']}

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings.params, state_shardings.batch_stats,
                                     batch_sharding(mesh)),
                 out_shardings=replicated)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
  """mAP over the classes with at least one positive: (mAP, number of those classes).

  scores [N, K] float, targets [N, K] in {0, 1}; per-class average precision as
  `sklearn.metrics.average_precision_score` (step-wise, no interpolation). (nan, 0) when no
  class has a positive.
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


def evaluate(eval_step: Callable, params: Any, batch_stats: Any, dataset: Any, mesh: Mesh,
             num_bins: int = 15) -> tuple[dict, dict]:
  """Runs `dataset` (padded, masked) once. Returns (metrics, reliability bins)."""
  columns = {}
  for batch in device_batches(iter(dataset), batch_sharding(mesh)):
    out = jax.device_get(eval_step(params, batch_stats, batch))
    for k, v in out.items():
      columns.setdefault(k, []).append(np.asarray(v))
    if 'scores' in out and sum(len(s) for s in columns['scores']) * out['scores'].shape[1] > \
        MAP_MAX_SCORES:
      del columns['scores']   # too big to keep: no mAP
      logging.warning('eval: more than %d scores, mAP not computed', MAP_MAX_SCORES)
  c = {k: np.concatenate(v) for k, v in columns.items()}
  mask = c['mask']
  n = float(mask.sum())
  if 'labelled' not in c:
    bins = bin_statistics(c['confidence'], c['correct'], num_bins, weights=mask)
    return {'num_examples': int(n),
            'accuracy': float((c['correct'] * mask).sum() / n),
            'nll': float((c['nll'] * mask).sum() / n),
            'ece': expected_calibration_error(bins)}, bins

  labelled = c['labelled']
  bins = bin_statistics(c['confidence'], c['correct'], num_bins, weights=labelled)
  metrics = {'num_examples': int(n), 'num_labelled': int(labelled.sum()),
             'prec@1': float((c['correct'] * labelled).sum() / max(labelled.sum(), 1.0)),
             'map': None, 'map_classes': 0,
             'nll': float((c['nll'] * mask).sum() / n),
             'ece': expected_calibration_error(bins),
             'nll_definition': NLL_DEFINITION,
             'calibration': CALIBRATION.format(bins=num_bins)}
  if 'scores' in c:
    real = mask > 0
    scores = c['scores'][real]
    metrics['map'], metrics['map_classes'] = mean_average_precision(
        scores, multi_hot(c['label'][real], scores.shape[1]))
  return metrics, bins
