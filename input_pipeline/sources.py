"""Random-access data sources by config name. Every element is {'image', 'label'}, plus
'text' (str, the image's own text) from a captioned prepared dataset (`records` version 3).

`image` is either a uint8 array [H, W, C] or encoded JPEG/PNG bytes (decoded later, inside the
grain workers); `label` is an int in [0, K), or, for a multi-label dataset
(`dataset.multi_label`), int32 [L]: the image's class ids followed by -1 padding up to
L = `dataset.max_labels` (an image with no label is all -1). `build_source` checks labels
against `dataset.num_classes` and stops with a `LabelError` naming the split and the bad
values. Sources are plain Python sequences, picklable, so grain can read them from worker
processes.
"""
import contextlib
import dataclasses
import functools
import os
import threading
from typing import Any, Sequence

import ml_collections
import numpy as np


class LabelError(ValueError):
  """A dataset's labels do not fit the config: out of range, unlabelled, too many per image."""


class EmptySplitError(ValueError):
  """A split, as the config selects it (class subset included), holds no examples."""


class ShardReadError(OSError):
  """A prepared dataset's shard file does not read (cut short, overwritten, unreadable)."""


def bad_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """The entries of `labels` (any shape; -1 padding of label sets excluded by the caller)
  outside [0, num_classes)."""
  labels = np.asarray(labels)
  return labels[(labels < 0) | (labels >= num_classes)]


def label_error(where: str, bad: np.ndarray, total: int, num_classes: int) -> LabelError:
  """The error for `bad` labels among `total` read from `where` (e.g. "split 'test'")."""
  values, counts = np.unique(bad, return_counts=True)
  shown = ', '.join(f'{v} (x{c})' for v, c in list(zip(values, counts))[:8])
  if np.all(values < 0):
    return LabelError(
        f'{where} is unlabelled: {len(bad)} of {total} labels read are negative ({shown}), as '
        'tfds marks a split without labels. It cannot be trained or evaluated on; use a '
        'labelled split (for example dataset.eval_split="train[:5%]" with '
        'dataset.train_split="train[5%:]").')
  return LabelError(
      f'{where}: {len(bad)} of {total} labels read are outside [0, {num_classes}) '
      f'(dataset.num_classes = {num_classes}): {shown}. Set dataset.num_classes to the '
      'dataset\'s class count, or re-prepare the data.')


class CheckedLabels:
  """Checks each element's label on read, and for label sets pads them to `max_labels`.

  The whole-split checks of `build_source` cover what can be read cheaply up front; this
  catches the rest (a large tfds split) at the first bad example, with its index.
  """

  def __init__(self, source: Any, num_classes: int, where: str, max_labels: int = 0):
    self._source, self._k, self._where, self._max = source, num_classes, where, max_labels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    example = dict(self._source[i])
    ids = np.atleast_1d(np.asarray(example['label'], np.int32))
    if not self._max and len(ids) != 1:
      raise LabelError(f'{self._where}, example {i}: {len(ids)} labels in a dataset used as '
                       'single-label; set dataset.multi_label=True and dataset.max_labels.')
    if self._max and len(ids) > self._max:
      raise LabelError(f'{self._where}, example {i}: {len(ids)} labels, more than '
                       f'dataset.max_labels = {self._max}; raise it.')
    bad = bad_labels(ids, self._k)
    if len(bad):
      raise label_error(f'{self._where}, example {i}', bad, len(ids), self._k)
    if self._max:
      padded = np.full(self._max, -1, np.int32)
      padded[:len(ids)] = ids
      example['label'] = padded
    else:
      example['label'] = int(ids[0])
    return example


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  class_names: tuple
  num_examples: int


@dataclasses.dataclass(frozen=True)
class DataFacts:
  """What a dataset says about itself, read without decoding it (`dataset_facts`).

  image_size: (h, w) when every stored image has it, None when sizes are mixed, () unknown.
  channels: what images decode to by default (1 when all are gray, else 3); 0 unknown.
  splits: split -> examples ({} unknown). class_counts: split -> [K] images per class ({}
  unknown). pixel_stats: {'1' | '3': {'mean': [..], 'std': [..]}} of the train split in [0, 1]
  ({} unknown).
  """
  where: str
  num_classes: int
  channels: int
  image_size: Any
  splits: dict
  class_counts: dict
  pixel_stats: dict


