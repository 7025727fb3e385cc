"""The training loop: one linear function, sectioned, that a reader can follow top to bottom."""
import contextlib
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from evaluation.evaluator import evaluate, make_eval_step
from evaluation.report import write_eval_report
from heads.base import has_label, top1_correct
from input_pipeline.pipeline import to_global, train_dataset
from input_pipeline.sources import NoisyLabels, build_source
from training.checkpointing import Checkpointer, check_signature
from training.experiment import Experiment
from training.metric_writer import MetricWriter
from training.mesh import batch_sharding
from training.model import step_rngs
from training.state import TrainState, create_state, param_count
from training.warm_start import warm_start
from training.workdir import WorkdirLock, save_config


def make_train_step(exp: Experiment):
  """The jitted step: explicit in/out shardings, the state donated."""
  model, tx, schedule = exp.model, exp.tx, exp.schedule
  seed_key = jax.random.key(exp.config.seed)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rngs = step_rngs(seed_key, state.step)
    mask = batch['mask']

    def loss_fn(params):
      out, mutated = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], batch['label'],
          train=True, mask=mask, rngs=rngs, mutable=['batch_stats', 'head_metrics'])
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
                                                   for p in jax.tree.leaves(params)]))}
    for path, value in jax.tree_util.tree_flatten_with_path(mutated.get('head_metrics', {}))[0]:
      metrics[str(path[-2].key if len(path) > 1 else path[-1])] = jnp.mean(value)
    new_state = TrainState(state.step + 1, params, mutated.get('batch_stats', state.batch_stats),
                           opt_state)
    return new_state, metrics

  replicated = NamedSharding(exp.mesh, P())
  return jax.jit(step, in_shardings=(exp.shardings, batch_sharding(exp.mesh)),
                 out_shardings=(exp.shardings, replicated), donate_argnums=0)


class _PreemptionFlag:
  """Set by SIGTERM (what schedulers send before a preemption)."""

  def __init__(self):
    self.raised = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (tests): rely on orbax's check only
      pass

  def _handle(self, *_):
    self.raised = True


def _check_finite(step: int, metrics: dict, last_checkpoint: Any) -> dict:
  """Stops on a NaN/inf loss or update; returns the metrics worth logging."""
  metrics = dict(metrics)
  params_finite = bool(metrics.pop('params_finite'))
  if not (np.isfinite(metrics['loss']) and params_finite):
    what = f'loss ({metrics["loss"]})' if not np.isfinite(metrics['loss']) else 'parameter update'
    raise FloatingPointError(
        f'non-finite {what} at step {step} (steps up to {step - 1} were finite); stopped '
        f'without saving it. Last good checkpoint: step {last_checkpoint}.')
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates. Returns the
  final eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  # The exit stack closes the checkpointer and the metric writer however `_train` ends; closing
  # the checkpointer waits for a pending async save, so an exception raised after a save (a
  # NaN stop, a crash in eval) never loses that save.
  with WorkdirLock(workdir), contextlib.ExitStack() as cleanup:
    return _train(config, workdir, cleanup)


