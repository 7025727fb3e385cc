"""The train step: forward, loss, gradients and update in one jitted function over the mesh."""
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from heads.base import METRICS, has_label, top1_correct
from training.experiment import Experiment
from training.mesh import batch_sharding
from training.model import step_rngs
from training.state import TrainState


def head_metrics(sown: dict) -> dict:
  """{'head/<module path>/<name>': mean} of what heads sow into the 'head_metrics' collection
  ({module: ... {name: (value, ...)}}): named by the full path, so two modules that sow the
  same name never collide; a value sown several times in one step is averaged."""
  flat = traverse_util.flatten_dict(sown, sep='/')
  return {name: jnp.mean(jnp.stack([jnp.mean(v) for v in values]))
          for name, values in flat.items()}


def make_train_step(exp: Experiment):
  """jit(state, batch) -> (state + 1 step, metrics): explicit in/out shardings, the state donated.

  batch: as `Experiment.abstract_batch`. metrics (replicated scalars): 'loss' (mean over real
  examples), 'accuracy' (top-1; prec@1 for label sets), 'grad_norm', 'learning_rate' (of this
  step), 'params_finite' (bool: every updated parameter finite) and the heads' own
  (`head_metrics`). Noise: `step_rngs(key(config.seed), state.step, head)`, so a resumed run
  draws the same.
  """
  model, tx, schedule = exp.model, exp.tx, exp.schedule
  seed_key = jax.random.key(exp.config.seed)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rngs = step_rngs(seed_key, state.step, model.head)
    mask = batch['mask']

    def loss_fn(params):
      out, mutated = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], batch['label'],
          train=True, mask=mask, text=batch.get('text'), rngs=rngs,
          mutable=['batch_stats', METRICS])
      loss = jnp.sum(out.loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
      return loss, (out.logits, mutated)

    (loss, (logits, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    labelled = mask * has_label(batch['label'])       # prec@1 for label sets
    metrics = {'loss': loss,
               'accuracy': (jnp.sum(top1_correct(logits, batch['label']) * labelled)
                            / jnp.maximum(jnp.sum(labelled), 1.0)),
               'grad_norm': jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                                         for g in jax.tree.leaves(grads))),
               'learning_rate': schedule(state.step),
               'params_finite': jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                                   for p in jax.tree.leaves(params)])),
               **head_metrics(mutated.get(METRICS, {}))}
    new_state = TrainState(state.step + 1, params, mutated.get('batch_stats', state.batch_stats),
                           opt_state)
    return new_state, metrics

  replicated = NamedSharding(exp.mesh, P())
  return jax.jit(step, in_shardings=(exp.shardings, batch_sharding(exp.mesh)),
                 out_shardings=(exp.shardings, replicated), donate_argnums=0)
