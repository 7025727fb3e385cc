"""The one place where a config's derived values are computed, after every override.

`get_config(arg)` states a recipe; `--config.*` overrides change it; `resolve(config)` then
reads the facts of the data it points at and fills, in this order, what was left to them:

  1. dataset facts (0 = from the data; a set value must agree with it): num_classes (the
     data's class count, or len(classes)), channels, image_size (stored side),
     train_examples; `ood_fraction` -> classes / ood_classes. Splits must exist.
  2. input.mean / input.std: () -> the train split's pixel statistics in metadata.json
     (prepared by `launch.prepare_data`), else 0.5; either way 1 or `channels` values.
  3. steps from epochs (steps per epoch = train_examples // batch_size, at least 1; a step
     count > 0 wins): train.num_steps <- epochs, eval_every <- eval_every_epochs, checkpoint_every <-
     checkpoint_every_epochs (0: at the end); warmup = the smaller of warmup_steps and
     warmup_epochs, of those > 0; a warmup of num_steps or more (the run would end at the peak
     rate) is cut to a tenth of the run, with a one-line warning. The learning rate is
     printed as the optimizer runs it (`training.optimizer.describe_schedule`).
  4. optimizer.lr_batch_size > 0: learning_rate is per that many images, scaled linearly to
     input.batch_size (then lr_batch_size is set to 0: the rate is absolute).
  5. head and backbone kwargs: each head derives its own (`heads.registry.resolve_head_kwargs`,
     e.g. LLC bits = ceil(2 log2 K), its codebook files checked against [K, bits]); kwargs a
     module does not take are an error.

It then checks the config against the data: mixed stored sizes need input.image_size,
mean/std length must fit the channels, classes must be in range. Every problem is a
`ConfigError` (a ValueError): one line naming the field to set. Resolving is in place and
idempotent (a resolved config, such as a workdir's config.json, resolves to itself), so
`training.experiment.Experiment.build` resolves whatever it is given, and tools that read
derived fields first (`llc.ood`, ...) call it themselves. What was derived is printed once.
"""
import dataclasses
import sys

import jax
import ml_collections
import numpy as np

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """The config does not fit its data, or asks for something it cannot derive."""


def split_classes(ds: ConfigDict, total: int) -> None:
  """Sets ds.classes / ood_classes / num_classes from ds.ood_fraction of `total` classes: a
  permutation seeded by ds.ood_seed holds out round(ood_fraction * total) of them. Raises
  ValueError unless at least one class is left on each side."""
  num_out = round(ds.ood_fraction * total)
  if not 0 < num_out < total:
    raise ValueError(f'ood={ds.ood_fraction} holds out {num_out} of {total} classes: use a '
                     'fraction that leaves at least one class on each side')
  order = np.random.default_rng(ds.ood_seed).permutation(total)
  ds.classes = tuple(sorted(int(k) for k in order[num_out:]))
  ds.ood_classes = tuple(sorted(int(k) for k in order[:num_out]))
  ds.num_classes = total - num_out
  ds.ood_fraction = 0.0   # done: the lists are the record


def _facts(ds: ConfigDict):
  from input_pipeline.sources import dataset_facts
  return dataset_facts(ds)


def resolve(config: ConfigDict, *, with_data: bool = True,
            verbose: bool = True) -> ConfigDict:
  """Fills `config`'s derived fields from its data and its final values (module docstring);
  returns it. `with_data=False` (ahead-of-time compilation) opens no data: every fact must
  then be set. Raises ConfigError, or FileNotFoundError when the data is not there."""
  notes, warnings = [], []
  ds = config.dataset
  facts = _facts(ds) if with_data else None
  _dataset(ds, facts, notes)
  _normalisation(config, facts, notes)
  _schedule(config, facts, notes, warnings)
  _modules(config, notes)
  if notes:   # a first resolve: also what the input pipeline will do to the images
    notes += _input_notes(config)
  if jax.process_index() == 0:
    if notes and verbose:
      print('config derived: ' + '; '.join(notes), flush=True)
    for warning in warnings:   # once: resolving again finds nothing to change
      print(f'config warning: {warning}', file=sys.stderr, flush=True)
  return config


def _need(field: str, what: str) -> ConfigError:
  return ConfigError(f'{field} is 0 (read from the data) but {what}; set --config.{field}')


