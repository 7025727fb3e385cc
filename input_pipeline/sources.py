"""Random-access data sources by config name. Every element is {'image', 'label'}.

`image` is either a uint8 array [H, W, C] or encoded JPEG/PNG bytes (decoded later, inside the
grain workers); `label` is an int. Sources are plain Python sequences, picklable, so grain can
read them from worker processes.
"""
import dataclasses
import functools
from typing import Any, Sequence

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  class_names: tuple
  num_examples: int


class ArraySource:
  """In-memory images [N, H, W, C] uint8 and labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, i: int) -> dict:
    return {'image': self._images[i], 'label': int(self._labels[i])}


class RecordSource:
  """The project's ArrayRecord shards (see `input_pipeline.records`)."""

  def __init__(self, paths: Sequence[str]):
    import grain
    self._records = grain.sources.ArrayRecordDataSource(list(paths))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    from input_pipeline.records import decode_record
    label, image = decode_record(self._records[i])
    return {'image': image, 'label': label}


class TfdsSource:
  """A `tfds.data_source` (ArrayRecord on disk, no TensorFlow needed) as {'image', 'label'}."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    example = self._source[i]
    image = np.asarray(example['image'])
    if image.ndim == 2:
      image = image[..., None]
    return {'image': image, 'label': int(example['label'])}


class SyntheticSource:
  """Seeded stand-in data: a fixed random prototype per class plus noise, label = index % K.

  Each element is a pure function of (seed, index), so no memory grows with the class count.
  Used for `:runlocal` runs of private datasets and for throughput benchmarks.
  """

  def __init__(self, num_examples: int, num_classes: int, size: int, channels: int, seed: int):
    self._n, self._k, self._shape, self._seed = num_examples, num_classes, (size, size, channels), seed

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    label = i % self._k
    proto = np.random.default_rng([self._seed, label]).integers(0, 256, self._shape)
    noise = np.random.default_rng([self._seed, label, i]).normal(0, 24, self._shape)
    return {'image': np.clip(proto + noise, 0, 255).astype(np.uint8), 'label': label}


class NoisyLabels:
  """Flips a seeded fraction of labels: 'symmetric' (to a uniformly random other class) or
  'class_dependent' (y -> (y + 1) mod K, the usual pair-flip). Decided per index, on read."""

  def __init__(self, source: Any, num_classes: int, rate: float, kind: str, seed: int):
    if kind not in ('symmetric', 'class_dependent'):
      raise ValueError(f"label_noise_kind must be 'symmetric' or 'class_dependent', got {kind!r}")
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'label_noise must be in [0, 1), got {rate}')
    self._source, self._k, self._rate, self._kind, self._seed = source, num_classes, rate, kind, seed

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    example = dict(self._source[i])
    rng = np.random.default_rng([self._seed, 7919, i])
    if rng.random() < self._rate:
      shift = 1 if self._kind == 'class_dependent' else int(rng.integers(1, self._k))
      example['label'] = (example['label'] + shift) % self._k
    return example


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


class ClassSubset:
  """Only the examples of `classes` (dataset class ids), relabelled to their position in it
  (or keeping their labels with `relabel=False`)."""

  def __init__(self, source: Any, classes: Sequence[int], relabel: bool = True):
    relabel = {int(c): (i if relabel else int(c)) for i, c in enumerate(classes)}
    labels = np.array([source[i]['label'] for i in range(len(source))])
    self._source, self._relabel = source, relabel
    self._indices = np.flatnonzero(np.isin(labels, list(relabel)))

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


def _arrayrecord_source(ds: ml_collections.ConfigDict, split: str):
  from input_pipeline import records
  try:
    meta = records.read_metadata(ds.data_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}\n{ds.setup_hint}'.strip()) from None
  return RecordSource(records.split_paths(ds.data_dir, split)), tuple(meta['class_names'])


def _tfds_source(ds: ml_collections.ConfigDict, split: str):
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(ds.tfds_name, split=split, data_dir=ds.data_dir or None,
                              download=False)
  except Exception as e:  # tfds raises several types for a dataset that is not on disk
    raise FileNotFoundError(
        f'tfds dataset {ds.tfds_name!r} (split {split!r}) is not prepared under '
        f'{ds.data_dir or "the default TFDS data dir"}: {e}\n{ds.setup_hint or ""}'.strip()) from e
  names = ()
  info = getattr(source, 'dataset_info', None)
  if info is not None and 'label' in info.features:
    names = tuple(info.features['label'].names)
  return TfdsSource(source), names


def build_source(ds: ml_collections.ConfigDict, split: str, seed: int,
                 train: bool) -> tuple[Any, DatasetInfo]:
  """The source for `split` of the configured dataset, and its info."""
  if ds.name == 'digits':
    source, names = _digits_source(split)
  elif ds.name == 'arrayrecord':
    source, names = _arrayrecord_source(ds, split)
  elif ds.name == 'tfds':
    source, names = _tfds_source(ds, split)
  elif ds.name == 'synthetic':
    n = ds.num_examples or 4 * ds.num_classes
    split_seed = seed * 2 + (split == ds.eval_split)
    source = SyntheticSource(n, ds.num_classes, ds.image_size, ds.channels, split_seed)
    names = tuple(f'class_{k}' for k in range(ds.num_classes))
  else:
    raise ValueError(f"unknown dataset.name {ds.name!r}: use digits, arrayrecord, tfds or synthetic")
  if ds.classes:
    source = ClassSubset(source, ds.classes)
    names = tuple(names[c] for c in ds.classes) if names else ()
  if names and len(names) != ds.num_classes:
    raise ValueError(f'dataset has {len(names)} classes but config.dataset.num_classes = '
                     f'{ds.num_classes}')
  if train and ds.label_noise > 0:
    source = NoisyLabels(source, ds.num_classes, ds.label_noise, ds.label_noise_kind, seed)
  names = names or tuple(str(k) for k in range(ds.num_classes))
  return source, DatasetInfo(ds.num_classes, names, len(source))
