"""The optax optimizer and learning-rate schedule a config describes, with per-parameter
weight-decay and learning-rate multipliers and frozen parameters (big_vision's `wd_mults`,
`lr_mults` and frozen parameters, big_vision/optax.py; own code on optax's API).

A parameter is named by its path in the params tree, keys joined by '/', no leading slash:
'backbone/stage1_block0/conv1/kernel', 'head/temperature/pre_sigmoid_temperature'. A rule is
a (regex, multiplier) pair matched against the whole path (`re.fullmatch`); the first rule of
a list that matches wins, as in big_vision. Config fields (`config.optimizer`):

  frozen     (regex, ...): never updated, and no optimizer state is kept for them
  lr_mults   ((regex, m), ...): the parameter's whole update, its decay included, times m
             (its learning rate is m * lr); m = 0 freezes it like `frozen`; unmatched: 1
  wd_mults   ((regex, m), ...): its weight decay is m * weight_decay; unmatched parameters
             follow `decay_all`
  decay_all  False (default): biases ('.../bias'), normalisation scales ('.../scale') and the
             learnt temperature ('...temperature...') do not decay, every other parameter
             does (m = 1). True: every parameter decays, as in the uncertainty-baselines JFT
             recipes (the parity switch).

A rule that matches no parameter is an error naming it. Weight decay is decoupled for adamw
(optax.adamw: the update is -lr * (adam direction + wd * p)) and coupled (wd * p added to the
gradient, as in the LLC / ResNet recipes) for sgd and adam. Gradient clipping uses the global
norm of the trainable parameters' gradients only. Batch-norm statistics are not parameters:
a frozen BatchNorm still updates its running averages in training mode.
"""
import math
import re
from typing import Any, Dict, List, Sequence, Tuple

import jax
import ml_collections
import optax
from absl import logging

NAMES = ('adam', 'adamw', 'sgd')
NO_DECAY = (r'.*/bias', r'.*/scale', r'.*temperature.*')  # unmatched-by-wd_mults, decay_all=False
FROZEN = 'frozen'


def build_schedule(c: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  lr, warmup = c.learning_rate, min(c.warmup_steps, max(num_steps - 1, 0))
  if c.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                              max(num_steps, warmup + 1))
  if c.schedule == 'linear':   # warmup, then linear decay to end_learning_rate (big_vision)
    decay = optax.linear_schedule(lr, c.end_learning_rate, max(num_steps - warmup, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) \
        if warmup else decay
  if c.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup]) if warmup else \
        optax.constant_schedule(lr)
  raise ValueError(f"unknown optimizer.schedule {c.schedule!r}: use 'cosine', 'linear' or 'constant'")


def describe_schedule(c: ml_collections.ConfigDict, num_steps: int) -> str:
  """The learning rate `build_schedule` gives, in one line read from the schedule itself
  (step s, counted from 1, trains at schedule(s - 1)), e.g. 'learning rate 0 at step 1, 0.001
  at step 12 (after 11 warmup steps), cosine to 2.2e-07 at the last step 117'. Raises
  ValueError for an unknown schedule."""
  schedule = build_schedule(c, num_steps)

  def rate(step: int) -> str:
    return f'{float(schedule(step - 1)):.3g}'

  warmup = min(c.warmup_steps, max(num_steps - 1, 0))
  peak = (f', {rate(warmup + 1)} at step {warmup + 1} (after {warmup} warmup steps)'
          if warmup else '')
  return (f'learning rate {rate(1)} at step 1{peak}, {c.schedule} to {rate(num_steps)} at the '
          f'last step {num_steps}')


def param_path(keypath: Sequence[Any]) -> str:
  """'backbone/conv1/kernel' for a jax key path (dict keys, attribute names or indices)."""
  parts = []
  for k in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def param_paths(params: Any) -> List[str]:
  """The path of every leaf of `params`, in `jax.tree.leaves` order."""
  return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile(field: str, pattern: Any) -> re.Pattern:
  if not isinstance(pattern, str):
    raise ValueError(f'optimizer.{field}: each rule needs a regex string, got {pattern!r}')
  if pattern.startswith('/'):
    raise ValueError(f'optimizer.{field}: {pattern!r} starts with "/", but parameter paths '
                     f'never do (e.g. "backbone/conv1/kernel")')
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'optimizer.{field}: {pattern!r} is not a valid regex ({e})') from None


def _pairs(field: str, rules: Any) -> List[Tuple[re.Pattern, float]]:
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f'optimizer.{field}: each rule is a (regex, multiplier) pair, got '
                       f'{rule!r}; e.g. {field}=(("head/.*", 0.1),)')
    pattern, mult = rule
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) \
        or mult < 0:
      raise ValueError(f'optimizer.{field}: the multiplier of {pattern!r} must be a finite '
                       f'number >= 0, got {mult!r}')
    out.append((_compile(field, pattern), float(mult)))
  return out