def _dataset(ds: ConfigDict, facts, notes: list) -> None:
  where = facts.where if facts else 'the config'
  total = facts.num_classes if facts else 0
  if ds.ood_fraction:
    if not (total or ds.num_classes):
      raise _need('dataset.num_classes', 'no data is read here (ood_fraction needs it)')
    split_classes(ds, total or ds.num_classes)
    notes.append(f'held-out classes {len(ds.ood_classes)} of {ds.num_classes + len(ds.ood_classes)}')
  kept = len(ds.classes) if ds.classes else total
  if ds.classes and total and max(ds.classes) >= total:
    raise ConfigError(f'dataset.classes holds class id {max(ds.classes)}, but {where} has '
                      f'{total} classes (ids 0..{total - 1})')
  if not ds.num_classes:
    if not kept:
      raise _need('dataset.num_classes', f'{where} does not say how many classes it has')
    ds.num_classes = kept
    notes.append(f'num_classes {kept}')
  elif kept and ds.num_classes != kept:
    what = f'{len(ds.classes)} classes in dataset.classes' if ds.classes else (
        f'{where} has {kept} classes')
    raise ConfigError(f'dataset.num_classes = {ds.num_classes} but {what}: set '
                      f'--config.dataset.num_classes={kept} (or 0 to read it from the data)')
  if facts is None:
    if not ds.channels:
      raise _need('dataset.channels', 'no data is read here')
    return
  for split_field in ('train_split', 'eval_split'):
    split = ds[split_field]
    if facts.splits and split.split('[')[0] not in facts.splits:
      raise ConfigError(
          f'split {split!r} (dataset.{split_field}) is not in {where}, which has '
          f'{sorted(facts.splits)}: set --config.dataset.{split_field}=<one of them>, or '
          're-prepare with --holdout_split=' + split + ' --holdout_fraction=0.1 to hold one out')
  if not ds.channels:
    if not facts.channels:
      raise _need('dataset.channels', f'{where} does not say')
    ds.channels = facts.channels
    notes.append(f'channels {ds.channels}')
  if not ds.image_size and facts.image_size:
    h, w = facts.image_size
    if h == w:
      ds.image_size = int(h)
      notes.append(f'stored size {h}px')


def _train_examples(config: ConfigDict, facts) -> int:
  """Examples of the train split that training reads (only `dataset.classes` when set)."""
  ds = config.dataset
  split = ds.train_split
  counts = facts.class_counts.get(split) if facts else None
  if ds.classes and counts and not ds.multi_label:
    return int(sum(counts[k] for k in ds.classes))
  if not ds.classes and facts and split in facts.splits:
    return int(facts.splits[split])
  if facts is None:
    raise _need('dataset.train_examples', 'no data is read here (train.*epochs need it)')
  from input_pipeline.sources import build_source
  return len(build_source(ds, split, config.seed, train=False)[0])


def _normalisation(config: ConfigDict, facts, notes: list) -> None:
  c, ds = config.input, config.dataset
  if not c.mean or not c.std:
    stats = (facts.pixel_stats.get(str(ds.channels)) if facts else None) or {}
    if not c.mean:
      c.mean = tuple(stats.get('mean', (0.5,)))
    if not c.std:
      c.std = tuple(stats.get('std', (0.5,)))
    stale = ds.name == 'arrayrecord' and facts is not None
    notes.append('mean/std ' + ('of the data' if stats else '0.5' + (
        ' (metadata.json has no pixel statistics: re-prepare the data to record them)'
        if stale else '')))
  for field in ('mean', 'std'):
    values = c[field]
    if len(values) not in (1, ds.channels):
      raise ConfigError(
          f'input.{field} has {len(values)} values but images have {ds.channels} channel(s) '
          f'(dataset.channels): give 1 or {ds.channels} values, e.g. --config.input.{field}='
          f'"({", ".join(["0.5"] * ds.channels)},)", or () for the data\'s own statistics')
  if min(c.std) <= 0:
    raise ConfigError(f'input.std must be > 0, got {tuple(c.std)}')
  if facts is not None and facts.image_size is None and not c.image_size:
    raise ConfigError(f'{facts.where} holds images of several sizes and input.image_size = 0 '
                      '(keep the stored size): set --config.input.image_size=N to resize them '
                      'all to N x N')


AUGMENTATIONS = {'none': 'no augmentation', 'flip': 'random horizontal flip',
                 'cifar': 'pad 4 + random crop + random horizontal flip',
                 'inception': 'random-resized crop + random horizontal flip'}


def _input_notes(config: ConfigDict) -> list:
  """What the input pipeline does to training and eval images: the augmentation (a flip
  changes the meaning of handwriting, say) and any resize."""
  c, ds = config.input, config.dataset
  notes = [f'train augmentation {c.train_augment} '
           f'({AUGMENTATIONS.get(c.train_augment, "unknown")}; input.train_augment)']
  if c.image_size and c.image_size != ds.image_size:
    stored = f'from the stored {ds.image_size}px ' if ds.image_size else ''
    crop = ', eval images center-cropped first' if c.eval_preprocess == 'center_crop' else ''
    notes.append(f'images resized {stored}to {c.image_size} x {c.image_size}{crop} '
                 '(input.image_size)')
  return notes


