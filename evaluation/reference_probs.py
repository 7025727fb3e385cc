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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from evaluation.collect import collect
from evaluation.from_checkpoint import restore_checkpoint
from heads.base import probabilities
from input_pipeline.sources import build_source


def class_probabilities(module: Any, images: jax.Array) -> dict:
  """{'probs': [B, K] float32 rows summing to 1} of the bound Classifier `module` in eval mode
  (sigmoid heads normalised, as the evaluator does; MC heads with the evaluator's fixed noise,
  drawn from the rngs `evaluation.collect.collect` passes)."""
  out = module(images, train=False)
  # the real classes only (a head that pads its class dimension gives its padding p = 0)
  probs = probabilities(module.head.link, out.logits[:, :module.head.num_classes])
  probs = probs.astype(jnp.float32)
  return {'probs': probs / jnp.sum(probs, -1, keepdims=True)}


def reference_probs(config: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, float]:
  """(probabilities [N, K] float32 of the training split in source order, accuracy on its
  clean labels)."""
  exp, variables, _ = restore_checkpoint(config, workdir)
  source, _ = build_source(config.dataset, config.dataset.train_split, config.seed, train=False)
  c = collect(exp, variables, class_probabilities, source)
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
  from training import cli   # --config defaults to the workdir's config.json
  cli.run(main)