def default_channels(native: Sequence[int]) -> int:
  """Channels to decode to by default, given the stored images' channel counts: 1 when all
  are gray (with or without alpha), else 3."""
  return 1 if native and set(native) <= {1, 2} else 3


def dataset_facts(ds: ml_collections.ConfigDict) -> DataFacts:
  """The facts of the configured dataset: metadata.json of a prepared directory, tfds
  DatasetInfo, the bundled digits, or the config itself (synthetic). Raises FileNotFoundError
  (saying how to prepare it) when the data is not there."""
  where = f'{ds.name} dataset {ds.data_dir or ds.tfds_name or ds.name!r}'
  if ds.name == 'digits':
    (train_x, train_y), (_, test_y), names = _digits()
    counts = {s: np.bincount(y, minlength=len(names)).tolist()
              for s, y in (('train', train_y), ('test', test_y))}
    return DataFacts(where, len(names), 1, tuple(train_x.shape[1:3]),
                     {'train': len(train_y), 'test': len(test_y)}, counts, {})
  if ds.name == 'arrayrecord':
    meta = _read_metadata(ds)
    size = meta.get('image_size')
    native = meta.get('channels') or ([size[2]] if size else [])
    return DataFacts(f'prepared dataset {ds.data_dir!r}', int(meta['num_classes']),
                     default_channels(native) if native else 3,
                     tuple(size[:2]) if size else None,
                     {s: m['num_examples'] for s, m in meta['splits'].items()},
                     {s: m['class_counts'] for s, m in meta['splits'].items()
                      if 'class_counts' in m}, meta.get('pixel_stats') or {})
  if ds.name == 'tfds':
    return _tfds_facts(ds, where)
  if ds.name == 'synthetic':
    n = ds.num_examples or 4 * ds.num_classes
    return DataFacts(where, ds.num_classes, ds.channels, (ds.image_size, ds.image_size),
                     {ds.train_split: n, ds.eval_split: n}, {}, {})
  raise ValueError(f"unknown dataset.name {ds.name!r}: use digits, arrayrecord, tfds or synthetic")


def _tfds_facts(ds: ml_collections.ConfigDict, where: str) -> DataFacts:
  import tensorflow_datasets as tfds
  try:
    info = tfds.builder(ds.tfds_name, data_dir=ds.data_dir or None).info
  except Exception as e:  # tfds raises several types for a dataset that is not on disk
    raise FileNotFoundError(f'tfds dataset {ds.tfds_name!r} is not prepared under '
                            f'{ds.data_dir or "the default TFDS data dir"}: {e}\n'
                            f'{ds.setup_hint or ""}'.strip()) from e
  label = info.features['label'] if 'label' in info.features else None
  label = getattr(label, 'feature', label)
  shape = tuple(info.features['image'].shape) if 'image' in info.features else ()
  size = tuple(shape[:2]) if shape and None not in shape[:2] else ()   # None: sizes vary
  splits = {}
  for split in (ds.train_split, ds.eval_split):
    try:
      splits[split] = int(info.splits[split].num_examples)
    except (KeyError, ValueError):
      pass
  return DataFacts(where, int(getattr(label, 'num_classes', 0) or 0),
                   default_channels([shape[2]]) if len(shape) == 3 and shape[2] else 0,
                   size, splits if len(splits) == 2 else {}, {}, {})


