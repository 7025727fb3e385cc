"""The training loop: one linear function, sectioned, that a reader can follow top to bottom.

It sits above the libraries it drives, so every import arrow points one way: `training`
(model, state, the step, checkpoints; imports no `evaluation`) <- `evaluation` (the eval pass
and its report) <- this loop.
"""
import contextlib
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from evaluation.evaluator import evaluate, make_eval_step
from evaluation.report import write_eval_report
from input_pipeline.pipeline import to_global, train_dataset
from input_pipeline.sources import NoisyLabels
from training.checkpointing import Checkpointer, check_signature, disk_full_is_one_line
from training.experiment import Experiment
from training.mesh import batch_sharding
from training.metric_writer import MetricWriter
from training.progress import LOG_EVERY_S, clock_time, timed
from training.state import TrainState, create_state, param_count
from training.train_step import make_train_step
from training.warm_start import warm_start
from training.workdir import WorkdirLock, check_classes, save_classes, save_config


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


class StepMetrics:
  """The train step's device metrics on the host: each step's are read one step late (so the
  host never waits on the device), checked for NaN/inf and written every `log_every` steps
  and at the end.

  Checkpoint s holds the parameters that step s + 1's loss is computed on, so it is good only
  once that loss is finite. On a NaN/inf stop `set_aside(first_bad)` (`Checkpointer.
  set_aside_from`) moves aside the checkpoints from `first_bad` on and returns (the newest
  step left or None, the paths moved), which the error names."""

  def __init__(self, writer: MetricWriter, log_every: int,
               set_aside: Callable[[int], tuple] = lambda first_bad: (None, [])):
    self._writer, self._log_every, self._set_aside = writer, log_every, set_aside
    self._pending = None        # (step, device metrics) not yet written
    self._read = (None, None)   # (step, host metrics) of the last read: never read twice

  def read(self, step: int, metrics: dict) -> dict:
    """`step`'s metrics as host floats, 'params_finite' removed. Raises FloatingPointError
    naming the step, the last good checkpoint and what to do on a NaN/inf loss or update."""
    if self._read[0] == step:
      return self._read[1]
    metrics = jax.device_get(metrics)
    params_finite = bool(metrics.pop('params_finite'))
    loss = metrics['loss']
    if not (np.isfinite(loss) and params_finite):
      # A non-finite loss condemns the previous step's parameters; a non-finite update of a
      # finite loss only this step's (never saved).
      first_bad = step - 1 if not np.isfinite(loss) else step
      what = (f'loss ({loss}) on the parameters of step {step - 1}' if not np.isfinite(loss)
              else 'parameter update')
      raise FloatingPointError(_nonfinite_message(step, what, first_bad,
                                                  *self._set_aside(first_bad)))
    self._read = (step, {k: float(v) for k, v in metrics.items()})
    return self._read[1]

  def add(self, step: int, metrics: dict) -> None:
    """Queues `step`'s metrics; reads, checks and (when due) writes the previous step's."""
    self._flush(final=False)
    self._pending = (step, metrics)

  def close(self) -> None:
    """Reads, checks and writes the last step's metrics."""
    self._flush(final=True)

  def _flush(self, final: bool) -> None:
    if self._pending is None:
      return
    (step, metrics), self._pending = self._pending, None
    host = self.read(step, metrics)
    if final or step % self._log_every == 0:
      self._writer.write(step, host)


def _nonfinite_message(step: int, what: str, first_bad: int, good: Optional[int],
                       moved: list) -> str:
  text = (f'non-finite {what} at step {step} (the losses up to step {first_bad} were finite); '
          'stopped without saving it.')
  if moved:
    text += (' The checkpoints of those parameters cannot continue and were moved aside: '
             + ', '.join(moved) + '.')
  fix = 'lower --config.optimizer.learning_rate (or set --config.optimizer.grad_clip_norm)'
  if good is None:
    return text + f' No good checkpoint is left: {fix} and re-run to start over from step 0.'
  return text + f' Last good checkpoint: step {good}; {fix} and re-run to resume from it.'


def _progress(step: int, num_steps: int, metrics: dict, steps_per_sec: float,
              batch_size: int) -> str:
  """One line: step, every metric of the step (loss first), speed, ETA."""
  eta = clock_time((num_steps - step) / max(steps_per_sec, 1e-9))
  values = ''.join(f' | {k} {v:.4g}' for k, v in metrics.items())   # 4 significant digits
  return (f'step {step}/{num_steps}{values} | {steps_per_sec:.2f} steps/s | '
          f'{steps_per_sec * batch_size:.0f} img/s | ETA {eta}')