def _train(config: ml_collections.ConfigDict, workdir: str,
           cleanup: contextlib.ExitStack) -> dict:
  # ----- Setup: mesh, model, optimizer, state layout, logging.
  exp = Experiment.build(config)
  save_config(workdir, config)
  check_signature(workdir, exp.abstract_state.params)
  writer = cleanup.enter_context(contextlib.closing(MetricWriter(workdir)))
  logging.info('mesh %s; %d params', dict(exp.mesh.shape), param_count(exp.abstract_state.params))

  # ----- Input: grain, sharded per process; assembled into global arrays per step.
  train_source, _ = build_source(config.dataset, config.dataset.train_split, config.seed,
                                 train=True)
  if isinstance(train_source, NoisyLabels) and jax.process_index() == 0:
    train_source.write_record(workdir)   # label_noise.json: the realised flips, once per workdir
  train_iter = iter(train_dataset(
      train_source, global_batch=config.input.batch_size, seed=config.seed,
      augment=config.input.train_augment, image_size=config.input.image_size,
      channels=config.dataset.channels, shuffle=config.input.shuffle,
      num_workers=config.input.num_workers))
  data_sharding = batch_sharding(exp.mesh)

  # ----- State: restore the latest checkpoint (model, optimizer, step, data order) or init.
  ckpt = cleanup.enter_context(contextlib.closing(Checkpointer(
      workdir, save_every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
      use_async=config.train.async_checkpointing, config=config)))
  start = ckpt.latest_step()
  if start is None:
    state = create_state(exp.model, exp.tx, exp.image_shape, exp.shardings,
                         jax.random.key(config.seed))
    start = 0
    if config.train.init_from:
      state, taken = warm_start(state, config.train.init_from, config.train.init_prefixes,
                                exp.model.backbone)
      print(f'Initialised {len(taken)} arrays from {config.train.init_from}.', flush=True)
  else:
    state = ckpt.restore(start, exp.abstract_restore_target(), train_iter)
    logging.info('resumed from step %d', start)
    print(f'Resumed from checkpoint at step {start}.', flush=True)

  # ----- Compile once up front, so an out-of-memory shows before step 1.
  train_step = make_train_step(exp)
  eval_step = make_eval_step(exp.model, exp.mesh, exp.shardings)
  batch = to_global(next(train_iter), data_sharding)
  compiled = train_step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info('train step memory: args %.1f MiB, temps %.1f MiB',
                 memory.argument_size_in_bytes / 2**20, memory.temp_size_in_bytes / 2**20)

  def run_eval(step: int) -> dict:
    metrics, bins = evaluate(eval_step, state.params, state.batch_stats, exp.eval_dataset(),
                             exp.mesh, config.eval.num_bins)
    writer.write(step, {f'eval/{k}': v for k, v in metrics.items()
                        if isinstance(v, (int, float))})   # not the definitions
    write_eval_report(workdir, step, metrics, bins)
    return metrics

  # ----- Loop. Device metrics are read one step late so the host never waits on the device.
  preemption = _PreemptionFlag()
  num_steps = config.train.num_steps
  pending = None                # (step, device metrics) not yet read
  last_saved = start if start else None
  t0, s0 = time.time(), start
  eval_metrics = {}
  for step in range(start + 1, num_steps + 1):
    if step > start + 1:
      batch = to_global(next(train_iter), data_sharding)
    state, metrics = compiled(state, batch)

    if pending is not None:
      p_step, p_metrics = pending
      p_metrics = jax.device_get(p_metrics)
      p_metrics = _check_finite(p_step, p_metrics, last_saved)
      if p_step % config.train.log_every == 0:
        writer.write(p_step, p_metrics)
    pending = (step, metrics)

    if step % config.train.log_every == 0 or step == num_steps:
      rate = (step - s0) / max(time.time() - t0, 1e-9)
      eta = (num_steps - step) / max(rate, 1e-9)
      host = jax.device_get(metrics)
      loss = float(host['loss'])
      extra = ''.join(f' | {k} {float(v):.4f}' for k, v in host.items()
                      if k not in ('loss', 'accuracy', 'grad_norm', 'learning_rate',
                                   'params_finite'))
      writer.write(step, {'perf/steps_per_sec': rate,
                          'perf/images_per_sec': rate * config.input.batch_size})
      print(f'step {step}/{num_steps} | loss {loss:.4f}{extra} | {rate:.2f} steps/s | '
            f'{rate * config.input.batch_size:.0f} img/s | ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}',
            flush=True)

    stop = preemption.raised or ckpt.reached_preemption(step)
    if step % config.train.checkpoint_every == 0 or step == num_steps or stop:
      _check_finite(step, jax.device_get(metrics), last_saved)   # never save a NaN state
      ckpt.save(step, state, train_iter, force=True)
      last_saved = step
    if stop:
      ckpt.wait()
      print(f'Preempted: saved step {step}; re-run the same command to resume.', flush=True)
      break
    if config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps:
      eval_metrics = run_eval(step)
      print(f'eval step {step}: ' + json.dumps(eval_metrics), flush=True)

  if pending is not None:
    p_step, p_metrics = pending
    p_metrics = jax.device_get(p_metrics)
    writer.write(p_step, _check_finite(p_step, p_metrics, last_saved))
  final_step = int(jax.device_get(state.step))
  if final_step >= num_steps:
    eval_metrics = {'step': final_step, **run_eval(final_step)}
    print(json.dumps(eval_metrics), flush=True)
  return eval_metrics