class ArraySource:
  """In-memory images [N, H, W, C] uint8 and labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, labels

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, i: int) -> dict:
    return {'image': self._images[i], 'label': int(self._labels[i])}


# ArrayRecord reader options for random access: no readahead and no read thread pool, so a
# record is read by `seek` + `read`, which keeps ~2e5 reads/s at 200,000 records per shard,
# where `read([i])` (grain's ArrayRecordDataSource) falls to ~1e3/s (BENCHMARKS.md, issue 29).
READER_OPTIONS = 'readahead_buffer_size:0,max_parallelism:0'


def open_shard(path: str) -> Any:
  """Opens one ArrayRecord shard for random reads: the one place the input pipeline opens a
  shard file (both `input.reader` kinds read through `RecordSource`, which calls this)."""
  from array_record.python.array_record_module import ArrayRecordReader
  return ArrayRecordReader(os.fspath(path), READER_OPTIONS)


class RecordSource:
  """The project's ArrayRecord shards (see `input_pipeline.records`) of format `version`.

  'label' is the record's class id (an int) when it has exactly one, else int32 [n]: all its
  class ids (n = 0 for an unlabelled image). `CheckedLabels` turns either into the form the
  config asks for. A version-3 record also gives its 'text' (str); the pipeline turns it into
  what the head reads (`input_pipeline.captions.TextInput`) or drops it.

  Record i is record i - offset[s] of shard s, offsets from `lengths` (records per shard, as
  metadata.json's `shard_lengths` lists them; counted by opening each shard only when not
  given). A shard is opened (`open_shard`) at its first read and stays open until `release`
  drops the last `hold` on it or `close`: the global reader keeps every shard it touched open,
  the sharded reader (`input_pipeline.pipeline`) holds a shard only while it reads it. Memory:
  O(shards) plus the open shards' indexes (~8 bytes per record). Thread-safe; picklable
  (a copy opens its own readers).
  """

  def __init__(self, paths: Sequence[str], version: int, lengths: Sequence[int] | None = None,
               fix: str = 'restore it from a copy, or prepare the dataset again'):
    paths = [os.fspath(p) for p in paths]
    self._version, self._fix = version, fix   # `fix`: what to do when a shard does not read
    if lengths is None:   # a dataset written without shard_lengths: count once
      lengths = [self._count(p) for p in paths]
    if len(lengths) != len(paths):
      raise ValueError(f'{len(lengths)} shard lengths for {len(paths)} shards')
    # Numpy, not Python objects: ~60 bytes per shard (1.5 M shards: ~90 MiB, BENCHMARKS.md).
    self._paths = np.array([p.encode() for p in paths], dtype=np.bytes_)
    self.shard_lengths = np.asarray(lengths, dtype=np.int64)
    self._offsets = np.concatenate([[0], np.cumsum(self.shard_lengths)])
    self.__setstate__(self.__dict__)

  def path(self, shard: int) -> str:
    """The file of shard `shard`."""
    return self._paths[shard].decode()

  def _count(self, path: str) -> int:
    with self._reading(path):
      reader = open_shard(path)
      try:
        return int(reader.num_records())
      finally:
        reader.close()

  @contextlib.contextmanager
  def _reading(self, path: str, record: int | None = None):
    """Turns an error reading shard `path` (array_record raises RuntimeError, at times with
    no message) into a ShardReadError naming the file, the record and what to do."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      what = str(e).strip().splitlines()[0] if str(e).strip() else (
          f'{type(e).__name__} with no message: cut short?')
      at = f', record {record}' if record is not None else ''
      raise ShardReadError(f'cannot read shard {path}{at} ({what}): the file is damaged (cut '
                           f'short or overwritten) or unreadable; {self._fix}.') from None

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k not in ('_readers', '_holds', '_lock')}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._readers, self._holds, self._lock = {}, {}, threading.Lock()

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def shard_offset(self, shard: int) -> int:
    """Index of shard `shard`'s first record."""
    return int(self._offsets[shard])

  def open_shards(self) -> list[int]:
    """The shards open now, in order."""
    with self._lock:
      return sorted(self._readers)

  def hold(self, shard: int) -> None:
    """Marks `shard` as being read (it stays open until the matching `release`)."""
    with self._lock:
      self._holds[shard] = self._holds.get(shard, 0) + 1

  def release(self, shard: int) -> None:
    """Ends one `hold` of `shard`; closes it when no hold is left."""
    with self._lock:
      left = self._holds.get(shard, 0) - 1
      if left > 0:
        self._holds[shard] = left
        return
      self._holds.pop(shard, None)
      reader = self._readers.pop(shard, None)
    if reader is not None:
      reader.close()

  def close(self) -> None:
    """Closes every open shard (a later read reopens it)."""
    with self._lock:
      readers, self._readers, self._holds = list(self._readers.values()), {}, {}
    for reader in readers:
      reader.close()

  def _record(self, i: int) -> bytes:
    if not 0 <= i < len(self):
      raise IndexError(f'record {i} of {len(self)}')
    shard = int(np.searchsorted(self._offsets, i, 'right')) - 1
    path, record = self.path(shard), i - int(self._offsets[shard])
    with self._lock:
      reader = self._readers.get(shard)
      if reader is None:
        with self._reading(path):
          reader = self._readers[shard] = open_shard(path)
      with self._reading(path, record):
        reader.seek(record)
        return reader.read()

  def __getitem__(self, i: int) -> dict:
    from input_pipeline.records import decode_record_text
    labels, image, text = decode_record_text(self._record(int(i)), self._version)
    example = {'image': image, 'label': int(labels[0]) if len(labels) == 1 else labels}
    if text is not None:
      example['text'] = text
    return example


