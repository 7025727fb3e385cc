r"""A trained workdir's predicted class probabilities on its training split, for
input-dependent label noise (`dataset.label_noise_kind='input_dependent'`,
`dataset.label_noise_reference=FILE`, see `input_pipeline.sources.NoisyLabels`).

  python -m evaluation.reference_probs --config=configs/hetxl_cifar10.py:det \
      --workdir=/tmp/det --out=.data/cifar10_det_train_probs.npy

Restores the latest checkpoint (params + batch_stats) and runs the model in eval mode over the
training split with clean labels, un-augmented and preprocessed as the eval split, in source
order (after `dataset.classes`, so row n is the n-th example the noisy source wraps). Writes
float32 [N, K] rows summing to 1 (sigmoid heads normalised, as the evaluator does) with
`np.save`, atomically, from process 0; prints one JSON line (path, shape, the reference's
accuracy on the clean training labels).
"""
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from evaluation.evaluator import EVAL_SEED
from evaluation.from_checkpoint import restore_checkpoint
from heads.base import probabilities
from input_pipeline.pipeline import device_batches
from input_pipeline.sources import build_source
from training.experiment import Experiment
from training.mesh import batch_sharding
from training.model import step_rngs


def collect(exp: Experiment, variables: dict, source: Any, per_example: Callable) -> dict:
  """One eval-mode pass of the model over `source` (eval preprocessing, padded batches):
  `per_example(model, variables, images) -> {name: [B, ...]}` under jit, plus 'label'; returns
  {name: array [N, ...]} in the source's order, padding removed."""
  def step(params, batch_stats, batch):
    out = per_example(exp.model, {'params': params, 'batch_stats': batch_stats}, batch['image'])
    return {**out, 'label': batch['label'], 'mask': batch['mask'], 'index': batch['index']}

  step = jax.jit(step, in_shardings=(exp.shardings.params, exp.shardings.batch_stats,
                                     batch_sharding(exp.mesh)),
                 out_shardings=NamedSharding(exp.mesh, P()))
  columns = {}
  for batch in device_batches(iter(exp.eval_dataset(source)), batch_sharding(exp.mesh)):
    out = jax.device_get(step(variables['params'], variables['batch_stats'], batch))
    for k, v in out.items():
      columns.setdefault(k, []).append(np.asarray(v))
  c = {k: np.concatenate(v) for k, v in columns.items()}
  keep = c.pop('mask') > 0
  order = np.argsort(c.pop('index')[keep])
  return {k: v[keep][order] for k, v in c.items()}


def class_probabilities(model: Any, variables: dict, images: jax.Array) -> dict:
  """{'probs': [B, K] float32 rows summing to 1} (sigmoid heads normalised, as the evaluator
  does; MC heads with the evaluator's fixed noise)."""
  out = model.apply(variables, images, train=False,
                    rngs=step_rngs(jax.random.key(EVAL_SEED), 0))
  probs = probabilities(getattr(model.head, 'link', 'softmax'), out.logits).astype(jnp.float32)
  return {'probs': probs / jnp.sum(probs, -1, keepdims=True)}


def reference_probs(config: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, float]:
  """(probabilities [N, K] float32 of the training split in source order, accuracy on its
  clean labels)."""
  exp, variables, _ = restore_checkpoint(config, workdir)
  source, _ = build_source(config.dataset, config.dataset.train_split, config.seed, train=False)
  c = collect(exp, variables, source, class_probabilities)
  if c['label'].ndim != 1:
    raise ValueError('reference probabilities are for single-label data (label noise); this '
                     'dataset has label sets')
  return c['probs'], float(np.mean(c['probs'].argmax(-1) == c['label']))


def write_reference_probs(config: ml_collections.ConfigDict, workdir: str, out: str) -> dict:
  probs, accuracy = reference_probs(config, workdir)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + '.tmp.npy'
    np.save(tmp, probs)
    os.replace(tmp, out)
  return {'out': out, 'shape': list(probs.shape), 'train_accuracy': accuracy,
          'workdir': workdir}


def main(argv):
  del argv
  flags_ = flags.FLAGS
  print(json.dumps(write_reference_probs(flags_.config, flags_.workdir, flags_.out)), flush=True)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'config of the trained workdir',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'trained workdir (latest checkpoint)')
  flags.DEFINE_string('out', None, '.npy file to write')
  flags.mark_flags_as_required(['config', 'workdir', 'out'])
  from launch import cli   # --config defaults to the workdir's config.json
  cli.run(main)
