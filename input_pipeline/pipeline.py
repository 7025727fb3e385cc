"""grain pipelines for training and evaluation, and the device stage that assembles global
arrays from each process's share. Training reads with one of two readers (`choose_reader`,
config `input.reader`):

* global (`TrainBatches`): seeded global shuffle -> repeat -> per-process slice -> augment ->
  batch. Training data is a pure function of (seed, epoch, index): `random_map` seeds each
  element's rng from its position in the repeated, shuffled dataset, batches are built before
  grain hands them to worker processes (so the worker count changes nothing), and the
  iterator state (checkpointed with the model) is the number of examples consumed, so a run
  resumes exactly with any worker count or batch size. Each process (and worker) reads
  records of every shard, so it ends up with every shard open: right for small datasets.
* sharded (`ShardedBatches`, for datasets too large for that): each process reads only its
  own shards, each stream of it interleaves a few shards and shuffles within a window, so
  memory and start-up are O(shards) + O(open shards), whatever the record count.
"""
import concurrent.futures
import dataclasses
import functools
import json
import math
from typing import Any, Callable, Iterator

from absl import logging
import grain
import jax
import numpy as np

from input_pipeline.sources import records_of


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


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(this process's index, process count): the arguments, else jax's (tests simulate several
  processes in one by passing them)."""
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _per_process(global_batch: int, count: int | None = None) -> int:
  count = jax.process_count() if count is None else count
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
  if ShardedBatches.STATE_KEY in state:
    raise ValueError(
        "this checkpoint's data position was written by the sharded reader, but the config "
        "now reads with the global one: set --config.input.reader=sharded to continue exactly "
        "(see input_pipeline.pipeline.choose_reader)")
  raise ValueError(f'unrecognised training data-iterator state {state!r}: expected '
                   f'{{{TrainBatches.STATE_KEY!r}: examples consumed}}')


class _Reopenable(grain.DatasetIterator):
  """A batch iterator over an inner grain iterator that `_open` builds at the first use (or
  after `set_state`) and `_drop` closes: the lifecycle both training readers share."""

  def __init__(self):
    super().__init__()
    self._inner = None

  def _open(self) -> None:
    raise NotImplementedError

  def _drop(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def start_prefetch(self) -> None:
    if self._inner is None:
      self._open()
    self._inner.start_prefetch()

  def close(self) -> None:
    self._drop()


class TrainBatches(_Reopenable):
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

  def _open(self) -> None:
    batches = self._examples[self._next:].batch(self._batch, drop_remainder=True)
    self._inner = iter(_finish(batches, self._num_workers))

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


def train_dataset(source: Any, *, global_batch: int, seed: int, augment: str,
                  image_size: int, channels: int, shuffle: bool = True,
                  num_workers: int = 0, text_input: Any = None, reader: str = 'global',
                  sharded_above: int = 1_000_000, streams: int = 0, cycle_length: int = 16,
                  window: int = 1024, process_index: int | None = None,
                  process_count: int | None = None) -> 'TrainBatches | ShardedBatches':
  """Endless training batches of this process: {'image' uint8, 'label' int32, 'mask'}, and
  'text' [B, *text_input.shape] (each example's own text as its head reads it) when
  `text_input` is given (`preprocess`).

  `reader` ('auto' | 'global' | 'sharded', config `input.reader`) picks how (`choose_reader`;
  process 0 prints which and why, for a prepared dataset); `sharded_above`, `streams`,
  `cycle_length` and `window` are the config's `input.sharded_above`, `input.shard_streams`,
  `input.shards_interleaved` and `input.shuffle_window` (`ShardedBatches`). `process_index` and
  `process_count` default to jax's. With the global reader this process's stream is example i of
  the seeded, per-epoch reshuffled, repeated source at positions process_index, process_index +
  process_count, ...; each example is augmented with an rng seeded by its position in that stream,
  so batches are a pure function of (seed, position) whatever `num_workers`.
  """
  index, count = _processes(process_index, process_count)
  kind, why = choose_reader(source, reader, sharded_above)
  if index == 0 and records_of(source) is not None:   # a choice only for prepared data
    print(f'training input: the {kind} reader ({why})', flush=True)
  preprocess_args = dict(augment=augment, image_size=image_size, channels=channels,
                         text_input=text_input)
  if kind == 'sharded':
    return ShardedBatches(source, batch=_per_process(global_batch, count), seed=seed,
                          shuffle=shuffle, num_workers=num_workers, streams=streams,
                          cycle_length=cycle_length, window=window, process_index=index,
                          process_count=count, **preprocess_args)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  ds = ds[index::count]
  ds = ds.random_map(TrainPreprocess(**preprocess_args), seed=seed)
  return TrainBatches(ds, _per_process(global_batch, count), num_workers)


READERS = ('auto', 'global', 'sharded')


def choose_reader(source: Any, reader: str = 'auto',
                  sharded_above: int = 1_000_000) -> tuple[str, str]:
  """('global' | 'sharded', why) for training on `source` with config `input.reader`.

  'global' and 'sharded' are taken as asked ('sharded' needs a prepared ArrayRecord split
  read record by record: ValueError otherwise); 'auto' takes the sharded reader for such a
  split of more than `sharded_above` records, where the global reader's every-shard-open
  index and exact global shuffle start to cost memory (~8 bytes per record per process and
  grain worker, plus Python objects per shard) and start-up, and the global one below, where
  an exact global shuffle is cheap and the batches do not depend on the worker count.
  """
  if reader not in READERS:
    raise ValueError(f'input.reader must be one of {READERS}, got {reader!r}')
  records = records_of(source)
  if reader == 'global':
    return 'global', "input.reader='global'"
  if records is None:
    why = ('the train split is not a prepared ArrayRecord dataset read record by record '
           '(in-memory, tfds or synthetic data, or a dataset.classes subset)')
    if reader == 'sharded':
      raise ValueError(f"input.reader='sharded' reads a prepared dataset shard by shard, but "
                       f"{why}: set input.reader='auto' or 'global'")
    return 'global', why
  if reader == 'sharded':
    return 'sharded', "input.reader='sharded'"
  if len(records) > sharded_above:
    return 'sharded', (f'{len(records):,} train records > input.sharded_above = '
                       f'{sharded_above:,}: each process reads only its own shards')
  return 'global', (f'{len(records):,} train records <= input.sharded_above = '
                    f'{sharded_above:,}: an exact global shuffle is cheap')


def _seed(*keys: int) -> int:
  """A 32-bit seed (what grain's shuffles take) from integer keys."""
  return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _Visit(grain.transforms.MapWithIndex):
  """Shard id -> (visit index v, shard id): v numbers the shard visits of all epochs."""

  def map_with_index(self, v: int, shard: int) -> tuple[int, int]:
    return int(v), int(shard)


@dataclasses.dataclass(frozen=True)
class _ReadExample(grain.transforms.Map):
  """Record j of shard visit v -> the source's element (`offset` + j) with its augmentation
  key (v, j)."""
  source: Any
  offset: int
  visit: int

  def map(self, j: int) -> dict:
    example = dict(self.source[self.offset + int(j)])
    example['_key'] = (self.visit, int(j))
    return example


class _HeldShard(grain.IterDataset):
  """One visit's examples; holds the shard open (`RecordSource.hold`) from the first read to
  the end of the visit, then releases it, so a reader keeps open only what it reads."""

  def __init__(self, parent: grain.MapDataset, records: Any, shard: int):
    super().__init__()
    self._examples, self._records, self._shard = parent, records, shard

  def __iter__(self) -> grain.DatasetIterator:
    return _HeldShardIterator(
        self._examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        .__iter__(), self._records, self._shard)


class _HeldShardIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, records: Any, shard: int):
    super().__init__(parent)
    self._records, self._shard, self._held = records, shard, False

  def __next__(self) -> dict:
    if not self._held:
      self._records.hold(self._shard)
      self._held = True
    try:
      return next(self._parent)
    except StopIteration:
      self._drop()
      raise

  def _drop(self) -> None:
    if self._held:
      self._held = False
      self._records.release(self._shard)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    self._drop()
    self._parent.close()


@dataclasses.dataclass(frozen=True)
class _ShardExamples(grain.transforms.Map):
  """Shard visit (v, s) -> an IterDataset of shard s's examples, in a seeded order unique to
  the visit when shuffling."""
  source: Any
  shuffle: bool
  seed: int

  def map(self, visit: tuple[int, int]) -> grain.IterDataset:
    v, shard = visit
    records = records_of(self.source)
    ds = grain.MapDataset.range(int(records.shard_lengths[shard]))
    if self.shuffle:
      ds = ds.shuffle(seed=_seed(self.seed, v))
    ds = ds.map(_ReadExample(self.source, records.shard_offset(shard), v))
    return _HeldShard(ds, records, shard)


@functools.lru_cache(maxsize=1)
def _preprocess_pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix='preprocess')


@dataclasses.dataclass(frozen=True)
class _PreprocessBatch(grain.transforms.Map):
  """A list of examples -> their batch, each decoded and augmented (`preprocess`, in 4
  threads) with an rng seeded by (seed, visit, record in shard): a pure function of the seed
  and the example's place in the shard-visit stream."""
  seed: int
  augment: str
  image_size: int
  channels: int
  text_input: Any = None

  def _one(self, example: dict) -> dict:
    rng = np.random.default_rng([self.seed, *example.pop('_key')])
    return preprocess(example, rng, augment=self.augment, image_size=self.image_size,
                      channels=self.channels, text_input=self.text_input)

  def map(self, examples: list) -> dict:
    done = list(_preprocess_pool().map(self._one, examples))
    return {k: np.stack([d[k] for d in done]) for k in done[0]}


_STREAM_TAG = '_stream_state'


class _Stream(grain.IterDataset):
  """Stream `index`'s batches, each tagged with (index, the stream's state after it) so the
  process that consumes it knows where every stream is; starts from `state` when given."""

  def __init__(self, parent: grain.IterDataset, index: int, state: dict | None):
    super().__init__(parent)
    self._index, self._state = index, state

  def __iter__(self) -> grain.DatasetIterator:
    return _StreamIterator(self._parent.__iter__(), self._index, self._state)


class _StreamIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, index: int, state: dict | None):
    super().__init__(parent)
    self._index = index
    if state is not None:
      parent.set_state(state)

  def __next__(self) -> dict:
    batch = next(self._parent)
    batch[_STREAM_TAG] = json.dumps([self._index, self._parent.get_state()])
    return batch

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


