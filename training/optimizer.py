"""The optax optimizer and learning-rate schedule a config describes."""
import ml_collections
import optax


def build_schedule(c: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  lr, warmup = c.learning_rate, min(c.warmup_steps, max(num_steps - 1, 0))
  if c.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                              max(num_steps, warmup + 1))
  if c.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup]) if warmup else \
        optax.constant_schedule(lr)
  raise ValueError(f"unknown optimizer.schedule {c.schedule!r}: use 'cosine' or 'constant'")


def build_optimizer(c: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Gradient clipping, then the optimizer. Weight decay is decoupled for adamw and coupled
  (added to the gradient, as in the LLC/ResNet recipes) for sgd and adam."""
  schedule = build_schedule(c, num_steps)
  parts = []
  if c.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  if c.weight_decay and c.name != 'adamw':
    parts.append(optax.add_decayed_weights(c.weight_decay))
  if c.name == 'adam':
    parts.append(optax.adam(schedule))
  elif c.name == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=c.weight_decay))
  elif c.name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=c.momentum or None, nesterov=c.nesterov))
  else:
    raise ValueError(f"unknown optimizer.name {c.name!r}: use 'adam', 'adamw' or 'sgd'")
  return optax.chain(*parts)
