"""What train and eval both need from a config: mesh, model, optimizer, state layout, eval data."""
import dataclasses
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from training.resolve import resolve
from input_pipeline.pipeline import eval_dataset, preprocess
from input_pipeline.sources import DatasetInfo, Subset, build_source
from training.mesh import batch_sharding, build_mesh
from training.model import build_model
from training.optimizer import build_optimizer, build_schedule
from training.state import TrainState, abstract_params, state_shardings


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
  eval_source: Any
  info: DatasetInfo

  @classmethod
  def build(cls, config: ml_collections.ConfigDict,
            devices: Optional[Sequence[jax.Device]] = None, *,
            with_data: bool = True) -> 'Experiment':
    """Mesh (over `devices`, default all), model, optimizer, state layout and eval data.

    `with_data=False` (ahead-of-time compilation) opens no dataset when the config fixes the
    image shape (`config_image_shape`); `eval_source` and `info` are then None. `config` is
    resolved first, in place (`training.resolve`: values derived from the data and the final
    fields, checked against the data).
    """
    resolve(config, with_data=with_data or config_image_shape(config) is None)
    mesh = build_mesh(config.mesh.axes, config.mesh.shape, devices)
    for name, size in (('input.batch_size', config.input.batch_size),
                       ('input.eval_batch_size', config.input.eval_batch_size)):
      if size % mesh.shape['data']:
        raise ValueError(f'{name}={size} is not divisible by the data axis ({mesh.shape["data"]})')
    source = info = None
    image_shape = None if with_data else config_image_shape(config)
    if image_shape is None:
      source, info = build_source(config.dataset, config.dataset.eval_split, config.seed,
                                  train=False)
      if config.eval.max_examples:
        source = Subset(source, config.eval.max_examples)
      first = preprocess(source[0], None, eval_mode=config.input.eval_preprocess,
                         image_size=config.input.image_size, channels=config.dataset.channels)
      image_shape = tuple(np.shape(first['image']))
    model = build_model(config)
    tx = build_optimizer(config.optimizer, config.train.num_steps,
                         abstract_params(model, image_shape))
    abstract, shardings = state_shardings(model, tx, image_shape, mesh)
    return cls(config, mesh, model, tx, build_schedule(config.optimizer, config.train.num_steps),
               image_shape, abstract, shardings, source, info)

  def abstract_batch(self) -> dict:
    """One global train batch as `to_global` assembles it, without data: ShapeDtypeStructs
    sharded over 'data' (`batch_sharding`). image uint8 [B, H, W, C], label int32 [B], mask
    float32 [B] (per example what `input_pipeline.pipeline.preprocess` emits; label int32
    [B, dataset.max_labels] for multi-label data), B =
    `input.batch_size`. The one place that knows the batch layout ahead of time."""
    b, sharding = self.config.input.batch_size, batch_sharding(self.mesh)
    ds = self.config.dataset
    label = (b, ds.max_labels) if ds.multi_label else (b,)
    shapes = {'image': ((b, *self.image_shape), np.uint8), 'label': (label, np.int32),
              'mask': ((b,), np.float32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in shapes.items()}

  def eval_dataset(self, source: Any = None):
    """One padded pass over the eval split (or over `source`, preprocessed the same way)."""
    c = self.config
    return eval_dataset(self.eval_source if source is None else source,
                        global_batch=c.input.eval_batch_size,
                        eval_mode=c.input.eval_preprocess, image_size=c.input.image_size,
                        channels=c.dataset.channels, num_workers=c.input.num_workers)[0]

  def abstract_restore_target(self) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings (restore target; AOT lowering)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)


def config_image_shape(config: ml_collections.ConfigDict) -> Optional[tuple]:
  """The model's input image shape (H, W, C) when the config alone fixes it, else None.

  Fixed when `input.image_size` and `dataset.channels` are set (the pipeline resizes / crops to
  that size and decodes to that many channels), or for the synthetic source (its stored size).
  Otherwise (bundled in-memory sources at their stored size) only the data can tell.
  """
  ds, size = config.dataset, config.input.image_size
  if size and ds.channels:
    return (size, size, ds.channels)
  if ds.name == 'synthetic':
    return (ds.image_size, ds.image_size, ds.channels)
  return None