def _evaluate(exp: Experiment, eval_step: Any, state: TrainState, step: int,
              writer: MetricWriter, workdir: str) -> dict:
  """Evaluates `state` on the eval split; writes the scalars and the report; returns them."""
  metrics, bins = evaluate(eval_step, state.params, state.batch_stats, exp.eval_dataset())
  writer.write(step, {f'eval/{k}': v for k, v in metrics.items()
                      if isinstance(v, (int, float))})   # not the definitions
  write_eval_report(workdir, step, metrics, bins)
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates. Returns the
  final eval metrics ({} when preempted: saved, re-run to resume)."""
  # The exit stack closes the checkpointer and the metric writer however `_train` ends; closing
  # the checkpointer waits for a pending async save, so an exception raised after a save (a
  # NaN stop, a crash in eval) never loses that save. A full disk, wherever it shows (LOCK, a
  # save, the wait for an async one), is one DiskFullError naming the last complete step.
  with disk_full_is_one_line(workdir) as disk:
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir), contextlib.ExitStack() as cleanup:
      return _train(config, workdir, cleanup, disk)


def _train(config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack,
           disk: Any) -> dict:
  # ----- Setup: mesh, model, optimizer, state layout. Nothing is written into the workdir
  # until every check has passed (see "Record" below), so a rejected command changes nothing.
  exp = Experiment.build(config)
  disk.state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(exp.abstract_state))
  check_signature(workdir, exp.abstract_state.params, record=False, layout=exp.class_layout)
  logging.info('mesh %s; %d params', dict(exp.mesh.shape), param_count(exp.abstract_state.params))

  # ----- Input: grain, sharded per process; assembled into global arrays per step.
  exp.match_classes(workdir)   # the data's class list against the model's (classes.json)
  train_source = exp.train_source
  exp.eval_source   # built now, so an eval split that selects nothing stops before step 1
  train_iter = iter(train_dataset(
      train_source, global_batch=config.input.batch_size, seed=config.seed,
      augment=config.input.train_augment, image_size=config.input.image_size,
      channels=config.dataset.channels, shuffle=config.input.shuffle,
      num_workers=config.input.num_workers, text_input=exp.text_input,
      reader=config.input.reader, sharded_above=config.input.sharded_above,
      streams=config.input.shard_streams, cycle_length=config.input.shards_interleaved,
      window=config.input.shuffle_window))
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
      if any(p.split('/')[0] == 'head' for p in config.train.init_prefixes):
        check_classes(config.train.init_from, exp.info.class_names, reorder=False,
                      what='this run\'s data')   # head parameters are per class
      state, taken = warm_start(state, config.train.init_from, config.train.init_prefixes,
                                exp.model.backbone)
      print(f'Initialised {len(taken)} arrays from {config.train.init_from}.', flush=True)
  else:
    state, start = ckpt.restore_newest(lambda s: ckpt.restore(
        s, exp.abstract_restore_target(), train_iter, exp.class_layout))   # skips damaged ones
    logging.info('resumed from step %d', start)
    print(f'Resumed from checkpoint at step {start}.', flush=True)

  # ----- Record: the config, the class list, the parameter shapes, the label noise; metrics.
  save_config(workdir, config)
  save_classes(workdir, exp.info.class_names)
  check_signature(workdir, exp.abstract_state.params, layout=exp.class_layout)
  if isinstance(train_source, NoisyLabels) and jax.process_index() == 0:
    train_source.write_record(workdir)   # label_noise.json: the realised flips, once per workdir
  writer = cleanup.enter_context(contextlib.closing(MetricWriter(workdir)))

  # ----- Compile once up front, so an out-of-memory shows before step 1.
  eval_step = make_eval_step(exp.model, exp.mesh, exp.shardings, config.eval)
  batch = to_global(next(train_iter), data_sharding)
  with timed('compiling the train step'):
    train_step = make_train_step(exp).lower(state, batch).compile()
  memory = train_step.memory_analysis()
  if memory is not None:
    logging.info('train step memory: args %.1f MiB, temps %.1f MiB',
                 memory.argument_size_in_bytes / 2**20, memory.temp_size_in_bytes / 2**20)

  # ----- Loop: step; progress; checkpoint (or stop when preempted); eval.
  preemption = _PreemptionFlag()
  num_steps, batch_size = config.train.num_steps, config.input.batch_size
  step_metrics = StepMetrics(writer, config.train.log_every, set_aside=ckpt.set_aside_from)
  t0, s0 = time.time(), start
  printed = t0   # progress: every log_every steps, after the first step and at least every 30 s
  for step in range(start + 1, num_steps + 1):
    if step > start + 1:
      batch = to_global(next(train_iter), data_sharding)
    state, metrics = train_step(state, batch)
    step_metrics.add(step, metrics)

    logged = step % config.train.log_every == 0 or step == num_steps
    if logged or step == start + 1 or time.time() - printed >= LOG_EVERY_S:
      host = step_metrics.read(step, metrics)   # waits for the step: the rate includes it
      printed = time.time()
      rate = (step - s0) / max(printed - t0, 1e-9)
      if logged:
        writer.write(step, {'perf/steps_per_sec': rate, 'perf/images_per_sec': rate * batch_size})
      print(_progress(step, num_steps, host, rate, batch_size), flush=True)

    stop = preemption.raised or ckpt.reached_preemption(step)
    if step % config.train.checkpoint_every == 0 or step == num_steps or stop:
      step_metrics.read(step, metrics)   # never save a NaN state
      ckpt.save(step, state, train_iter, force=True)
    if stop:
      ckpt.wait()
      print(f'Preempted: saved step {step}; re-run the same command to resume.', flush=True)
      break

    if config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps:
      eval_metrics = _evaluate(exp, eval_step, state, step, writer, workdir)
      print(f'eval step {step}: ' + json.dumps(eval_metrics), flush=True)

  # ----- End: the last step's metrics; the final evaluation unless preempted.
  step_metrics.close()
  del batch   # its grain shared memory is unlinked now, not leaked at the interpreter's exit
  final_step = int(jax.device_get(state.step))
  if final_step < num_steps:
    return {}
  eval_metrics = {'step': final_step, **_evaluate(exp, eval_step, state, final_step, writer,
                                                  workdir)}
  print(json.dumps(eval_metrics), flush=True)
  return eval_metrics