def records_of(source: Any) -> RecordSource | None:
  """The `RecordSource` under `source`'s index-preserving wrappers (`CheckedLabels`,
  `NoisyLabels`, `RemappedLabels`: element i is made from record i alone), else None
  (in-memory, tfds or synthetic data, or a `ClassSubset`): what the sharded reader can read
  shard by shard."""
  while isinstance(source, (CheckedLabels, NoisyLabels, RemappedLabels)):
    source = source._source
  return source if isinstance(source, RecordSource) else None


class TfdsSource:
  """A `tfds.data_source` (ArrayRecord on disk, no TensorFlow needed) as {'image', 'label'};
  a `Sequence(ClassLabel)` label feature gives the int32 array of the image's class ids."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    example = self._source[i]
    image = np.asarray(example['image'])
    if image.ndim == 2:
      image = image[..., None]
    label = np.asarray(example['label'])
    return {'image': image, 'label': int(label) if label.ndim == 0 else label.astype(np.int32)}


class SyntheticSource:
  """Seeded stand-in data: a fixed random prototype per class plus noise, label = index % K.

  With `max_labels` > 1 (a multi-label stand-in) example i also carries up to max_labels - 1
  further seeded classes, and its image is the mean of its classes' prototypes plus noise.
  Each element is a pure function of (seed, index), so no memory grows with the class count.
  Used for `:runlocal` runs of private datasets and for throughput benchmarks.
  """

  def __init__(self, num_examples: int, num_classes: int, size: int, channels: int, seed: int,
               max_labels: int = 1):
    self._n, self._k, self._shape, self._seed = num_examples, num_classes, (size, size, channels), seed
    self._max = max_labels

  def __len__(self) -> int:
    return self._n

  def _prototype(self, label: int) -> np.ndarray:
    return np.random.default_rng([self._seed, label]).integers(0, 256, self._shape)

  def __getitem__(self, i: int) -> dict:
    label = i % self._k
    noise = np.random.default_rng([self._seed, label, i]).normal(0, 24, self._shape)
    if self._max <= 1:
      return {'image': np.clip(self._prototype(label) + noise, 0, 255).astype(np.uint8),
              'label': label}
    rng = np.random.default_rng([self._seed, 104729, i])
    extra = rng.choice(self._k, size=int(rng.integers(0, self._max)), replace=False)
    labels = np.array([label] + [int(k) for k in extra if k != label], np.int32)
    proto = np.mean([self._prototype(int(k)) for k in labels], axis=0)
    return {'image': np.clip(proto + noise, 0, 255).astype(np.uint8), 'label': labels}


class NoisyLabels:
  """Flips a seeded fraction `rate` of single-label training labels, decided per index on read.

  kind 'symmetric': to a uniformly random other class; 'class_dependent': y -> (y + 1) mod K
  (the usual pair flip); 'input_dependent': the flip probability and the wrong class depend on
  the image, through a class distribution P(x) [K] per example:
    - from `reference`, a .npy [N, K] of a reference model's predicted class probabilities on
      this split (in source order; `python -m evaluation.reference_probs` writes it), or
    - without one, a seeded random linear map of the image's content: P(x) = softmax(W f(x)),
      f(x) = the image as 8x8 grey (box filter), standardised, W ~ N(0, 3^2 / 64) [64, K].
  Example i (label y) flips with probability q_i = min(1, c (1 - P(x_i)[y])) - the more the
  reference doubts its label, the likelier - to a class drawn from P(x_i) without y. c is set
  once, so that q averages `rate` over the split (over a seeded sample of CALIBRATION examples
  when the split is larger). The realised rate is then `rate` on average (a sum of Bernoulli
  draws). Input-dependent noise is what the HET heads model (Collier et al., CVPR 2021; ICLR
  2023); the reference-model variant follows Chen et al. (AAAI 2021, "Beyond class-conditional
  assumption") in letting a trained model's confusion choose the wrong labels.

  Every draw is a pure function of (seed, index, image, reference), so a resumed run, every
  grain worker and every process see the same labels. `record()` lists the realised flips.
  Raises ValueError for an unknown kind, a rate outside [0, 1), a reference of the wrong
  shape, a rate the reference cannot reach, or a label set (multi-label data) on read.
  """
  KINDS = ('symmetric', 'class_dependent', 'input_dependent')
  CALIBRATION = 4096   # examples read at construction to set c (input_dependent)
  GREY = 8             # side of the grey thumbnail f(x) (content rule)
  STRENGTH = 3.0       # std of the content rule's logits W f(x) (|f| = 1)

  def __init__(self, source: Any, num_classes: int, rate: float, kind: str, seed: int,
               reference: str = ''):
    if kind not in self.KINDS:
      raise ValueError(f'label_noise_kind must be one of {self.KINDS}, got {kind!r}')
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'label_noise must be in [0, 1), got {rate}')
    if reference and kind != 'input_dependent':
      raise ValueError(f"dataset.label_noise_reference is used by label_noise_kind="
                       f"'input_dependent' only, but the kind is {kind!r}")
    self._source, self._k, self._rate, self._kind, self._seed = source, num_classes, rate, kind, seed
    self._reference, self._probs = reference, None
    self._scale = 0.0
    if kind == 'input_dependent':
      if reference:
        shape = self._reference_probs().shape
        if shape != (len(source), num_classes):
          raise ValueError(
              f'label_noise_reference {reference} holds probabilities of shape {shape}, but '
              f'this split has {len(source)} examples of {num_classes} classes: write it for '
              f'this dataset and split with python -m evaluation.reference_probs')
      else:
        d = self.GREY * self.GREY
        self._w = np.random.default_rng([seed, 7919, 3]).normal(
            0.0, self.STRENGTH / np.sqrt(d), (d, num_classes)).astype(np.float32)
      self._scale = self._calibrate()

  def __getstate__(self) -> dict:  # grain workers: reopen the memory-mapped reference there
    return {**self.__dict__, '_probs': None}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    example = dict(self._source[i])
    example['label'] = self._noisy_label(i, example)
    return example

  def _reference_probs(self) -> np.ndarray:
    if self._probs is None:
      try:
        self._probs = np.load(self._reference, mmap_mode='r')
      except (OSError, ValueError) as e:
        raise ValueError(f'cannot read label_noise_reference {self._reference!r} ({e}); '
                         f'write it with python -m evaluation.reference_probs') from None
    return self._probs

  def _class_probs(self, i: int, image: Any) -> np.ndarray:
    """P(x_i) [K] float64, summing to 1."""
    if self._reference:
      p = np.asarray(self._reference_probs()[i], np.float64)
    else:
      z = _grey_thumbnail(image, self.GREY) @ self._w
      p = np.exp(z - z.max()).astype(np.float64)
    return p / p.sum()

  def _label(self, i: int, example: dict) -> int:
    label = example['label']
    if np.ndim(label) != 0:
      raise ValueError(f'label noise applies to single-label data, but example {i} has the label '
                       f'set {np.asarray(label).tolist()}; set dataset.label_noise=0')
    return int(label)

  def flip_distribution(self, i: int, example: dict | None = None) -> tuple[float, np.ndarray]:
    """(probability q that example i's label flips, distribution [K] of the wrong class)."""
    example = self._source[i] if example is None else example
    y = self._label(i, example)
    if self._kind == 'symmetric':
      wrong = np.full(self._k, 1.0 / (self._k - 1))
      wrong[y] = 0.0
      return self._rate, wrong
    if self._kind == 'class_dependent':
      return self._rate, np.eye(self._k)[(y + 1) % self._k]
    p = self._class_probs(i, example['image'])
    doubt = 1.0 - p[y]
    wrong = p.copy()
    wrong[y] = 0.0
    if doubt <= 0.0 or wrong.sum() <= 0.0:
      return 0.0, np.eye(self._k)[(y + 1) % self._k]
    return min(1.0, self._scale * doubt), wrong / wrong.sum()

  def _noisy_label(self, i: int, example: dict) -> int:
    y = self._label(i, example)
    if self._rate == 0.0:
      return y
    rng = np.random.default_rng([self._seed, 7919, i])
    if self._kind != 'input_dependent':  # the original draws, unchanged
      if rng.random() < self._rate:
        shift = 1 if self._kind == 'class_dependent' else int(rng.integers(1, self._k))
        return (y + shift) % self._k
      return y
    q, wrong = self.flip_distribution(i, example)
    if rng.random() < q:
      return int(min(np.searchsorted(np.cumsum(wrong), rng.random() * wrong.sum(), 'right'),
                     self._k - 1))
    return y

  def _calibrate(self) -> float:
    """c such that min(1, c * doubt) averages `rate` over the split (or a seeded sample)."""
    n = len(self._source)
    idx = np.arange(n) if n <= self.CALIBRATION else np.sort(
        np.random.default_rng([self._seed, 7919, 4]).choice(n, self.CALIBRATION, replace=False))
    doubt = np.array([1.0 - self._class_probs(int(i), ex['image'])[self._label(int(i), ex)]
                      for i, ex in ((int(i), self._source[int(i)]) for i in idx)])
    doubt = np.clip(doubt, 0.0, 1.0)
    reachable = float(np.mean(doubt > 0))
    if self._rate >= reachable:
      raise ValueError(
          f'input_dependent label noise cannot reach rate {self._rate}: the reference gives '
          f'probability 1 to the label on {1 - reachable:.1%} of examples, so at most '
          f'{reachable:.1%} can flip; lower dataset.label_noise')
    lo, hi = 0.0, 1.0
    while np.mean(np.minimum(1.0, hi * doubt)) < self._rate:
      hi *= 2.0
    for _ in range(100):  # bisection: the mean is continuous and non-decreasing in c
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if np.mean(np.minimum(1.0, mid * doubt)) < self._rate else (lo, mid)
    return hi

  def record(self) -> dict:
    """The realised noise, reading every example once (decoding every image for the content
    rule): {'kind', 'rate', 'seed', 'reference', 'num_examples', 'num_flipped',
    'realised_rate', 'flips_sha256', 'flips'}, flips = [[index, clean, noisy], ...]."""
    import hashlib
    flips = []
    for i in range(len(self._source)):
      example = self._source[i]
      y, noisy = self._label(i, example), self._noisy_label(i, example)
      if noisy != y:
        flips.append((i, y, noisy))
    table = np.asarray(flips, np.int64).reshape(-1, 3)
    n = len(self._source)
    return {'kind': self._kind, 'rate': self._rate, 'seed': self._seed,
            'reference': self._reference, 'num_examples': n, 'num_flipped': len(flips),
            'realised_rate': len(flips) / max(n, 1),
            'flips_sha256': hashlib.sha256(table.tobytes()).hexdigest(),
            'flips': table.tolist()}

  def write_record(self, workdir: str, name: str = 'label_noise.json',
                   max_examples: int = 1_000_000) -> dict | None:
    """Writes `record()` to `workdir/name` (atomically) and returns it; None, writing nothing,
    when the file exists (a resumed run: same seed, same flips) or the split has more than
    `max_examples` examples (reading them all would take too long; call record() offline)."""
    import json
    import os
    from absl import logging
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      return None
    if len(self._source) > max_examples:
      logging.warning('label noise not recorded in %s: %d examples > %d', path,
                      len(self._source), max_examples)
      return None
    record = self.record()
    with open(path + '.tmp', 'w') as f:
      json.dump(record, f)
    os.replace(path + '.tmp', path)
    return record


def _grey_thumbnail(image: Any, side: int) -> np.ndarray:
  """The image (uint8 [H, W, C] or encoded bytes) as a side x side grey thumbnail (box
  filter), zero mean and unit norm: float32 [side * side]."""
  import io
  from PIL import Image
  if isinstance(image, (bytes, bytearray)):
    im = Image.open(io.BytesIO(image))
    im.draft('L', (side, side))  # JPEG: decode at a reduced scale; a no-op otherwise
  else:
    a = np.asarray(image)
    im = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
  x = np.asarray(im.convert('L').resize((side, side), Image.BOX), np.float32).ravel()
  x = x - x.mean()
  return x / max(float(np.linalg.norm(x)), 1e-6)


class Subset:
  """A fixed, seeded random subset of `n` elements (in source order): an unbiased sample even
  when the source is sorted by class, as packed datasets often are."""

  def __init__(self, source: Any, n: int, seed: int = 0):
    self._source = source
    n = min(n, len(source))
    rng = np.random.default_rng(seed)
    self._indices = np.sort(rng.choice(len(source), n, replace=False))

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    return self._source[int(self._indices[i])]


class RemappedLabels:
  """Each label mapped through `mapping` [K] (data class id -> model class id); the -1 padding
  of label sets is kept. For data whose class list is the model's in another order
  (`training.workdir.check_classes`)."""

  def __init__(self, source: Any, mapping: Sequence[int]):
    self._source, self._map = source, np.asarray(mapping, np.int32)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    example = dict(self._source[i])
    label = np.asarray(example['label'])
    mapped = np.where(label >= 0, self._map[np.maximum(label, 0)], label)
    example['label'] = int(mapped) if mapped.ndim == 0 else mapped.astype(np.int32)
    return example


class ClassSubset:
  """Only the examples of `classes` (dataset class ids), relabelled to their position in it
  (or keeping their labels with `relabel=False`)."""

  def __init__(self, source: Any, classes: Sequence[int], relabel: bool = True):
    relabel = {int(c): (i if relabel else int(c)) for i, c in enumerate(classes)}
    labels = np.array([source[i]['label'] for i in range(len(source))])
    self._source, self._relabel = source, relabel
    self._indices = np.flatnonzero(np.isin(labels, list(relabel)))
    self.absent = [int(c) for c in classes if not np.any(labels == int(c))]   # no examples

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    example = dict(self._source[int(self._indices[i])])
    example['label'] = self._relabel[int(example['label'])]
    return example


@functools.lru_cache(maxsize=1)
def _digits() -> tuple:
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  order = np.random.default_rng(0).permutation(len(images))
  test = order[:360]
  train = order[360:]
  names = tuple(str(n) for n in digits.target_names)
  return (images[train], digits.target[train]), (images[test], digits.target[test]), names


def _digits_source(split: str):
  train, test, names = _digits()
  images, labels = {'train': train, 'test': test}[split]
  return ArraySource(images, labels), names


def _own_hint(ds: ml_collections.ConfigDict) -> bool:
  """Whether `dataset.setup_hint` prepares this very directory (a recipe's own dataset)."""
  return bool(ds.setup_hint) and f'--out={ds.data_dir}' in ds.setup_hint.replace(' ', '')


def _read_metadata(ds: ml_collections.ConfigDict) -> dict:
  """metadata.json of the prepared directory; when missing, the error says how to prepare it:
  `dataset.setup_hint` when the config names no directory or the hint is about this one (a
  recipe's own dataset), else the generic commands (a user's own data_dir)."""
  from input_pipeline import records
  if not ds.data_dir:
    raise FileNotFoundError('dataset.data_dir is not set: point it at a directory written by '
                            f'python -m launch.prepare_data.\n{ds.setup_hint}'.strip())
  return records.read_metadata(ds.data_dir,
                               how_to_prepare=ds.setup_hint if _own_hint(ds) else None)


def _arrayrecord_source(ds: ml_collections.ConfigDict, split: str):
  from input_pipeline import records
  meta = _read_metadata(ds)
  origin = f' from its source ({meta["source"]})' if meta.get('source') else ''
  fix = (f'prepare it again: {ds.setup_hint}' if _own_hint(ds) else
         f'prepare {ds.data_dir} again{origin} with python -m launch.prepare_data '
         f'--out={ds.data_dir} and the --source it was prepared with')
  source = RecordSource(records.split_paths(ds.data_dir, split), meta['format_version'],
                        meta['splits'][split].get('shard_lengths'), fix)
  return source, tuple(meta['class_names']), meta['multi_label'], meta['max_labels_per_image']


def _tfds_source(ds: ml_collections.ConfigDict, split: str):
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(ds.tfds_name, split=split, data_dir=ds.data_dir or None,
                              download=False)
  except Exception as e:  # tfds raises several types for a dataset that is not on disk
    raise FileNotFoundError(
        f'tfds dataset {ds.tfds_name!r} (split {split!r}) is not prepared under '
        f'{ds.data_dir or "the default TFDS data dir"}: {e}\n{ds.setup_hint or ""}'.strip()) from e
  names, multi_label = (), False
  info = getattr(source, 'dataset_info', None)
  if info is not None and 'label' in info.features:
    feature = info.features['label']
    multi_label = isinstance(feature, tfds.features.Sequence)
    feature = feature.feature if multi_label else feature
    names = tuple(getattr(feature, 'names', ()))
  return TfdsSource(source), names, multi_label, None


def _labels_up_front(source: Any, probe: int = 64) -> np.ndarray:
  """Labels that are cheap to read before training: all of an in-memory source, else those of
  `probe` examples spread over the split (enough to tell an unlabelled split)."""
  if isinstance(source, ArraySource):
    return np.asarray(source.labels)
  idx = np.unique(np.linspace(0, len(source) - 1, min(probe, len(source))).astype(int))
  return np.concatenate([np.atleast_1d(source[int(i)]['label']) for i in idx] or [[]])


def _empty_split(ds: ml_collections.ConfigDict, split: str, where: str,
                 names: Sequence[str]) -> EmptySplitError:
  field = 'dataset.train_split' if split == ds.train_split else 'dataset.eval_split'
  if ds.classes:
    chosen = f' ({", ".join(map(repr, names))})' if names else ''
    why = (f'none of its examples is of the classes dataset.classes={tuple(ds.classes)}{chosen}: '
           'select classes this split has images of, or add images of them and re-prepare '
           'the data')
  else:
    why = (f'it holds no examples (every record skipped, or none there): set {field} to a '
           'split with examples, or re-prepare the data (python -m launch.prepare_data) with '
           'images in it')
  return EmptySplitError(f'{where} ({field}) is empty as selected: {why}.')


def build_source(ds: ml_collections.ConfigDict, split: str, seed: int,
                 train: bool) -> tuple[Any, DatasetInfo]:
  """The source for `split` of the configured dataset, and its info.

  Raises EmptySplitError when the split, as selected (`dataset.classes`), holds no examples;
  LabelError when the labels do not fit the config: values outside
  [0, dataset.num_classes) (all negative: an unlabelled split), a multi-label dataset read as
  single-label, more labels per image than `dataset.max_labels`.
  """
  multi, max_labels = False, 1       # what the data says
  if ds.name == 'digits':
    source, names = _digits_source(split)
  elif ds.name == 'arrayrecord':
    source, names, multi, max_labels = _arrayrecord_source(ds, split)
  elif ds.name == 'tfds':
    source, names, multi, max_labels = _tfds_source(ds, split)
  elif ds.name == 'synthetic':
    n = ds.num_examples or 4 * ds.num_classes
    split_seed = seed * 2 + (split == ds.eval_split)
    multi, max_labels = ds.multi_label, ds.max_labels if ds.multi_label else 1
    source = SyntheticSource(n, ds.num_classes, ds.image_size, ds.channels, split_seed,
                             max_labels)
    names = tuple(f'class_{k}' for k in range(ds.num_classes))
  else:
    raise ValueError(f"unknown dataset.name {ds.name!r}: use digits, arrayrecord, tfds or synthetic")
  where = f'split {split!r} of {ds.name} dataset {ds.data_dir or ds.tfds_name or ds.name!r}'
  if multi and not ds.multi_label:
    raise LabelError(f'{where} is multi-label (up to {max_labels or "?"} labels per image): set '
                     '--config.dataset.multi_label=True and --config.dataset.max_labels (and '
                     "use a head that takes label sets, e.g. link='sigmoid').")
  if ds.multi_label:
    if ds.max_labels < 1:
      raise LabelError('dataset.multi_label=True needs dataset.max_labels >= 1 (labels per '
                       'image at most: the padded length of each label list).')
    if max_labels and max_labels > ds.max_labels:
      raise LabelError(f'{where} has images with {max_labels} labels but dataset.max_labels = '
                       f'{ds.max_labels}; set --config.dataset.max_labels={max_labels}.')
    for field in ('classes', 'label_noise'):
      if ds[field]:
        raise LabelError(f'dataset.{field} is not supported for multi-label data; unset it.')
  if ds.classes:
    source = ClassSubset(source, ds.classes)
    names = tuple(names[c] for c in ds.classes) if names else ()
  if not len(source):
    raise _empty_split(ds, split, where, names)
  if ds.classes and source.absent:
    from absl import logging
    logging.warning('%s has no examples of %d of the classes in dataset.classes: %s; the model '
                    'cannot learn (or be scored on) them', where, len(source.absent),
                    ', '.join(f'{c} ({names[list(ds.classes).index(c)]!r})' if names else str(c)
                              for c in source.absent[:8]))
  if names and len(names) != ds.num_classes:
    raise ValueError(f'dataset has {len(names)} classes but config.dataset.num_classes = '
                     f'{ds.num_classes}')
  labels = _labels_up_front(source)
  bad = bad_labels(labels, ds.num_classes)
  if len(bad):
    raise label_error(where, bad, len(labels), ds.num_classes)
  source = CheckedLabels(source, ds.num_classes, where, ds.max_labels if ds.multi_label else 0)
  if train and ds.label_noise > 0:
    source = NoisyLabels(source, ds.num_classes, ds.label_noise, ds.label_noise_kind, seed,
                         ds.label_noise_reference)
  names = names or tuple(str(k) for k in range(ds.num_classes))
  return source, DatasetInfo(ds.num_classes, names, len(source))
