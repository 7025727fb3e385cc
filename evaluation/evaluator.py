"""One pass over the eval split: accuracy, NLL, ECE, counted once per real example."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evaluation.calibration import bin_statistics, expected_calibration_error
from heads.base import probabilities
from input_pipeline.pipeline import device_batches
from training.mesh import batch_sharding
from training.model import step_rngs

EVAL_SEED = 20260101  # fixed: MC heads draw the same noise on every evaluation


def make_eval_step(model: nn.Module, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(params, batch_stats, batch) -> per-example confidence, correct, nll, mask (replicated)."""
  link = getattr(model.head, 'link', 'softmax')

  def step(params, batch_stats, batch):
    out = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                      train=False, rngs=step_rngs(jax.random.key(EVAL_SEED), 0))
    probs = probabilities(link, out.logits)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)  # sigmoid heads: normalised
    p_label = jnp.take_along_axis(probs, batch['label'][:, None], axis=-1)[:, 0]
    return {'confidence': probs.max(-1),
            'correct': (probs.argmax(-1) == batch['label']).astype(jnp.float32),
            'nll': -jnp.log(jnp.maximum(p_label, 1e-30)),
            'mask': batch['mask']}

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings.params, state_shardings.batch_stats,
                                     batch_sharding(mesh)),
                 out_shardings=replicated)


def evaluate(eval_step: Callable, params: Any, batch_stats: Any, dataset: Any, mesh: Mesh,
             num_bins: int = 15) -> tuple[dict, dict]:
  """Runs `dataset` (padded, masked) once. Returns (metrics, reliability bins)."""
  columns = {k: [] for k in ('confidence', 'correct', 'nll', 'mask')}
  for batch in device_batches(iter(dataset), batch_sharding(mesh)):
    out = jax.device_get(eval_step(params, batch_stats, batch))
    for k in columns:
      columns[k].append(np.asarray(out[k]))
  c = {k: np.concatenate(v) for k, v in columns.items()}
  mask = c['mask']
  n = float(mask.sum())
  bins = bin_statistics(c['confidence'], c['correct'], num_bins, weights=mask)
  metrics = {'num_examples': int(n),
             'accuracy': float((c['correct'] * mask).sum() / n),
             'nll': float((c['nll'] * mask).sum() / n),
             'ece': expected_calibration_error(bins)}
  return metrics, bins
