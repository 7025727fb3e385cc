"""grain pipelines: seeded global shuffle -> repeat -> per-process shard -> augment -> batch,
and the device stage that assembles global arrays from each process's share.

Training data is a pure function of (seed, epoch, index): `random_map` seeds each element's
rng from its position in the repeated, shuffled dataset, batches are built before grain hands
them to worker processes (so the worker count changes nothing), and the iterator state
(checkpointed with the model) is the number of examples consumed, so a run resumes exactly
with any worker count or batch size.
"""
import dataclasses
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np


def preprocess(element: dict, rng: np.random.Generator | None, *, augment: str = 'none',
               eval_mode: str = 'none', image_size: int = 0, channels: int = 0,
               text_input: Any = None) -> dict:
  """Decodes (if needed), augments and resizes one element; the image comes out uint8 [H, W, C].

  augment: 'none' | 'flip' | 'cifar' (pad 4 + random crop + flip) | 'inception'
  (random-resized-crop + flip); eval_mode: 'none' | 'resize' | 'center_crop'. With
  `text_input` (`input_pipeline.captions.TextInput`: the head reads each example's own text)
  the element's 'text' comes out as `text_input(text)` (tokens or an embedding); without it
  a text is dropped. KeyError when `text_input` is given and the element has no text.
  """
  from input_pipeline import image_ops
  image = element['image']
  encoded = isinstance(image, (bytes, bytearray))
  if not encoded and np.asarray(image).dtype == np.uint16:  # decoded 16-bit (tfds arrays)
    image = image_ops.high_byte(image)                      # as `decode` does, never wrapped
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
  out = {'image': np.asarray(image, np.uint8), 'label': np.asarray(element['label'], np.int32),
         'mask': np.float32(element.get('mask', 1.0))}
  if text_input is not None:
    if 'text' not in element:
      raise KeyError("the head reads each example's own text, but this example has none (a "
                     'dataset without texts: prepare it from a labels file with a text column)')
    out['text'] = text_input(element['text'])
  return out


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.transforms.RandomMap):
  augment: str
  image_size: int
  channels: int
  text_input: Any = None

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return preprocess(element, rng, augment=self.augment, image_size=self.image_size,
                      channels=self.channels, text_input=self.text_input)


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


def _finish(batches: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  """Builds whole batches in 4 threads (up to 4 batches ahead), in this process or in each of
  `num_workers` mp_prefetch processes: worker w builds batches w, w + W, ... and grain
  interleaves them back in order, so the batches do not depend on the worker count (grain
  slices the dataset for its workers *after* all MapDataset transformations, so batching must
  be one of them)."""
  it = batches.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def _examples_consumed(state: dict) -> int:
  """This process's examples consumed, from a `TrainBatches` state or from the states of the
  grain iterators this module returned before (batched after `to_iter_dataset`): in-process
  {'next_index': examples}, or an mp_prefetch interleave state whose workers' `next_index`
  sum to the examples consumed (exact for 1 worker; with more, the old batches had been drawn
  in a worker-dependent order, so resuming there continues at the same count)."""
  if TrainBatches.STATE_KEY in state:
    return int(state[TrainBatches.STATE_KEY])
  if set(state) == {'next_index'}:
    return int(state['next_index'])
  if 'iterators_in_use_states' in state:
    return sum(int(s['next_index']) for s in state['iterators_in_use_states'] if s)
  raise ValueError(f'unrecognised training data-iterator state {state!r}: expected '
                   f'{{{TrainBatches.STATE_KEY!r}: examples consumed}}')


class TrainBatches(grain.DatasetIterator):
  """Endless training batches of this process, resumable for any batch size or worker count.

  Batch b holds examples [E + b * batch, E + (b + 1) * batch) of this process's endless
  stream (see `train_dataset`), where E is where `set_state` says to continue; batches are
  identical for any `num_workers` (see `_finish`). The state is {'next_example': n}, the
  number of this process's examples consumed: it means the same for any batch size or
  worker count, and states of the previous pipeline are converted (`_examples_consumed`).
  """
  STATE_KEY = 'next_example'

  def __init__(self, examples: grain.MapDataset, batch: int, num_workers: int):
    super().__init__()
    self._examples, self._batch, self._num_workers = examples, batch, num_workers
    self._next = 0
    self._inner = None

  def _open(self) -> None:
    batches = self._examples[self._next:].batch(self._batch, drop_remainder=True)
    self._inner = iter(_finish(batches, self._num_workers))

  def _drop(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def __next__(self) -> dict:
    if self._inner is None:
      self._open()
    batch = next(self._inner)
    self._next += self._batch
    return batch

  def get_state(self) -> dict:
    return {self.STATE_KEY: self._next}

  def set_state(self, state: dict) -> None:
    self._drop()
    self._next = _examples_consumed(state)

  def start_prefetch(self) -> None:
    if self._inner is None:
      self._open()
    self._inner.start_prefetch()

  def close(self) -> None:
    self._drop()


def train_dataset(source: Any, *, global_batch: int, seed: int, augment: str,
                  image_size: int, channels: int, shuffle: bool = True,
                  num_workers: int = 0, text_input: Any = None) -> TrainBatches:
  """Endless training batches of this process: {'image' uint8, 'label' int32, 'mask'}, and
  'text' [B, *text_input.shape] (each example's own text as its head reads it) when
  `text_input` is given (`preprocess`).

  This process's stream is example i of the seeded, per-epoch reshuffled, repeated source at
  positions process_index, process_index + process_count, ...; each example is augmented
  with an rng seeded by its position in that stream, so batches are a pure function of
  (seed, position) whatever `num_workers`.
  """
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.random_map(TrainPreprocess(augment, image_size, channels, text_input), seed=seed)
  return TrainBatches(ds, _per_process(global_batch), num_workers)


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
  ds = ds.batch(_per_process(global_batch), drop_remainder=True)
  return _finish(ds, num_workers), num_batches


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Assembles each process's local batch into one global array, sharded over the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def device_batches(iterator: Iterator[dict], sharding: jax.sharding.Sharding) -> Iterator[dict]:
  for batch in iterator:
    yield to_global(batch, sharding)
