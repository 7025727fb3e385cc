"""grain pipelines: seeded global shuffle -> repeat -> per-process shard -> augment -> batch,
and the device stage that assembles global arrays from each process's share.

Training data is a pure function of (seed, epoch, index): `random_map` seeds each element's
rng from its position in the repeated, shuffled dataset, and the iterator state (checkpointed
with the model) says where to continue.
"""
import dataclasses
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np


def preprocess(element: dict, rng: np.random.Generator | None, *, augment: str = 'none',
               eval_mode: str = 'none', image_size: int = 0, channels: int = 0) -> dict:
  """Decodes (if needed), augments and resizes one element; the image comes out uint8 [H, W, C].

  augment: 'none' | 'flip' | 'cifar' (pad 4 + random crop + flip) | 'inception'
  (random-resized-crop + flip); eval_mode: 'none' | 'resize' | 'center_crop'.
  """
  from input_pipeline import image_ops
  image = element['image']
  encoded = isinstance(image, (bytes, bytearray))
  if augment == 'inception':
    if not image_size:
      raise ValueError("input.train_augment='inception' needs input.image_size")
    if encoded:  # decodes only what the crop needs (JPEG draft mode): a big win on photos
      image = image_ops.decode_and_random_crop(image, image_size, rng, channels=channels or 3)
    else:
      image = image_ops.random_resized_crop(image, image_size, rng)
  elif encoded:
    image = image_ops.decode(image, channels=channels or 3)
  if augment == 'cifar':
    image = image_ops.pad_random_crop(image, 4, rng)
  elif augment not in ('none', 'flip', 'inception'):
    raise ValueError(f'unknown input.train_augment {augment!r}')
  if augment in ('flip', 'cifar', 'inception'):
    image = image_ops.random_flip(image, rng)
  if eval_mode == 'center_crop':
    image = image_ops.center_crop_resize(image, image_size)
  elif eval_mode not in ('none', 'resize'):
    raise ValueError(f'unknown input.eval_preprocess {eval_mode!r}')
  elif image_size and image.shape[:2] != (image_size, image_size):
    image = image_ops.resize(image, image_size)
  return {'image': np.asarray(image, np.uint8), 'label': np.asarray(element['label'], np.int32),
          'mask': np.float32(element.get('mask', 1.0))}


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.transforms.RandomMap):
  augment: str
  image_size: int
  channels: int

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return preprocess(element, rng, augment=self.augment, image_size=self.image_size,
                      channels=self.channels)


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
  eval_mode: str
  image_size: int
  channels: int

  def map(self, element: dict) -> dict:
    out = preprocess(element, None, eval_mode=self.eval_mode, image_size=self.image_size,
                     channels=self.channels)
    out['index'] = np.int32(element['index'])
    return out


class PaddedSource:
  """Pads a source to `length` by repeating element 0 with mask 0, so eval batches are full;
  each element carries its position `index`."""

  def __init__(self, source: Any, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> dict:
    real = i < len(self._source)
    example = dict(self._source[i if real else 0])
    example['mask'] = 1.0 if real else 0.0
    example['index'] = i
    return example


def _per_process(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f'global batch {global_batch} is not divisible by {count} processes')
  return global_batch // count


def _finish(ds: grain.MapDataset, batch: int, num_workers: int) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=2 * batch))
  it = it.batch(batch, drop_remainder=True)
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def train_dataset(source: Any, *, global_batch: int, seed: int, augment: str,
                  image_size: int, channels: int, shuffle: bool = True,
                  num_workers: int = 0) -> grain.IterDataset:
  """Endless training batches of this process: {'image' uint8, 'label' int32, 'mask'}."""
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.random_map(TrainPreprocess(augment, image_size, channels), seed=seed)
  return _finish(ds, _per_process(global_batch), num_workers)


def eval_dataset(source: Any, *, global_batch: int, eval_mode: str, image_size: int,
                 channels: int, num_workers: int = 0) -> tuple[grain.IterDataset, int]:
  """One pass over `source`, padded to whole global batches; returns (dataset, num_batches).

  Global batch j holds examples [j * global_batch, (j + 1) * global_batch), in an order that
  depends on the process count (`index` gives each one's position); padding examples have
  mask 0, so every real example is counted exactly once on any number of processes.
  """
  num_batches = max(1, math.ceil(len(source) / global_batch))
  ds = grain.MapDataset.source(PaddedSource(source, num_batches * global_batch))
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.map(EvalPreprocess(eval_mode, image_size, channels))
  return _finish(ds, _per_process(global_batch), num_workers), num_batches


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Assembles each process's local batch into one global array, sharded over the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def device_batches(iterator: Iterator[dict], sharding: jax.sharding.Sharding) -> Iterator[dict]:
  for batch in iterator:
    yield to_global(batch, sharding)
