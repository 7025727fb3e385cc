"""What train and eval both need from a config: mesh, model, optimizer, state layout, and the
data sources (built on first use: building and compiling a model reads no data)."""
import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from training.resolve import ConfigError, resolve
from input_pipeline.pipeline import eval_dataset, preprocess
from input_pipeline.sources import DatasetInfo, RemappedLabels, Subset, build_source
from training.mesh import (batch_sharding, batch_size_multiple, build_mesh,
                           feature_sharding)
from training.model import build_model
from training.optimizer import build_optimizer, build_schedule
from training.progress import Reported
from training.checkpointing import ClassLayout
from training.state import TrainState, abstract_params, class_axes, state_shardings
from training.workdir import check_classes


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  image_shape: tuple
  abstract_state: TrainState
  shardings: TrainState
  class_map: Optional[np.ndarray] = None   # data class id -> model class id (`match_classes`)

  @classmethod
  def build(cls, config: ml_collections.ConfigDict,
            devices: Optional[Sequence[jax.Device]] = None, *,
            with_data: bool = True) -> 'Experiment':
    """Mesh (over `devices`, default all), model, optimizer and state layout; no data is read
    beyond what `resolve` reads (the image shape comes from the config: `config_image_shape`).

    `config` is resolved first, in place (`training.resolve`: values derived from the data
    and the final fields, checked against the data); with `with_data=False` (ahead-of-time
    compilation, a model built without its data) it opens no dataset when the config alone
    fixes the image shape. Raises ConfigError when the image shape is still unknown (images
    of several or non-square sizes, no `input.image_size`), when the mesh does not fit the
    devices or a batch size does not divide over them.
    """
    resolve(config, with_data=with_data or config_image_shape(config) is None)
    image_shape = config_image_shape(config) or (with_data and first_eval_image_shape(config))
    if not image_shape:
      raise ConfigError('the image shape is unknown (stored images of several or non-square '
                        'sizes): set --config.input.image_size=N to resize them to N x N')
    try:
      mesh = build_mesh(config.mesh.axes, config.mesh.shape, devices, config.mesh.dcn_shape)
    except ValueError as e:   # a mesh the devices do not fill: the config's, one line
      raise ConfigError(f'{e}: set --config.mesh.shape (and mesh.axes) to fit the devices; '
                        'one entry of mesh.shape may be -1, all remaining devices') from None
    multiple = batch_size_multiple(mesh)
    for name, size in (('input.batch_size', config.input.batch_size),
                       ('input.eval_batch_size', config.input.eval_batch_size)):
      if size % multiple:
        raise ConfigError(f'{name}={size} is not divisible by the {multiple} devices of mesh '
                          f'{dict(mesh.shape)} (the batch splits over all of them): use a '
                          f'multiple of {multiple}')
    model = build_model(config, class_multiple=class_multiple(config, mesh),
                        feature_sharding=feature_sharding(mesh),
                        batch_sharding=batch_sharding(mesh))
    tx = build_optimizer(config.optimizer, config.train.num_steps,
                         abstract_params(model, image_shape))
    abstract, shardings = state_shardings(model, tx, image_shape, mesh, config.sharding.rules)
    return cls(config, mesh, model, tx, build_schedule(config.optimizer, config.train.num_steps),
               image_shape, abstract, shardings)

  # ----- Data: both sources, built from the config on first use (FileNotFoundError, saying
  # how to prepare it, when the data is not there).
  @functools.cached_property
  def train_source(self) -> Any:
    """The train split as training reads it (`build_source(train=True)`: class subset, label
    noise)."""
    c = self.config
    return self._remapped(build_source(c.dataset, c.dataset.train_split, c.seed, train=True)[0])

  @functools.cached_property
  def _eval_split(self) -> tuple[Any, DatasetInfo]:
    c = self.config
    source, info = build_source(c.dataset, c.dataset.eval_split, c.seed, train=False)
    if self.class_map is not None:   # the names in the model's id order
      names = np.empty(len(self.class_map), object)
      names[self.class_map] = info.class_names
      info = dataclasses.replace(info, class_names=tuple(names))
    source = self._remapped(source)
    return (Subset(source, c.eval.max_examples) if c.eval.max_examples else source), info

  def _remapped(self, source: Any) -> Any:
    return source if self.class_map is None else RemappedLabels(source, self.class_map)

  def match_classes(self, workdir: str) -> None:
    """Checks the data's class list (names and order) against the one recorded with the model
    of `workdir` (`training.workdir.check_classes`: ClassListError naming what differs); when
    only the order differs, both splits are relabelled to the model's class ids from here on."""
    self.class_map = check_classes(workdir, self.info.class_names)
    if self.class_map is not None:
      for cached in ('train_source', '_eval_split'):   # rebuilt, relabelled, on next use
        self.__dict__.pop(cached, None)

  @property
  def eval_source(self) -> Any:
    """The eval split (its first `eval.max_examples` when set)."""
    return self._eval_split[0]

  @property
  def info(self) -> DatasetInfo:
    """Class count and names of the data."""
    return self._eval_split[1]

  def abstract_batch(self) -> dict:
    """One global train batch as `to_global` assembles it, without data: ShapeDtypeStructs
    sharded over 'data' (`batch_sharding`). image uint8 [B, H, W, C], label int32 [B], mask
    float32 [B] (per example what `input_pipeline.pipeline.preprocess` emits; label int32
    [B, dataset.max_labels] for multi-label data), and 'text' [B, *shape] when the head reads
    each example's own text (`text_input`), B = `input.batch_size`. The one place that knows
    the batch layout ahead of time."""
    b, sharding = self.config.input.batch_size, batch_sharding(self.mesh)
    ds = self.config.dataset
    label = (b, ds.max_labels) if ds.multi_label else (b,)
    shapes = {'image': ((b, *self.image_shape), np.uint8), 'label': (label, np.int32),
              'mask': ((b,), np.float32)}
    if self.text_input is not None:
      shapes['text'] = ((b, *self.text_input.shape), self.text_input.dtype)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in shapes.items()}

  @property
  def text_input(self) -> Any:
    """How training batches carry each example's own text to the head (`Head.text_input`:
    an `input_pipeline.captions.TextInput`), or None when the head reads none."""
    return self.model.head.text_input

  def eval_dataset(self, source: Any = None):
    """One padded pass over the eval split (or over `source`, preprocessed the same way),
    its progress reported (`training.progress`: a pass of more than 30 s is not silent)."""
    c = self.config
    dataset, num_batches = eval_dataset(
        self.eval_source if source is None else source, global_batch=c.input.eval_batch_size,
        eval_mode=c.input.eval_preprocess, image_size=c.input.image_size,
        channels=c.dataset.channels, num_workers=c.input.num_workers)
    return Reported(dataset, num_batches, 'eval' if source is None else 'features')

  @functools.cached_property
  def class_layout(self) -> ClassLayout:
    """The model's class dimensions and padding, for checkpoints (`ClassLayout`)."""
    head = self.model.head
    padded = head.padded_classes if head.pads_classes else head.num_classes
    return ClassLayout(class_axes(self.model, self.tx, self.image_shape), head.num_classes,
                       padded)

  def abstract_restore_target(self) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings (restore target; AOT lowering)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)


