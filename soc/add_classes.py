r"""Adds classes to a trained SOC model: encoder and existing class means frozen, only the new
means are learnt (the point of self-organizing class embeddings).

  python -m soc.add_classes --config=configs/soc_cifar10.py:dims=10 \
      --config.dataset.classes='(0,1,2,3,4,5,6,7)' --config.dataset.num_classes=8 \
      --workdir=/tmp/soc_8 --new_workdir=/tmp/soc_8plus2 --new_classes=8,9

`--config` is the config the workdir was trained with. The training images (new classes, and by
default the old ones too) are embedded once by the frozen encoder; the new means are then fit by Adam on the SOC loss (the
image term over all classes, the class term over all means, gradient to the new rows only).
The new workdir holds a checkpoint of the same model with K_old + K_new classes and its
config.json; evaluation on old + new classes is printed as JSON and written there.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

from evaluation.collect import collect
from evaluation.evaluator import evaluate, make_eval_step
from evaluation.report import write_eval_report
from input_pipeline.sources import ClassSubset, build_source
from soc.head import soc_loss, gaussian_log_density
from training.checkpointing import Checkpointer, check_signature, restore_variables
from training.experiment import Experiment
from training.state import create_state
from training.workdir import WorkdirLock, save_config


def _embed_all(exp: Experiment, variables: dict, source) -> tuple[np.ndarray, np.ndarray]:
  """Frozen-encoder embeddings [N, m] and labels [N] of every example of `source`."""
  out = collect(exp, variables, lambda m, x: {'z': m.head.embed(m.features(x))}, source)
  return out['z'], out['label']


def fit_new_means(old_means: jax.Array, z: jax.Array, labels: jax.Array, num_new: int, *,
                  steps: int, learning_rate: float, label_smoothing: float,
                  seed: int = 0) -> jax.Array:
  """Learns [num_new, m] means (uniform +-sqrt(0.3/m) init) with everything else fixed."""
  m = old_means.shape[1]
  bound = float(np.sqrt(0.3 / m))
  new = jax.random.uniform(jax.random.key(seed), (num_new, m), minval=-bound, maxval=bound)
  tx = optax.adam(learning_rate)

  def loss_fn(new_means):
    means = jnp.concatenate([jax.lax.stop_gradient(old_means), new_means])
    logits = gaussian_log_density(z, means)
    return soc_loss(logits, labels, means, None, label_smoothing).mean()

  @jax.jit
  def step(new_means, opt_state):
    grads = jax.grad(loss_fn)(new_means)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(new_means, updates), opt_state

  opt_state = tx.init(new)
  for _ in range(steps):
    new, opt_state = step(new, opt_state)
  return new


def add_classes(config: ml_collections.ConfigDict, workdir: str, new_workdir: str,
                new_classes: list[int], steps: int = 500, learning_rate: float = 1e-2,
                include_old: bool = True) -> dict:
  """Returns the evaluation of the extended model (all, old-class and new-class accuracy).

  With `include_old`, old classes' training images also enter the image term (their means stay
  fixed): the new means then learn where *not* to be, which protects old-class accuracy.
  """
  if config.model.head != 'soc':
    raise ValueError(f'{workdir} is not a SOC run (model.head = {config.model.head!r})')
  if config.model.head_kwargs.get('learn_scale', False):
    raise ValueError('adding classes supports unit-scale SOC heads only')
  old_classes = list(config.dataset.classes) or list(range(config.dataset.num_classes))
  clash = set(old_classes) & set(new_classes)
  if clash:
    raise ValueError(f'classes {sorted(clash)} are already in the model')

  # ----- The trained model, restored onto the current devices.
  old = Experiment.build(config)
  variables, step = restore_variables(workdir, old.abstract_restore_target(),
                                      hint='train the SOC model first')

  # ----- The same model with K_old + K_new classes: dataset ids old + new, in that order.
  new_config = copy.deepcopy(config)
  with new_config.unlocked():
    new_config.dataset.classes = tuple(old_classes + list(new_classes))
    new_config.dataset.num_classes = len(old_classes) + len(new_classes)
  new = Experiment.build(new_config)

  # ----- Embed the new classes' training images once, then fit only their means.
  train_source, _ = build_source(new_config.dataset, new_config.dataset.train_split,
                                 new_config.seed, train=False)
  if not include_old:
    train_source = ClassSubset(train_source, range(len(old_classes),
                                                   new_config.dataset.num_classes), relabel=False)
  z, labels = _embed_all(old, variables, train_source)
  old_means = variables['params']['head']['class_means']
  new_means = fit_new_means(jnp.asarray(old_means), jnp.asarray(z), jnp.asarray(labels),
                            len(new_classes), steps=steps, learning_rate=learning_rate,
                            label_smoothing=config.model.head_kwargs.get('label_smoothing', 0.1))
  params = jax.device_get(variables['params'])
  params['head']['class_means'] = np.concatenate([np.asarray(old_means), np.asarray(new_means)])

  # ----- Write the new workdir: config, checkpoint (state only), evaluation.
  os.makedirs(new_workdir, exist_ok=True)
  with WorkdirLock(new_workdir):
    save_config(new_workdir, new_config)
    check_signature(new_workdir, new.abstract_state.params)
    state = create_state(new.model, new.tx, new.image_shape, new.shardings, jax.random.key(0))
    place = lambda v, s: jax.device_put(np.asarray(v), s)
    state = state.replace(
        step=jnp.asarray(step, jnp.int32),
        params=jax.tree.map(place, params, new.shardings.params),
        batch_stats=jax.tree.map(place, jax.device_get(variables['batch_stats']),
                                 new.shardings.batch_stats))
    out = Checkpointer(new_workdir, save_every=1, keep=1, use_async=False)
    out.save(step, state, None, force=True)
    out.close()

    # Every class, then old and new classes apart; one report (process 0) holds all three.
    eval_step = make_eval_step(new.model, new.mesh, new.shardings, new_config.eval)
    accuracy = {}
    for name, keep in (('old', range(len(old_classes))),
                       ('new', range(len(old_classes), new_config.dataset.num_classes))):
      subset = ClassSubset(new.eval_source, keep, relabel=False)
      metrics, _ = evaluate(eval_step, state.params, state.batch_stats,
                            new.eval_dataset(subset))
      accuracy[f'{name}_classes_accuracy'] = metrics['accuracy']
    metrics, bins = evaluate(eval_step, state.params, state.batch_stats, new.eval_dataset())
    record = write_eval_report(new_workdir, step, {**metrics, **accuracy}, bins)
  return record


_CONFIG = config_flags.DEFINE_config_file('config', None, 'the config the workdir was trained with')
_WORKDIR = flags.DEFINE_string('workdir', None, 'trained SOC workdir')
_NEW_WORKDIR = flags.DEFINE_string('new_workdir', None, 'where the extended model goes')
_NEW_CLASSES = flags.DEFINE_list('new_classes', None, 'dataset class ids to add')
_STEPS = flags.DEFINE_integer('steps', 500, 'Adam steps on the new means')
_LR = flags.DEFINE_float('learning_rate', 1e-2, 'Adam learning rate for the new means')
_INCLUDE_OLD = flags.DEFINE_bool('include_old', True,
                                 "old classes' training images in the image term too")


def main(argv):
  del argv
  from training.resolve import resolve
  record = add_classes(resolve(_CONFIG.value), _WORKDIR.value, _NEW_WORKDIR.value,
                       [int(c) for c in _NEW_CLASSES.value], _STEPS.value, _LR.value,
                       _INCLUDE_OLD.value)
  print(json.dumps(record), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir', 'new_workdir', 'new_classes'])
  from training import cli   # --config defaults to the workdir's config.json
  cli.run(main)