def _first_match(rules: List[Tuple[re.Pattern, float]], path: str) -> float | None:
  return next((m for r, m in rules if r.fullmatch(path)), None)


def _check_all_match(field: str, rules: List[Tuple[re.Pattern, float]],
                     paths: List[str]) -> None:
  for r, _ in rules:
    if not any(r.fullmatch(p) for p in paths):
      spread = sorted({round(i * (len(paths) - 1) / 7) for i in range(8)})  # first to last
      examples = ', '.join(repr(paths[i]) for i in spread)
      raise ValueError(
          f'optimizer.{field}: the regex {r.pattern!r} matches no parameter. A rule is matched '
          f'against the whole path (re.fullmatch), keys joined by "/", no leading slash; this '
          f'model has {len(paths)} parameters, e.g. {examples}.')


def param_multipliers(c: ml_collections.ConfigDict, params: Any) -> Dict[str, Tuple[float, float]]:
  """{path: (lr multiplier, weight-decay multiplier)} for every parameter of `params` (arrays
  or `jax.ShapeDtypeStruct`s); an lr multiplier of 0 means frozen. Raises ValueError for a
  malformed rule or one that matches no parameter."""
  paths = param_paths(params)
  frozen = [(_compile('frozen', p), 0.0) for p in c.frozen]
  lr_rules, wd_rules = _pairs('lr_mults', c.lr_mults), _pairs('wd_mults', c.wd_mults)
  for field, rules in (('frozen', frozen), ('lr_mults', lr_rules), ('wd_mults', wd_rules)):
    _check_all_match(field, rules, paths)
  no_decay = [(re.compile(p), 0.0) for p in NO_DECAY]
  out = {}
  for path in paths:
    lr = _first_match(frozen + lr_rules, path)
    wd = _first_match(wd_rules, path)
    if wd is None and not c.decay_all:
      wd = _first_match(no_decay, path)
    out[path] = (1.0 if lr is None else lr, 1.0 if wd is None else wd)
  return out


def _core(c: ml_collections.ConfigDict, schedule: optax.Schedule, weight_decay: float,
          lr_mult: float) -> optax.GradientTransformation:
  """The optimizer for one group of parameters that share their multipliers."""
  lr = schedule if lr_mult == 1.0 else (lambda step: lr_mult * schedule(step))
  if c.name == 'adamw':
    return optax.adamw(lr, weight_decay=weight_decay)
  parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  if c.name == 'adam':
    parts.append(optax.adam(lr))
  else:
    parts.append(optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))
  return optax.chain(*parts)


def build_optimizer(c: ml_collections.ConfigDict, num_steps: int,
                    params: Any) -> optax.GradientTransformation:
  """Gradient clipping (trainable parameters only), then one optimizer per group of parameters
  with the same (lr, weight-decay) multipliers (`optax.partition`); frozen parameters get
  `optax.set_to_zero` and no state. `params`: the parameter tree (arrays or
  ShapeDtypeStructs) the optimizer will update; its structure is baked into the result.
  Raises ValueError for an unknown optimizer name or a bad / unmatched rule."""
  if c.name not in NAMES:
    raise ValueError(f'unknown optimizer.name {c.name!r}: use {", ".join(map(repr, NAMES))}')
  schedule = build_schedule(c, num_steps)
  mults = param_multipliers(c, params)
  groups = sorted({m for m in mults.values() if m[0] > 0})
  label_of = {m: f'group{i}' for i, m in enumerate(groups)}
  leaf_labels = [FROZEN if m[0] == 0 else label_of[m] for m in mults.values()]
  labels = jax.tree.unflatten(jax.tree.structure(params), leaf_labels)
  for m, name in label_of.items():
    members = [p for p, v in mults.items() if v == m]
    logging.info('optimizer %s: lr x%g, weight decay x%g: %d parameters, e.g. %s', name, m[0],
                 m[1], len(members), members[:3])
  frozen = [p for p, v in mults.items() if v[0] == 0]
  if frozen:
    logging.info('optimizer: %d frozen parameters, e.g. %s', len(frozen), frozen[:3])
  transforms = {name: _core(c, schedule, c.weight_decay * m[1], m[0])
                for m, name in label_of.items()}
  transforms[FROZEN] = optax.set_to_zero()
  parts = []
  if c.grad_clip_norm:
    trainable = jax.tree.map(lambda label: label != FROZEN, labels)
    parts.append(optax.masked(optax.clip_by_global_norm(c.grad_clip_norm), trainable))
  parts.append(optax.partition(transforms, labels))
  return optax.chain(*parts)