LANES = 128   # a TPU vreg's lanes: each device's share of a padded class dimension is a multiple


def class_multiple(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """What a `pads_classes` head pads K to a multiple of: `model.class_multiple` when set, else
  LANES x the 'model' axis when that is > 1 (so any K splits over it), else 1 (no padding)."""
  if config.model.class_multiple:
    return int(config.model.class_multiple)
  model_axis = mesh.shape.get('model', 1)
  return LANES * model_axis if model_axis > 1 else 1


def first_eval_image_shape(config: ml_collections.ConfigDict) -> tuple:
  """(H, W, C) of eval example 0 after eval preprocessing: the image shape of a source whose
  metadata does not fix it (a tfds image feature of shape (None, None, C)), read from the data."""
  source, _ = build_source(config.dataset, config.dataset.eval_split, config.seed, train=False)
  first = preprocess(source[0], None, eval_mode=config.input.eval_preprocess,
                     image_size=config.input.image_size, channels=config.dataset.channels)
  return tuple(np.shape(first['image']))


def config_image_shape(config: ml_collections.ConfigDict) -> Optional[tuple]:
  """The model's input image shape (H, W, C) from the config, or None when it does not fix it.

  The side is `input.image_size` (the pipeline resizes / crops to it), else
  `dataset.image_size` (the stored side of square images, which `resolve` reads from the
  data); the channels `dataset.channels` (decoded to that many).
  """
  side = config.input.image_size or config.dataset.image_size
  channels = config.dataset.channels
  return (side, side, channels) if side and channels else None