class ShardedBatches(_Reopenable):
  """Endless training batches of this process that read only its own shards.

  Shard visits: the seeded, per-epoch reshuffled, endless sequence of the split's shards (epoch e's
  permutation at visits e S .. (e + 1) S - 1, S shards). Process p of P has `streams` K independent
  streams; stream k reads visits p + P k, p + P (k + K), ... (so every shard of every epoch goes to
  exactly one stream of one process), interleaving `cycle_length` of them at a time
  (`grain.experimental.InterleaveIterDataset`, reading up to 64 records ahead in each; each visit's
  records in a seeded order of its own), shuffles the examples within windows of `window`
  (`grain.experimental.WindowShuffleIterDataset`) and batches them; batch b of the process comes
  from stream b mod K. An example is augmented with an rng seeded by (seed, visit, record in
  shard). Grain's `mp_prefetch` worker w of W runs streams w, w + W, ...; a W that does not divide
  K runs on the largest divisor of K below it (said in the log), so the batches are the same for
  any worker count. A stream opens a shard at its visit's first read and closes it at the visit's
  end: a process holds about K (cycle_length + 1) shards open, never one it does not read. Memory
  and start-up: O(shards) + the open shards + K windows of raw records, whatever the record count.

  State (checkpointed with the model): {'sharded_next_batch': batches consumed, 'streams': [each
  stream's grain iterator state after its last consumed batch]}; a resume continues at the same
  example of every stream, exactly, for any batch size and worker count. `streams` 0 means max(1,
  num_workers) for a new run and the saved K for a resume; a resume whose config sets another K
  raises ValueError saying which K to set. A resume with another process count stops in
  `training.checkpointing` (no data position for the new processes).
  """
  STATE_KEY = 'sharded_next_batch'

  def __init__(self, source: Any, *, batch: int, seed: int, shuffle: bool, num_workers: int,
               streams: int, cycle_length: int, window: int, process_index: int,
               process_count: int, augment: str, image_size: int, channels: int,
               text_input: Any = None):
    super().__init__()
    self._records = records_of(source)
    if self._records is None or not len(self._records):
      raise ValueError('the sharded reader needs a non-empty prepared ArrayRecord split')
    if cycle_length < 1 or window < 0 or streams < 0:
      raise ValueError(f'input.shards_interleaved ({cycle_length}) must be >= 1, '
                       f'input.shuffle_window ({window}) and input.shard_streams ({streams}) '
                       '>= 0')
    self._source, self._batch, self._seed, self._shuffle = source, batch, seed, shuffle
    self._cycle, self._window, self._workers = cycle_length, window, num_workers
    self._p, self._num_p = process_index, process_count
    self._preprocess = _PreprocessBatch(seed, augment, image_size, channels, text_input)
    self._auto_streams = streams == 0
    self._set_streams(streams or max(1, num_workers))
    self._next, self._states = 0, [None] * self._k
    self._records.close()   # shards earlier reads opened (the label probe of `build_source`)

  def _set_streams(self, k: int) -> None:
    self._k = k
    self._used_workers = _largest_divisor(k, self._workers) if self._workers else 0
    if self._used_workers != self._workers:
      logging.warning('sharded reader: %d streams run on %d of the %d input.num_workers (a '
                      'divisor of the stream count, so batches stay as with any other)',
                      k, self._used_workers, self._workers)

  def _stream(self, k: int) -> grain.IterDataset:
    visits = grain.MapDataset.range(len(self._records.shard_lengths))
    if self._shuffle:
      visits = visits.shuffle(seed=self._seed)
    step = self._num_p * self._k
    visits = visits.repeat(None).map_with_index(_Visit())[self._p + self._num_p * k::step]
    ds = grain.experimental.InterleaveIterDataset(
        visits.map(_ShardExamples(self._source, self._shuffle, self._seed)),
        cycle_length=self._cycle, iter_buffer_size=64)
    if self._shuffle and self._window > 1:
      ds = grain.experimental.WindowShuffleIterDataset(
          ds, window_size=self._window, seed=_seed(self._seed, self._p, k))
    ds = ds.batch(self._batch, drop_remainder=True, batch_fn=list).map(self._preprocess)
    return _Stream(ds, k, self._states[k])

  def _open(self) -> None:
    first = self._next % self._k   # batch n comes from stream n mod K: start the cycle there
    order = [(first + i) % self._k for i in range(self._k)]
    ds = grain.experimental.InterleaveIterDataset([self._stream(k) for k in order],
                                                  cycle_length=self._k)
    if self._used_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._used_workers))
    self._inner = iter(ds)

  def _drop(self) -> None:
    super()._drop()
    self._records.close()

  def __next__(self) -> dict:
    if self._inner is None:
      self._open()
    batch = next(self._inner)
    k, state = json.loads(batch.pop(_STREAM_TAG))
    self._states[k] = state
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {self.STATE_KEY: self._next, 'streams': list(self._states)}

  def set_state(self, state: dict) -> None:
    if self.STATE_KEY not in state:
      raise ValueError(
          "this checkpoint's data position was written by the global reader, but the config "
          "now reads with the sharded one: set --config.input.reader=global to continue "
          'exactly (see input_pipeline.pipeline.choose_reader)')
    saved = len(state['streams'])
    if saved != self._k:
      if not self._auto_streams:
        raise ValueError(
            f"this checkpoint's data position has {saved} sharded-reader streams, the config "
            f'asks for input.shard_streams = {self._k}: set --config.input.shard_streams='
            f'{saved} to continue exactly (any input.num_workers dividing it keeps the '
            'batches)')
      self._set_streams(saved)
    self._drop()
    self._next, self._states = int(state[self.STATE_KEY]), list(state['streams'])


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