def _steps(epochs: float, per_epoch: float) -> int:
  return max(1, round(epochs * per_epoch))


def _schedule(config: ConfigDict, facts, notes: list, warnings: list) -> None:
  t, o, ds = config.train, config.optimizer, config.dataset
  uses_epochs = ((not t.num_steps and t.epochs) or (not t.eval_every and t.eval_every_epochs)
                 or (not t.checkpoint_every and t.checkpoint_every_epochs) or o.warmup_epochs)
  if uses_epochs:
    if not ds.train_examples:
      ds.train_examples = _train_examples(config, facts)
    per_epoch = max(1, ds.train_examples // config.input.batch_size)   # whole batches
  if not t.num_steps:
    if not t.epochs:
      raise ConfigError('train.num_steps and train.epochs are both 0: set one, e.g. '
                        '--config.train.epochs=10')
    t.num_steps = _steps(t.epochs, per_epoch)
    notes.append(f'num_steps {t.num_steps} ({t.epochs:g} epochs of {ds.train_examples} '
                 f'examples at batch {config.input.batch_size})')
  if not t.eval_every and t.eval_every_epochs:
    t.eval_every = min(_steps(t.eval_every_epochs, per_epoch), t.num_steps)
    notes.append(f'eval_every {t.eval_every}')
  if not t.checkpoint_every:
    t.checkpoint_every = (min(_steps(t.checkpoint_every_epochs, per_epoch), t.num_steps)
                          if t.checkpoint_every_epochs else t.num_steps)
    notes.append(f'checkpoint_every {t.checkpoint_every}')
  derived = len(notes) or o.warmup_epochs or o.lr_batch_size
  if o.warmup_epochs:
    warmup = _steps(o.warmup_epochs, per_epoch)
    o.warmup_steps = min(o.warmup_steps, warmup) if o.warmup_steps else warmup
    o.warmup_epochs = 0.0   # done: warmup_steps is the record
  if o.warmup_steps >= t.num_steps:   # all warmup: the run would end at the peak rate
    cut = t.num_steps // 10
    warnings.append(
        f'optimizer.warmup_steps {o.warmup_steps} >= train.num_steps {t.num_steps}: the whole '
        f'run would be warmup and end at the peak learning rate; cut to {cut} (a tenth of the '
        f'run). Set --config.optimizer.warmup_steps=N with N < {t.num_steps} to choose.')
    o.warmup_steps = cut
  if o.lr_batch_size:
    rate = o.learning_rate * config.input.batch_size / o.lr_batch_size
    notes.append(f'learning_rate {rate:g} ({o.learning_rate:g} per {o.lr_batch_size} images '
                 f'at batch {config.input.batch_size})')
    o.learning_rate, o.lr_batch_size = rate, 0
  if derived or warnings:   # the schedule as the optimizer will run it
    from training.optimizer import describe_schedule
    notes.append(describe_schedule(o, t.num_steps))


def _modules(config: ConfigDict, notes: list) -> None:
  from backbones.registry import build_backbone
  from heads.registry import head_class, resolve_head_kwargs
  m = config.model
  kwargs = m.head_kwargs.to_dict()
  try:
    resolved = resolve_head_kwargs(m.head, config.dataset.num_classes, kwargs)
  except ValueError as e:   # a head's own check (e.g. an LLC codebook of the wrong shape)
    raise ConfigError(f'model.head_kwargs: {e}') from None
  for key, value in resolved.items():
    if kwargs.get(key) != value:
      m.head_kwargs[key] = value
      notes.append(f'head {key} {value}')
  try:
    build_backbone(m.backbone, **m.backbone_kwargs.to_dict())
  except TypeError as e:
    takes = sorted(f.name for f in dataclasses.fields(build_backbone(m.backbone))
                   if f.name not in ('parent', 'name'))
    raise _foreign_kwargs('backbone', m.backbone, f'{e}; it takes {", ".join(takes)}') from None
  cls = head_class(m.head)
  if dataclasses.is_dataclass(cls) and not hasattr(cls, 'from_dataset'):
    unknown = sorted(set(resolved) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise _foreign_kwargs('head', m.head, f'{cls.__name__} takes no {", ".join(unknown)}')


def _foreign_kwargs(what: str, name: str, why: str) -> ConfigError:
  return ConfigError(f'model.{what}_kwargs do not fit model.{what}={name!r} ({why}): they came '
                     f'with the config\'s own {what}; use a config built for {name!r}, or keep '
                     f'its {what}')
