"""Builds the project's ArrayRecord image datasets (format: `input_pipeline.records`).

  python -m launch.prepare_data --source=SOURCE --out=DIR [--num_shards=N]

Single-label sources (one class per image; metadata.json says `multi_label: false`):
  cifar10_npz / caltech101_npz   packed-JPEG npz files in --input_dir (train and test)
  npz:TRAIN.npz[,TEST.npz]       packed-JPEG npz files (keys blob, offsets, labels, class_names);
                                 entries may also be named: npz:train=a.npz,val=b.npz
  folder --input_dir=ROOT        ROOT/<split>/<class>/<file>, or ROOT/<class>/<file> as 'train'
  idx --input_dir=D              MNIST-format idx files (gzip or not): <prefix>-images-idx3-ubyte
                                 + <prefix>-labels-idx1-ubyte per split (train, test; t10k =
                                 test), as MNIST / Fashion-MNIST / KMNIST / EMNIST ship them;
                                 images become lossless PNG, class names the label values
                                 or --class_names_file's lines (label k = line k + 1)
  tfds:NAME --tfds_data_dir=D    a TFDS dataset already on disk (array_record file format)
                                 whose label feature is a ClassLabel

Class ids: a class's id is its position in the class list, printed at the end of every run
(`class ids (...)`) and stored as metadata.json `class_names`. Folder names (and labels-file
names) are sorted as numbers when all are integers ('2' before '10'), else as strings; npz
files and tfds keep their own list; idx labels are their own ids.

Held-out split: a source with only a training split (or any other) gets a new split of a seeded
fraction of one with --holdout_split=test [--holdout_fraction=0.1] [--holdout_from=train]
[--seed=0], stratified by class when the source knows the classes up front (folders, npz, idx):
round(fraction * n) of a class's n images, at least 1 and at most n - 1 when n >= 2.

Checks: an empty image file is skipped as "empty file (0 bytes)", bytes Pillow cannot read as
"not an image file Pillow can read (first bytes)"; an npz or idx file that is empty, of another
format or truncated stops the run saying so. Warnings (stderr, and metadata.json `warnings`):
classes with no images, with fewer than 5 training images, or missing from a split that others
have them in. metadata.json also records `channels` (the stored channel counts) and
`pixel_stats` (per-channel mean / std of the training split, decoded to 1 and to 3 channels,
in [0, 1]), which training normalises with by default.

Multi-label sources (each image carries a set of 0, 1 or more classes; `multi_label: true`):
  folder --input_dir=ROOT --labels_file=FILE
      the images listed in a labels file, at paths relative to ROOT (other files in ROOT are
      ignored). FILE alone is the 'train' split; name the splits to give one file each:
      --labels_file=train=a.csv,test=b.jsonl (unnamed entries are train, then test). A labels
      file is read as UTF-8 and its format is chosen by its extension:
        .csv    one row per image: `path,labels`, the labels joined by --label_sep (default
                '|'; a space separator splits on any run of whitespace), e.g.
                  path,labels                <- optional header row (exactly these two words)
                  photos/0001.jpg,cat|dog
                  photos/0002.jpg,"traffic light|car"
                  photos/0003.jpg,           <- an image with no label
                Quote a field holding a comma (Python's csv module, Excel dialect).
        .jsonl  (or .ndjson) one JSON object per line:
                  {"path": "photos/0001.jpg", "labels": ["cat", "dog"]}
                other keys are ignored (but "text", below); a label may also be an integer
                class id (an index into --class_names_file, which it then requires).
      Blank lines are skipped; repeated labels on one line count once. --class_names_file (one
      name per line; id = its line number - 1) fixes the class list and its order; without it
      the classes are the sorted union of the names in all the labels files.
      Texts (a captioned dataset, for image-text training: `hetxl.contrastive` trains on each
      image's own text): a CSV whose header row is `path,labels,text` has a third field per
      row, the image's text (quote it when it holds a comma, a quote or a line break); a JSONL
      line gives it as "text": "a dog on a red sofa". Every image of every labels file then
      needs a non-empty text (surrounding whitespace is stripped), stored as UTF-8 in its
      record (`input_pipeline.records` format version 3; metadata.json `has_text: true`);
      without texts the dataset is written exactly as before (format version 2). E.g.
        path,labels,text
        photos/0001.jpg,cat|dog,"a cat and a dog asleep, on a sofa"
        photos/0002.jpg,,a street at night          <- no label, still a text
  tfds:NAME --tfds_data_dir=D    a TFDS dataset whose label feature is a
                                 Sequence(ClassLabel) (--label_key picks it; default 'label',
                                 then 'labels')
  mosaic:NPZ_SOURCE [--seed=S] [--num_mosaics=N | train=N,test=M]
      a seeded multi-label benchmark built from a single-label npz source (cifar10_npz,
      caltech101_npz or npz:...; with --input_dir as for that source): each image is a 2x2 grid
      of real images of the same split, tiles in the order top-left, top-right, bottom-left,
      bottom-right. For mosaic i of a split: m ~ uniform{1, ..., min(4, K')} distinct classes
      are drawn uniformly without replacement from the K' classes present in the split; each
      fills one tile and the 4 - m other tiles take classes drawn uniformly from those m (so a
      class may fill several tiles); the tiles are shuffled, and each takes a distinct image of
      its class drawn uniformly (with replacement only if the class has too few). The labels
      are the m classes. Every draw depends only on (seed, split, i). Tiles are decoded as RGB
      and the mosaic is stored as lossless PNG (2H x 2W for H x W source images). Default: as
      many mosaics per split as the split has source images.

Bad labels input stops before anything is written, with one error listing every problem (up to
20) by file:line: a malformed line (wrong field count, invalid JSON, an empty path or class
name, an absolute path or one leaving ROOT), an image listed twice (both lines named, also
across splits), a class name not in --class_names_file, a class id outside [0, K), a duplicate
name in the class-names file, a file that is not UTF-8 or lists no image (empty), and for texts:
an image without a text (or an empty one, or one that is not a string) where others have
texts, in the same file or in another split's file, or a text that is not valid Unicode. A
listed image that is missing or does not decode is reported and skipped, like any undecodable
image. Images with no label are kept and counted (`num_unlabelled` per split in metadata.json).

Images are stored byte-for-byte as they come (never re-encoded; except TFDS images that are only
available decoded, which become lossless PNG, and mosaics), after checking that each one
decodes; those that do not are reported and skipped. Shards are written to a temp dir inside
DIR and moved in place when all are complete, metadata.json last (the old one is removed
first), so a reader of DIR sees the old dataset, the new one, or none (no metadata.json), never
a mix. metadata.json records per split `class_counts` (images carrying each class),
`num_unlabelled` and `num_labels`, and for the dataset `multi_label` and `max_labels_per_image`.
"""
import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import gzip
import io
import itertools
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, UnidentifiedImageError

from input_pipeline import image_ops, records

NAMED_NPZ = {
    'cifar10_npz': {'train': 'cifar10_train_jpegq75.npz', 'test': 'cifar10_test_jpegq75.npz'},
    'caltech101_npz': {'train': 'caltech101_train_64px_jpegq90.npz',
                       'test': 'caltech101_test_64px_jpegq90.npz'},
}
_SHARD_BYTES = 256 << 20  # target shard size when --num_shards is not given ...
SHARD_RECORDS = 10_000    # ... and most records per shard: enough shards for every process
                          # and reader stream of the sharded reader (issue 29, BENCHMARKS.md)
_MAX_SKIPPED_LISTED = 1000
_TMP_PREFIX = '.prepare-tmp-'
_SHARD_RE = re.compile(r'.+\.array_record-\d{5}-of-\d{5}$')

# Reads one example: (label, encoded image) or, from a captioned source, (label, encoded image,
# text); the label is an int (single-label sources) or a sorted list of distinct class ids
# (multi-label sources; empty for an unlabelled image).
Fetch = Callable[[], tuple]
_MAX_ERRORS = 20  # problems listed in one labels-file error


@dataclasses.dataclass
class _Split:
  num_items: int
  num_bytes: int  # estimate, for the default number of shards
  items: Callable[[], Iterator[tuple[str, Fetch]]]  # (where it comes from, reader), in order
  labels: Optional[Sequence[int]] = None  # each item's class, when known without reading it


@dataclasses.dataclass
class _Source:
  description: str
  class_names: list[str]
  splits: dict[str, _Split]
  encoding: str = 'original bytes'
  multi_label: bool = False
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more metadata.json keys
  has_text: bool = False  # every image has its own text (fetch returns it third)


class LabelsFileError(ValueError):
  """Unusable labels input (labels file, class-names file); the message names file:line."""


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class _Npz:
  class_names: list[str]
  blob: np.ndarray
  offsets: np.ndarray  # int64 [N + 1]
  labels: np.ndarray   # int [N]
  where: Optional[list[str]]  # the 'paths' entry, if any


def _load_npz(paths: dict[str, str]) -> dict[str, _Npz]:
  """The packed-JPEG npz file of each split, checked to share one class list."""
  out, class_names = {}, None
  for split, path in paths.items():
    with _open_npz(path) as d:
      missing = [k for k in ('blob', 'offsets', 'labels', 'class_names') if k not in d.files]
      if missing:
        raise ValueError(f'{path}: an npz of packed images needs the arrays blob, offsets, '
                         f'labels and class_names; it lacks {missing} (it has {d.files}).')
      names = [str(c) for c in d['class_names']]
      blob, offsets, labels = d['blob'], d['offsets'].astype(np.int64), d['labels'].astype(int)
      where = ([f'{path}:{p}' for p in d['paths']] if 'paths' in d.files else None)
    if len(offsets) != len(labels) + 1:
      raise ValueError(f'{path}: {len(offsets)} offsets for {len(labels)} labels.')
    if class_names is None:
      class_names = names
    elif names != class_names:
      raise ValueError(f'{path}: class_names differ from those of the other npz files.')
    out[split] = _Npz(names, blob, offsets, labels, where)
  return out


def _open_npz(path: str):
  """np.load of an npz file, with a clear error when the file is missing, empty or not an npz
  (a zip archive of .npy arrays): never numpy's advice about pickled data."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'npz file {path} does not exist.')
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    raise ValueError(f'{path} is empty (0 bytes), not an npz file.')
  if head != b'PK\x03\x04':
    kind = 'a .npy array' if head == b'\x93NUM' else f'a file starting with {head!r}'
    raise ValueError(f'{path} is not an npz file (a zip archive of .npy arrays) but {kind}.')
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a readable npz file: {e}') from None


def _npz_source(paths: dict[str, str]) -> _Source:
  splits, class_names = {}, None
  for split, npz in _load_npz(paths).items():
    path, class_names = paths[split], npz.class_names
    blob, offsets, labels, where = npz.blob, npz.offsets, npz.labels, npz.where

    def items(blob=blob, offsets=offsets, labels=labels, where=where, path=path):
      for i, label in enumerate(labels):
        fetch = functools.partial(_slice_bytes, blob, int(offsets[i]), int(offsets[i + 1]),
                                  int(label))
        yield (where[i] if where else f'{path}[{i}]'), fetch

    splits[split] = _Split(len(labels), int(offsets[-1] - offsets[0]), items, labels.tolist())
  desc = 'packed-JPEG npz: ' + ', '.join(f'{s}={os.path.basename(p)}' for s, p in paths.items())
  return _Source(desc, class_names, splits)


def _slice_bytes(blob: np.ndarray, start: int, end: int, label: int) -> tuple[int, bytes]:
  return label, blob[start:end].tobytes()


def _read_file(path: str, label: Any, *text: str) -> tuple:
  """(label, the file's bytes[, text]): `text` (a captioned source's) is passed through."""
  with open(path, 'rb') as f:
    return (label, f.read(), *text)


def _visible(root: str) -> list[str]:
  return sorted(n for n in os.listdir(root) if not n.startswith('.'))


def class_order(names: Iterable[str]) -> list[str]:
  """Class ids are positions in this list: names sorted as numbers when all are integers
  ('2' before '10'), else as strings."""
  names = set(names)
  if names and all(re.fullmatch(r'[+-]?\d+', n) for n in names):
    return sorted(names, key=lambda n: (int(n), n))
  return sorted(names)


def _folder_source(root: str) -> _Source:
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--input_dir {root!r} is not a directory.')
  top = [n for n in _visible(root) if os.path.isdir(os.path.join(root, n))]
  if not top:
    raise ValueError(f'{root!r} has no subdirectories: expected ROOT/<class>/<file> or '
                     'ROOT/<split>/<class>/<file>.')
  # ROOT/<split>/<class>/<file> when every top-level directory holds only directories.
  nested = all(
      _visible(os.path.join(root, d)) and
      all(os.path.isdir(os.path.join(root, d, n)) for n in _visible(os.path.join(root, d)))
      for d in top)
  split_dirs = {d: os.path.join(root, d) for d in top} if nested else {'train': root}
  files = {}  # split -> class -> sorted file names
  for split, sdir in split_dirs.items():
    files[split] = {c: [f for f in _visible(os.path.join(sdir, c))
                        if os.path.isfile(os.path.join(sdir, c, f))]
                    for c in _visible(sdir) if os.path.isdir(os.path.join(sdir, c))}
  class_names = class_order(set(itertools.chain.from_iterable(files.values())))
  index = {c: i for i, c in enumerate(class_names)}
  splits = {}
  for split, by_class in files.items():
    paths = [(os.path.join(split_dirs[split], c, f), index[c])
             for c in sorted(by_class) for f in by_class[c]]

    def items(paths=paths):
      for path, label in paths:
        yield path, functools.partial(_read_file, path, label)

    num_bytes = sum(os.path.getsize(p) for p, _ in paths)
    splits[split] = _Split(len(paths), num_bytes, items, [label for _, label in paths])
  layout = '<split>/<class>/<file>' if nested else '<class>/<file> (one split: train)'
  return _Source(f'image folder {os.path.abspath(root)} ({layout})', class_names, splits)


_IDX_TYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
_IDX_FILE = re.compile(r'(?P<prefix>.+?)[-.](?P<kind>images|labels)[-.]idx(?P<dims>\d)[-.]ubyte'
                       r'(?P<gz>\.gz)?$')


def read_idx(path: str) -> np.ndarray:
  """The array in an idx file (the MNIST format: 00 00 <type> <ndim>, ndim big-endian uint32
  sizes, then the values), gzip-compressed or not. ValueError saying what is wrong otherwise."""
  with open(path, 'rb') as f:
    raw = f.read()
  if not raw:
    raise ValueError(f'{path} is empty (0 bytes), not an idx file.')
  if raw[:2] == b'\x1f\x8b':
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f'{path} starts like gzip but does not decompress: {e}') from None
  if len(raw) < 4 or raw[:2] != b'\0\0' or raw[2] not in _IDX_TYPES:
    raise ValueError(f'{path} is not an idx file (MNIST format): it starts with {raw[:4]!r}, '
                     'not 00 00 <type 08-0E> <number of dimensions>.')
  ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
  header = 4 + 4 * ndim
  dims = struct.unpack(f'>{ndim}I', raw[4:header]) if len(raw) >= header else None
  if dims is None or len(raw) - header != math.prod(dims) * dtype.itemsize:
    raise ValueError(f'{path}: the idx header says {ndim} dimensions {dims} of {dtype}, but the '
                     f'file holds {len(raw) - header} bytes of values (truncated?).')
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder('='))


def _idx_png(images: np.ndarray, i: int, label: int) -> tuple[int, bytes]:
  return label, _png(images[i])


def _idx_source(input_dir: str, class_names_file: Optional[str] = None) -> _Source:
  """<prefix>-images-idx3-ubyte[.gz] + <prefix>-labels-idx1-ubyte[.gz] pairs in `input_dir`
  (MNIST, Fashion-MNIST, KMNIST, EMNIST names); the split is the prefix's last part (train,
  test; t10k = test). Images [N, H, W] or [N, H, W, C] uint8, stored as lossless PNG; class
  names are the lines of `class_names_file` (label k is line k + 1; every label must have
  one), else the label values 0..max."""
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'--input_dir {input_dir!r} is not a directory.')
  found: dict[str, dict[str, str]] = {}
  for name in _visible(input_dir):
    m = _IDX_FILE.match(name)
    if m:
      found.setdefault(m['prefix'], {})[m['kind']] = os.path.join(input_dir, name)
  if not found:
    raise ValueError(f'{input_dir!r} holds no idx files named like '
                     'train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz].')
  arrays = {}
  for prefix, pair in sorted(found.items()):
    if set(pair) != {'images', 'labels'}:
      missing = ({'images', 'labels'} - set(pair)).pop()
      raise ValueError(f'{input_dir!r}: {os.path.basename(next(iter(pair.values())))} has no '
                       f'{missing} file ({prefix}-{missing}-idx...-ubyte) beside it.')
    images, labels = read_idx(pair['images']), read_idx(pair['labels'])
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(f'{pair["images"]}: expected uint8 images [N, H, W] or [N, H, W, C], '
                       f'got {images.dtype} {images.shape}.')
    if labels.ndim != 1 or labels.dtype.kind not in 'iu' or len(labels) != len(images):
      raise ValueError(f'{pair["labels"]}: expected {len(images)} integer labels [N], got '
                       f'{labels.dtype} {labels.shape}.')
    tail = re.split(r'[-_.]', prefix)[-1]
    split = {'t10k': 'test'}.get(tail, tail)
    if split in arrays:
      raise ValueError(f'{input_dir!r}: two idx pairs for split {split!r}.')
    arrays[split] = (images, labels.astype(np.int64), pair['images'])
  top = max(int(labels.max(initial=0)) for _, labels, _ in arrays.values())
  names = [str(k) for k in range(top + 1)]
  if class_names_file:
    problems = _Problems()
    names = _read_class_names(class_names_file, problems)
    if top >= len(names):
      problems.add(class_names_file, f'{len(names)} class names, but the idx labels go up to '
                   f'{top}: give one name per label value 0..{top}, one per line')
    problems.raise_if_any()
  splits = {}
  for split, (images, labels, path) in arrays.items():

    def items(images=images, labels=labels, path=path):
      for i, label in enumerate(labels):
        yield f'{path}[{i}]', functools.partial(_idx_png, images, i, int(label))

    splits[split] = _Split(len(labels), images.nbytes, items, labels.tolist())
  desc = 'idx files: ' + ', '.join(f'{s}={os.path.basename(p)}' for s, (_, _, p) in arrays.items())
  return _Source(desc, names, splits, 'png (lossless, from idx arrays)')


def _tfds_source(name: str, data_dir: Optional[str], image_key: Optional[str],
                 label_key: Optional[str]) -> _Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared under {builder.data_dir!r}; '
                            'this command does not download.')
  features = builder.info.features
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if _class_labels(f, tfds) is not None]
  image_key = image_key or ('image' if 'image' in images else (images or [None])[0])
  label_key = label_key or next((k for k in ('label', 'labels') if k in labels),
                                (labels or [None])[0])
  if image_key is None or label_key is None:
    raise ValueError(f'{name}: need an Image and a ClassLabel or Sequence(ClassLabel) feature '
                     f'(top level); found {list(features)}. Pass --image_key/--label_key.')
  if label_key not in labels:
    raise ValueError(f'{name}: --label_key {label_key!r} is not a ClassLabel or '
                     f'Sequence(ClassLabel) feature; those are {labels}.')
  multi_label = isinstance(features[label_key], tfds.features.Sequence)
  class_names = list(_class_labels(features[label_key], tfds).names)
  raw = builder.as_data_source(decoders={image_key: tfds.decode.SkipDecoding()})
  probe = next((raw[s][0][image_key] for s in raw if len(raw[s])), None)
  reencode = not _decodes(probe)
  sources = builder.as_data_source() if reencode else raw

  def fetch(ds, i: int) -> tuple[Any, bytes]:
    ex = ds[i]
    image = _png(np.asarray(ex[image_key])) if reencode else bytes(ex[image_key])
    label = np.asarray(ex[label_key])
    return (sorted({int(k) for k in label.ravel()}) if multi_label else int(label)), image

  splits = {}
  for split, ds in sources.items():

    def items(ds=ds, split=split):
      for i in range(len(ds)):
        yield f'tfds:{name}/{split}[{i}]', functools.partial(fetch, ds, i)

    splits[split] = _Split(len(ds), int(builder.info.splits[split].num_bytes or 0), items)
  encoding = ('png (re-encoded losslessly from the decoded TFDS images)' if reencode
              else 'original bytes')
  desc = f'tfds {builder.info.full_name} from {builder.data_dir} ({image_key}, {label_key})'
  return _Source(desc, class_names, splits, encoding, multi_label)


def _class_labels(feature: Any, tfds: Any) -> Any:
  """The ClassLabel of a ClassLabel or Sequence(ClassLabel) feature, else None."""
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return feature if isinstance(feature, tfds.features.ClassLabel) else None


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
      buf, format='PNG')
  return buf.getvalue()


def _decodes(data: Any) -> bool:
  if not isinstance(data, (bytes, bytearray)):
    return False
  try:
    _inspect(bytes(data))
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# ----------------------------------------------------------------------------- labels files


@dataclasses.dataclass
class _Listed:
  """One image of a labels file: where it was listed, its path under ROOT, its labels, and
  its text (None: the file gives no texts)."""
  where: str          # 'file:line'
  path: str           # normalised, relative to ROOT
  labels: list[Any]   # class names (str) or class ids (int), as written
  text: Optional[str] = None


class _Problems:
  """Collects labels-input problems; `raise_if_any` raises one LabelsFileError listing them."""

  def __init__(self):
    self.messages: list[str] = []

  def add(self, where: str, message: str) -> None:
    self.messages.append(f'{where}: {message}')

  def raise_if_any(self) -> None:
    if self.messages:
      shown = self.messages[:_MAX_ERRORS]
      more = len(self.messages) - len(shown)
      raise LabelsFileError(
          f'{len(self.messages)} problem(s) in the labels input; nothing was written. Fix them '
          'and re-run:\n  ' + '\n  '.join(shown) + (f'\n  ... and {more} more' if more else ''))


def _split_files(spec: str) -> dict[str, str]:
  """'a.csv' -> {'train': 'a.csv'}; 'train=a.csv,test=b.jsonl' -> one file per split."""
  files = {}
  for i, entry in enumerate(e for e in spec.split(',') if e.strip()):
    split, sep, path = entry.strip().partition('=')
    if not sep:
      if i >= 2:
        raise LabelsFileError('Name the third and later labels files: '
                              '--labels_file=train=a.csv,test=b.csv,val=c.csv')
      split, path = ('train', 'test')[i], entry.strip()
    if split in files:
      raise LabelsFileError(f'--labels_file names split {split!r} twice.')
    files[split] = path
  if not files:
    raise LabelsFileError('--labels_file is empty; e.g. --labels_file=labels.csv')
  return files


def _read_text(path: str, problems: _Problems) -> str:
  """The file as UTF-8 text (a leading BOM dropped); '' with a problem noted if it is not."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    problems.add(f'{path}:{line}',
                 f'not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8')
    return ''


def _read_class_names(path: str, problems: _Problems) -> list[str]:
  """One class name per line (id = line number - 1); trailing blank lines are ignored."""
  lines = _read_text(path, problems).splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  first_line = {}
  for i, name in enumerate(n.strip() for n in lines):
    if not name:
      problems.add(f'{path}:{i + 1}', 'empty line; write one class name per line (class id = '
                   'line number - 1)')
    elif name in first_line:
      problems.add(f'{path}:{i + 1}', f'class name {name!r} repeats line {first_line[name]}')
    else:
      first_line[name] = i + 1
  return [n.strip() for n in lines]


_CSV_HEADERS = (['path', 'labels'], ['path', 'labels', 'text'])


def _csv_rows(path: str, text: str, sep: str,
              problems: _Problems) -> Iterator[tuple[int, str, list[str], Any]]:
  """(line, image path, class names, text or None) of each row of a `path,labels` CSV file, or
  of a `path,labels,text` one (which the header row must announce); a row's line is the one
  it starts on (a quoted text may span lines)."""
  reader = csv.reader(io.StringIO(text, newline=''), strict=True)
  fields, end = 2, 0
  try:
    for row in reader:
      line, end = end + 1, reader.line_num
      if not any(c.strip() for c in row):
        continue
      if line == 1 and [c.strip().lower() for c in row] in _CSV_HEADERS:
        fields = len(row)
        continue  # header
      if len(row) != fields and fields == 3:
        problems.add(f'{path}:{line}', f'expected 3 fields (path,labels,text), as the header '
                     f'says, got {len(row)}: {row!r}; give every image its text (quote a field '
                     'that holds a comma), and leave the labels field empty, not out, for an '
                     'unlabelled image')
        continue
      if len(row) != fields:
        problems.add(f'{path}:{line}', f'expected 2 fields (path,labels), got {len(row)}: '
                     f'{row!r}; join the labels with {sep!r} in one field (quote a field that '
                     'holds a comma), and end an unlabelled image\'s row with a comma (a text '
                     'column needs the header row path,labels,text)')
        continue
      field = row[1].strip()
      names = field.split() if sep.isspace() else [n.strip() for n in field.split(sep)]
      yield line, row[0].strip(), names if field else [], row[2] if fields == 3 else None
  except csv.Error as e:
    problems.add(f'{path}:{reader.line_num}', f'malformed CSV ({e}); a quoted field must end '
                 'with its closing quote')


def _jsonl_rows(path: str, text: str,
                problems: _Problems) -> Iterator[tuple[int, str, list[Any], Any]]:
  """(line, image path, labels, text or None) of each line {"path": ..., "labels": [...][,
  "text": ...]} of a JSONL file."""
  for line, entry in enumerate(text.split('\n'), 1):
    if not entry.strip():
      continue
    try:
      obj = json.loads(entry)
    except json.JSONDecodeError as e:
      problems.add(f'{path}:{line}', f'invalid JSON ({e.msg}, column {e.colno}); expected '
                   '{"path": "dir/image.jpg", "labels": ["cat", "dog"]}')
      continue
    if (not isinstance(obj, dict) or not isinstance(obj.get('path'), str) or
        not isinstance(obj.get('labels'), list)):
      problems.add(f'{path}:{line}', 'expected an object with "path" (a string) and "labels" '
                   '(a list of class names or ids), e.g. {"path": "dir/image.jpg", "labels": '
                   f'["cat", "dog"]}}; got {entry.strip()[:80]}')
      continue
    yield line, obj['path'].strip(), obj['labels'], obj.get('text')


def _text_ok(text: Any, where: str, problems: _Problems) -> Optional[str]:
  """The image's text stripped, or None with a problem noted (not a string, empty, or not
  encodable as UTF-8: a lone surrogate such as JSON's "\\ud800")."""
  if not isinstance(text, str):
    problems.add(where, f'text must be a string, got {json.dumps(text)[:40]}; write the '
                 'image\'s text in quotes, e.g. "text": "a dog on a sofa"')
    return None
  text = text.strip()
  if not text:
    problems.add(where, 'empty text; give every image a non-empty text (its caption), or '
                 'give no image one')
    return None
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    problems.add(where, f'text is not valid Unicode ({e.reason}, character {e.start}); '
                 'fix its escape sequences')
    return None
  return text


def _read_labels_file(path: str, sep: str, problems: _Problems) -> list[_Listed]:
  """The images listed in one labels file (format by extension), checked line by line."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.csv', '.jsonl', '.ndjson'):
    raise LabelsFileError(f'{path}: unknown labels-file extension {ext!r}; use .csv '
                          '(path,labels) or .jsonl ({"path": ..., "labels": [...]}).')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--labels_file {path!r} does not exist.')
  before = len(problems.messages)
  text = _read_text(path, problems)
  rows = list(_csv_rows(path, text, sep, problems) if ext == '.csv' else
              _jsonl_rows(path, text, problems))
  if not rows and len(problems.messages) == before:
    problems.add(f'{path}:1', 'no image listed (the file is empty, or holds only blank lines '
                 'or a header); list one image per line, e.g. photos/0001.jpg,cat|dog')
  texts = [(line, t) for line, _, _, t in rows if t is not None]
  listed = []
  for line, image, labels, image_text in rows:
    where = f'{path}:{line}'
    if texts and image_text is None:
      problems.add(where, f'no "text", but other images of this file have one (first at '
                   f'line {texts[0][0]}); give every image its text, or give no image one')
    elif image_text is not None:
      image_text = _text_ok(image_text, where, problems)
    rel = _relative_image_path(image, where, problems)
    if _labels_ok(labels, where, problems) and rel is not None:
      listed.append(_Listed(where, rel, labels, image_text))
  return listed


def _relative_image_path(image: str, where: str, problems: _Problems) -> Optional[str]:
  """`image` normalised, or None (a problem noted) when empty, absolute or leaving ROOT."""
  rel = os.path.normpath(image) if image else ''
  if not image or os.path.isabs(image) or rel == '..' or rel.startswith('..' + os.sep):
    problems.add(where, f'image path {image!r} must be a non-empty path relative to '
                 '--input_dir, inside it')
    return None
  return rel


def _labels_ok(labels: list[Any], where: str, problems: _Problems) -> bool:
  bad = [k for k in labels
         if not (isinstance(k, str) and k.strip()) and not (
             isinstance(k, int) and not isinstance(k, bool))]
  if bad:
    problems.add(where, f'labels must be non-empty class names or integer class ids; got '
                 f'{bad[:3]!r}')
  return not bad


def _label_ids(item: _Listed, index: dict[str, int], num_classes: int,
               problems: _Problems, names_file: Optional[str]) -> list[int]:
  """The sorted distinct class ids of `item`; unknown names and ids out of range are noted."""
  ids = set()
  for k in item.labels:
    if isinstance(k, int):
      if names_file is None:
        problems.add(item.where, f'integer label {k} needs --class_names_file (the class list '
                     'that ids index into)')
      elif not 0 <= k < num_classes:
        problems.add(item.where, f'class id {k} outside [0, {num_classes}) (K = {num_classes} '
                     f'classes in {names_file})')
      else:
        ids.add(k)
    elif k.strip() not in index:
      problems.add(item.where, f'class {k.strip()!r} is not in {names_file}; add it there or '
                   'fix the label')
    else:
      ids.add(index[k.strip()])
  return sorted(ids)


def _labelled_folder_source(root: str, labels_spec: str, class_names_file: Optional[str],
                            label_sep: str) -> _Source:
  """Images under `root` listed in labels files (see the module docstring), all checked first."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--input_dir {root!r} is not a directory.')
  if not label_sep or label_sep in ',"\n\r':
    raise LabelsFileError(f'--label_sep {label_sep!r} cannot separate labels inside a CSV '
                          'field; use e.g. "|", ";" or " ".')
  problems = _Problems()
  class_names = _read_class_names(class_names_file, problems) if class_names_file else None
  files = _split_files(labels_spec)
  listed = {split: _read_labels_file(path, label_sep, problems) for split, path in files.items()}
  has_text = _check_texts_everywhere(files, listed, problems)
  first = {}  # normalised path -> where first listed
  for item in itertools.chain.from_iterable(listed.values()):
    if item.path in first:
      problems.add(item.where, f'image {item.path!r} already listed at {first[item.path]}; list '
                   'each image once, with all its labels')
    else:
      first[item.path] = item.where
  if class_names is None:
    class_names = class_order({k.strip() for item in itertools.chain.from_iterable(listed.values())
                               for k in item.labels if isinstance(k, str)})
  index = {name: i for i, name in enumerate(class_names)}
  splits = {}
  for split, items in listed.items():
    entries = [(os.path.join(root, it.path), it.where,
                _label_ids(it, index, len(class_names), problems, class_names_file),
                (it.text,) if has_text else ())
               for it in items]

    def read(entries=entries):
      for path, where, ids, text in entries:
        yield f'{where} {path}', functools.partial(_read_file, path, ids, *text)

    num_bytes = sum(os.path.getsize(p) for p, _, _, _ in entries if os.path.isfile(p))
    splits[split] = _Split(len(entries), num_bytes, read)
  problems.raise_if_any()
  named = ', '.join(f'{s}={p}' for s, p in files.items())
  return _Source(f'image folder {os.path.abspath(root)} with labels files {named}'
                 + (', with texts' if has_text else ''), class_names, splits, multi_label=True,
                 has_text=has_text)


def _check_texts_everywhere(files: dict[str, str], listed: dict[str, list[_Listed]],
                            problems: _Problems) -> bool:
  """Whether the dataset has texts: True when the labels files give them; a file without texts
  beside one with them is a problem (named at its first image)."""
  with_text = {s: any(it.text is not None for it in items) for s, items in listed.items()}
  if not any(with_text.values()):
    return False
  example = files[next(s for s, t in with_text.items() if t)]
  for split, items in listed.items():
    if items and not with_text[split]:
      problems.add(items[0].where, f'no texts in this file, but {example} gives its images '
                   'texts; give the images of every split a text (CSV header path,labels,text; '
                   'JSONL key "text"), or give none')
  return True


# ----------------------------------------------------------------------------- mosaics


def class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Source indices of each class, ascending: `mosaic_plan`'s view of a split."""
  order = np.argsort(labels, kind='stable')
  return np.split(order, np.searchsorted(labels[order], np.arange(1, num_classes)))


def mosaic_plan(members: list[np.ndarray], seed: int, split: str,
                i: int) -> tuple[np.ndarray, list[int]]:
  """Mosaic `i` of `split`, whose source images of class c are `members[c]`: (source indices of
  its 4 tiles [top-left, top-right, bottom-left, bottom-right], its sorted distinct classes).

  The rule is in the module docstring; a pure function of (members, seed, split, i).
  """
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), i])
  present = np.array([c for c, m in enumerate(members) if len(m)])
  m = int(rng.integers(1, min(4, len(present)) + 1))
  chosen = rng.choice(present, m, replace=False)
  tile_classes = rng.permutation(np.concatenate([chosen, rng.choice(chosen, 4 - m)]))
  tiles = np.empty(4, np.int64)
  for c in chosen:
    slots = np.flatnonzero(tile_classes == c)
    tiles[slots] = members[c][rng.choice(len(members[c]), len(slots),
                                         replace=len(slots) > len(members[c]))]
  return tiles, sorted(int(c) for c in chosen)


def _mosaic(npz: _Npz, tiles: np.ndarray) -> bytes:
  """The 2x2 grid of the given source images (decoded as RGB by `image_ops.decode`, as the
  trainer decodes them: 16-bit and EXIF-rotated images right too), as PNG."""
  images = [image_ops.decode(npz.blob[npz.offsets[t]:npz.offsets[t + 1]].tobytes(), channels=3)
            for t in tiles]
  shapes = {a.shape for a in images}
  if len(shapes) != 1:
    raise ValueError(f'tiles of different sizes {sorted(shapes)}; a mosaic needs one tile size')
  grid = np.concatenate([np.concatenate(images[:2], 1), np.concatenate(images[2:], 1)], 0)
  return _png(grid)


def _mosaic_fetch(npz: _Npz, tiles: np.ndarray, classes: list[int]) -> tuple[list[int], bytes]:
  return classes, _mosaic(npz, tiles)


def _mosaic_counts(spec: Optional[str], splits: Sequence[str]) -> dict[str, Optional[int]]:
  """--num_mosaics: 'N' (every split) or 'train=N,test=M'; None = as many as source images."""
  counts = dict.fromkeys(splits)
  for entry in (e.strip() for e in (spec or '').split(',') if e.strip()):
    split, sep, n = entry.rpartition('=')
    try:
      value = int(n)
    except ValueError:
      value = -1
    if value < 1 or (sep and split not in counts):
      raise ValueError(f'--num_mosaics entry {entry!r}: use a positive count N or SPLIT=N with '
                       f'SPLIT in {list(counts)}.')
    for s in ([split] if sep else counts):
      counts[s] = value
  return counts


def _mosaic_source(inner: str, input_dir: Optional[str], seed: int,
                   num_mosaics: Optional[str]) -> _Source:
  paths = _npz_paths(inner, input_dir)
  if paths is None:
    raise ValueError(f'--source=mosaic:{inner}: mosaics are built from a packed npz source '
                     '(cifar10_npz, caltech101_npz or npz:...), e.g. --source=mosaic:cifar10_npz.')
  data = _load_npz(paths)
  counts = _mosaic_counts(num_mosaics, list(data))
  class_names = next(iter(data.values())).class_names
  splits = {}
  for split, npz in data.items():
    num = counts[split] or len(npz.labels)
    members = class_members(npz.labels, len(class_names))

    def items(npz=npz, split=split, num=num, members=members):
      for i in range(num):
        tiles, classes = mosaic_plan(members, seed, split, i)
        where = f'mosaic {split}[{i}] of {paths[split]}{tiles.tolist()}'
        yield where, functools.partial(_mosaic_fetch, npz, tiles, classes)

    per_image = (npz.offsets[-1] - npz.offsets[0]) / max(len(npz.labels), 1)
    splits[split] = _Split(num, int(12 * per_image * num), items)  # PNG of 4 tiles: ~3x JPEG
  desc = (f'2x2 mosaics (seed {seed}) of packed-JPEG npz: '
          + ', '.join(f'{s}={os.path.basename(p)}' for s, p in paths.items()))
  extra = {'mosaic': {'seed': seed, 'grid': [2, 2],
                      'tile_order': ['top-left', 'top-right', 'bottom-left', 'bottom-right'],
                      'distinct_classes': 'uniform on 1..min(4, classes in the split)',
                      'sources': paths, 'num_source_images': {s: len(d.labels)
                                                              for s, d in data.items()}}}
  return _Source(desc, class_names, splits, 'png (2x2 mosaics of the decoded source images)',
                 multi_label=True, extra=extra)


def _npz_paths(source: str, input_dir: Optional[str]) -> Optional[dict[str, str]]:
  """split -> npz file of a named or npz:... source; None for other sources."""
  if source in NAMED_NPZ:
    if not input_dir:
      raise ValueError(f'--source={source} needs --input_dir (the folder holding '
                       f'{", ".join(NAMED_NPZ[source].values())}).')
    return {s: os.path.join(input_dir, f) for s, f in NAMED_NPZ[source].items()}
  if not source.startswith('npz:'):
    return None
  paths = {}
  for i, entry in enumerate(e for e in source[4:].split(',') if e):
    split, _, path = entry.rpartition('=')
    if not split:
      if i >= 2:
        raise ValueError('Name the third and later npz files: npz:train=a,test=b,val=c.')
      split = ('train', 'test')[i]
    paths[split] = os.path.join(input_dir, path) if input_dir else path
  if not paths:
    raise ValueError('npz: needs at least one file, e.g. --source=npz:train.npz,test.npz')
  return paths


def make_source(source: str, input_dir: Optional[str] = None,
                tfds_data_dir: Optional[str] = None, image_key: Optional[str] = None,
                label_key: Optional[str] = None, labels_file: Optional[str] = None,
                class_names_file: Optional[str] = None, label_sep: str = '|',
                seed: int = 0, num_mosaics: Optional[str] = None) -> _Source:
  """Parses a --source value (see the module docstring). A labels file is read and checked
  whole here, before anything is written (LabelsFileError naming file:line otherwise)."""
  if labels_file and source != 'folder':
    raise ValueError('--labels_file goes with --source=folder.')
  if class_names_file and source not in ('folder', 'idx'):
    raise ValueError('--class_names_file goes with --source=folder (with --labels_file) or '
                     '--source=idx (a name per label value).')
  if class_names_file and source == 'folder' and not labels_file:
    raise ValueError('--class_names_file needs --labels_file (the class list of its labels).')
  if num_mosaics and not source.startswith('mosaic:'):
    raise ValueError('--num_mosaics goes with --source=mosaic:...')
  if source.startswith('mosaic:'):
    return _mosaic_source(source[len('mosaic:'):], input_dir, seed, num_mosaics)
  paths = _npz_paths(source, input_dir)
  if paths is not None:
    return _npz_source(paths)
  if source == 'folder':
    if not input_dir:
      raise ValueError('--source=folder needs --input_dir=ROOT.')
    if labels_file:
      return _labelled_folder_source(input_dir, labels_file, class_names_file, label_sep)
    return _folder_source(input_dir)
  if source.startswith('tfds:'):
    return _tfds_source(source[5:], tfds_data_dir, image_key, label_key)
  if source == 'idx':
    if not input_dir:
      raise ValueError('--source=idx needs --input_dir (the folder of the idx files).')
    return _idx_source(input_dir, class_names_file)
  raise ValueError(f'Unknown --source {source!r}: use cifar10_npz, caltech101_npz, '
                   'npz:TRAIN[,TEST], folder, idx, tfds:NAME or mosaic:NPZ_SOURCE.')


# ----------------------------------------------------------------------------- writing


def _inspect(image: bytes) -> tuple[str, tuple[int, int, int]]:
  """Fully decodes `image` as training will (8-bit, upright: `image_ops.inspect`); returns
  (format, (h, w, c)) or raises (UnsupportedImageError for 32-bit int / float images)."""
  return image_ops.inspect(image)


def _check(item: tuple[str, Fetch]):
  """(where, label, text, bytes, format, shape, pixel sums, error) for one source item (text:
  None unless the source is captioned); the error says what the bytes are when they are no
  image (empty, or not a format Pillow reads)."""
  where, fetch = item
  label, text = -1, None
  try:
    label, data, *texts = fetch()
    text = texts[0] if texts else None
    if not data:
      return where, label, text, None, None, None, None, 'empty file (0 bytes)'
    fmt, shape, sums = image_ops.pixel_sums(data)
    return where, label, text, data, fmt, shape, sums, None
  except UnidentifiedImageError:
    return (where, label, text, None, None, None, None, f'not an image file Pillow can read '
            f'({len(data)} bytes starting with {bytes(data[:8])!r})')
  except Exception as e:  # pylint: disable=broad-except
    return where, label, text, None, None, None, None, f'{type(e).__name__}: {e}'


def _write_split(split: str, spec: _Split, num_classes: int, num_shards: int, tmp_dir: str,
                 pool: concurrent.futures.Executor, stats: dict[str, Any], log) -> dict[str, Any]:
  """Writes one split's shards into `tmp_dir`; returns its metadata entry."""
  n = spec.num_items
  names = [records.shard_name(split, i, num_shards) for i in range(num_shards)]
  lengths, class_counts = [0] * num_shards, [0] * num_classes
  writer, current, num_bytes, skipped, t0 = None, -1, 0, 0, time.time()
  num_unlabelled = num_labels = max_labels = 0
  results = _ordered_map(pool, _check, spec.items())
  sums = stats['pixel_sums'].setdefault(split, {})
  for k, (where, label, text, data, fmt, shape, pixels, error) in enumerate(results):
    ids = np.atleast_1d(np.asarray(label, np.int64))
    bad = ids[(ids < 0) | (ids >= num_classes)].tolist()
    if error is None and bad:
      error = (f'label {bad[0]}' if len(bad) == 1 else f'labels {bad}') + (
          f' outside [0, {num_classes})')
    if error is not None:
      skipped += 1
      print(f'[prepare_data] skipping {split}[{k}] {where}: {error}', file=sys.stderr)
      if len(stats['skipped']) < _MAX_SKIPPED_LISTED:
        stats['skipped'].append({'split': split, 'index': k, 'source': where, 'error': error})
      continue
    shard = k * num_shards // n  # contiguous blocks: shards concatenate in source order
    while current < shard:
      if writer is not None:
        writer.close()
      current += 1
      writer = ArrayRecordWriter(os.path.join(tmp_dir, names[current]), records.WRITER_OPTIONS)
    writer.write(records.encode_record(label, data, text))
    lengths[shard] += 1
    for i in ids:
      class_counts[i] += 1
    num_labels += len(ids)
    num_unlabelled += len(ids) == 0
    max_labels = max(max_labels, len(ids))
    num_bytes += len(data)
    stats['formats'][fmt] = stats['formats'].get(fmt, 0) + 1
    stats['shapes'].add(shape)
    for c, (total, squares, count) in pixels.items():
      acc = sums.setdefault(c, [0.0, 0.0, 0])
      acc[0], acc[1], acc[2] = acc[0] + total, acc[1] + squares, acc[2] + count
    if (k + 1) % 50000 == 0:
      log(f'  {split}: {k + 1}/{n} ({time.time() - t0:.0f} s)')
  while current < num_shards - 1:  # shards left empty (everything in them skipped)
    if writer is not None:
      writer.close()
    current += 1
    writer = ArrayRecordWriter(os.path.join(tmp_dir, names[current]), records.WRITER_OPTIONS)
  writer.close()
  return {'num_examples': sum(lengths), 'num_skipped': skipped, 'num_bytes': num_bytes,
          'shards': names, 'shard_lengths': lengths, 'class_counts': class_counts,
          'num_labels': num_labels, 'num_unlabelled': num_unlabelled,
          'max_labels_per_image': max_labels}


def _ordered_map(pool, fn, items: Iterator, chunk: int = 256) -> Iterator:
  """`map(fn, items)` computed by `pool`, in order, holding ~2 chunks in flight."""
  items = iter(items)
  pending = pool.map(fn, list(itertools.islice(items, chunk)))
  while True:
    batch = list(itertools.islice(items, chunk))
    nxt = pool.map(fn, batch) if batch else None
    yield from pending
    if nxt is None:
      return
    pending = nxt


def _replace_dataset(out_dir: str, tmp_dir: str) -> None:
  """Moves the shards of `tmp_dir` into `out_dir` in place of any older dataset there."""
  meta_path = os.path.join(out_dir, records.METADATA_FILE)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # from here until the end `out_dir` reads as "not prepared"
  for name in os.listdir(out_dir):
    if _SHARD_RE.match(name) and os.path.isfile(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  for name in os.listdir(tmp_dir):
    if name != records.METADATA_FILE:
      os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
  os.replace(os.path.join(tmp_dir, records.METADATA_FILE), meta_path)  # the commit point


def default_num_shards(num_items: int, num_bytes: int, shard_records: int = SHARD_RECORDS) -> int:
  """Shards for a split of `num_items` images of `num_bytes` in all: enough that none holds
  more than ~256 MiB or more than `shard_records` records."""
  if shard_records < 1:
    raise ValueError(f'shard_records must be >= 1, got {shard_records}.')
  return max(1, math.ceil(num_bytes / _SHARD_BYTES), math.ceil(num_items / shard_records))


def prepare(source: str, out_dir: str, *, input_dir: Optional[str] = None,
            num_shards: Optional[int] = None, shard_records: int = SHARD_RECORDS, tfds_data_dir: Optional[str] = None,
            image_key: Optional[str] = None, label_key: Optional[str] = None,
            splits: Optional[Sequence[str]] = None, num_workers: Optional[int] = None,
            labels_file: Optional[str] = None, class_names_file: Optional[str] = None,
            label_sep: str = '|', seed: int = 0, num_mosaics: Optional[str] = None,
            holdout_split: Optional[str] = None, holdout_fraction: float = 0.1,
            holdout_from: str = 'train', verbose: bool = True) -> dict[str, Any]:
  """Writes the ArrayRecord dataset of `source` (see module docstring) to `out_dir`.

  `holdout_split` makes a new split of a seeded `holdout_fraction` of split `holdout_from`
  (`_hold_out`). `num_shards` applies to every split (default `default_num_shards`: at most
  ~256 MiB and `shard_records` records each). Any dataset already in
  `out_dir` is replaced as a whole (other files there are left alone). Returns the metadata.
  The other arguments are the command-line flags of the same names. Raises LabelsFileError
  (file:line of every problem) for unusable labels input, ValueError / FileNotFoundError for
  other bad arguments, before `out_dir` is touched.
  """
  log = (lambda msg: print(msg, flush=True)) if verbose else (lambda msg: None)
  t0 = time.time()
  src = make_source(source, input_dir, tfds_data_dir, image_key, label_key, labels_file,
                    class_names_file, label_sep, seed, num_mosaics)
  if splits:
    unknown = set(splits) - set(src.splits)
    if unknown:
      raise ValueError(f'Splits {sorted(unknown)} not in the source; it has {list(src.splits)}.')
    src.splits = {s: src.splits[s] for s in splits}
  if holdout_split:
    _hold_out(src, holdout_split, holdout_fraction, holdout_from, seed)
  empty = [s for s, spec in src.splits.items() if spec.num_items == 0]
  for s in empty:
    print(f'[prepare_data] split {s!r} has no images; leaving it out.', file=sys.stderr)
    del src.splits[s]
  if not src.splits:
    raise ValueError(f'No images found in {src.description}.')
  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}.')
  default_num_shards(1, 0, shard_records)   # checks shard_records

  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):  # leftovers of interrupted runs
    if name.startswith(_TMP_PREFIX):
      shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
  tmp_dir = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir)
  stats = {'skipped': [], 'formats': {}, 'shapes': set(), 'pixel_sums': {}}
  try:
    workers = num_workers or min(8, os.cpu_count() or 1)
    split_meta = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # Pillow decodes without the GIL
      for split, spec in src.splits.items():
        t = time.time()
        shards = num_shards or default_num_shards(spec.num_items, spec.num_bytes,
                                                  shard_records)
        shards = min(shards, spec.num_items)
        split_meta[split] = _write_split(split, spec, len(src.class_names), shards, tmp_dir,
                                         pool, stats, log)
        log(f'  {split}: {split_meta[split]["num_examples"]} examples in {shards} shard(s), '
            f'{time.time() - t:.1f} s')
    shapes = stats['shapes']
    meta = {
        'source': src.description,
        'record_format': records.TEXT_RECORD_FORMAT if src.has_text else records.RECORD_FORMAT,
        **({'format_version': records.TEXT_FORMAT_VERSION, 'has_text': True}
           if src.has_text else {}),   # without texts: the metadata as before version 3
        'multi_label': src.multi_label,
        'max_labels_per_image': (max(m['max_labels_per_image'] for m in split_meta.values())
                                 if src.multi_label else 1),
        'encoding': src.encoding,
        'class_names': src.class_names,
        'num_classes': len(src.class_names),
        'image_size': list(next(iter(shapes))) if len(shapes) == 1 else None,
        'channels': sorted({shape[2] for shape in shapes}),
        'pixel_stats': _pixel_stats(stats['pixel_sums'].get(
            'train' if 'train' in split_meta else next(iter(split_meta)), {})),
        'class_order': 'numeric' if _numeric(src.class_names) else 'sorted names, or as given',
        'warnings': _class_warnings(src.class_names, split_meta),
        'image_formats': dict(sorted(stats['formats'].items())),
        'splits': split_meta,
        'num_skipped': sum(m['num_skipped'] for m in split_meta.values()),
        'skipped': stats['skipped'],
        **src.extra,
    }
    records.write_metadata(tmp_dir, meta)
    _replace_dataset(out_dir, tmp_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  meta = records.read_metadata(out_dir)
  _summary(meta, out_dir, time.time() - t0, log)
  return meta


def _hold_out(src: _Source, name: str, fraction: float, from_split: str, seed: int) -> None:
  """Moves a seeded `fraction` of split `from_split` into a new split `name`. Stratified when
  the source knows each item's class without reading it (folders, npz, idx): of a class with
  n images, round(fraction * n) go, at least 1 and at most n - 1 when n >= 2 (a class with
  one image stays in `from_split`); otherwise round(fraction * N) items drawn uniformly.
  Both splits keep the source order. Draws: np.random.default_rng(seed), classes in id order."""
  if not 0 < fraction < 1:
    raise ValueError(f'--holdout_fraction must be in (0, 1), got {fraction}.')
  if name in src.splits:
    raise ValueError(f'--holdout_split={name}: the source already has a split {name!r} '
                     f'({list(src.splits)}); hold out a new name or leave the flag out.')
  if from_split not in src.splits:
    raise ValueError(f'--holdout_from={from_split}: no such split in the source; it has '
                     f'{list(src.splits)}.')
  spec = src.splits[from_split]
  items = list(spec.items())
  rng = np.random.default_rng(seed)
  held = np.zeros(len(items), bool)
  if spec.labels is not None and not src.multi_label:
    labels = np.asarray(spec.labels)
    for k in np.unique(labels):
      idx = np.flatnonzero(labels == k)
      n = len(idx)
      take = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
      held[rng.permutation(idx)[:take]] = True
  else:
    held[rng.permutation(len(items))[:round(fraction * len(items))]] = True

  def part(mask: np.ndarray) -> _Split:
    chosen = [item for item, m in zip(items, mask) if m]
    labels = None if spec.labels is None else [l for l, m in zip(spec.labels, mask) if m]
    return _Split(len(chosen), int(spec.num_bytes * len(chosen) / max(len(items), 1)),
                  lambda chosen=chosen: iter(chosen), labels)

  src.splits[from_split], src.splits[name] = part(~held), part(held)
  src.extra['holdout'] = {'split': name, 'from': from_split, 'fraction': fraction, 'seed': seed,
                          'stratified': spec.labels is not None and not src.multi_label}


def _numeric(names: Sequence[str]) -> bool:
  return bool(names) and all(re.fullmatch(r'[+-]?\d+', n) for n in names)


def _pixel_stats(sums: dict) -> dict[str, Any]:
  """{'1' | '3': {'mean': [c], 'std': [c]}} of the decoded pixels (in [0, 1]) from summed
  pixel values (`image_ops.pixel_sums`): what training normalises with by default."""
  out = {}
  for c, (total, squares, count) in sorted(sums.items()):
    mean = np.asarray(total) / max(count, 1)
    std = np.sqrt(np.maximum(np.asarray(squares) / max(count, 1) - mean ** 2, 0.0))
    out[str(c)] = {'mean': [round(float(v), 6) for v in mean],
                   'std': [round(float(v), 6) for v in std]}
  return out


TINY_CLASS = 5  # fewer training images than this: warned about


def _class_warnings(class_names: Sequence[str], split_meta: dict[str, Any]) -> list[str]:
  """Classes with no images at all, with fewer than TINY_CLASS training images, or missing
  from a split that other splits have them in."""
  def named(ids, counts=None):
    shown = [f'{class_names[k]!r}' + (f' ({counts[k]})' if counts else '') for k in ids[:10]]
    return ', '.join(shown) + (f' and {len(ids) - 10} more' if len(ids) > 10 else '')

  counts = {s: np.asarray(m['class_counts']) for s, m in split_meta.items()}
  total = sum(counts.values())
  out = []
  empty = np.flatnonzero(total == 0).tolist()
  if empty:
    out.append(f'{len(empty)} class(es) have no images at all: {named(empty)}')
  train = 'train' if 'train' in counts else next(iter(counts))
  tiny = np.flatnonzero((counts[train] > 0) & (counts[train] < TINY_CLASS)).tolist()
  if tiny:
    out.append(f'{len(tiny)} class(es) have fewer than {TINY_CLASS} images in split '
               f'{train!r}: {named(tiny, counts[train].tolist())}')
  for split, c in counts.items():
    missing = np.flatnonzero((c == 0) & (total > 0)).tolist()
    if missing:
      out.append(f'split {split!r} has no images of {len(missing)} class(es) that other splits '
                 f'have: {named(missing)}')
  return out


def _summary(meta: dict[str, Any], out_dir: str, seconds: float, log) -> None:
  log(f'Prepared {out_dir} from {meta["source"]} in {seconds:.1f} s')
  log(f'  classes: {meta["num_classes"]}; image size: {meta["image_size"] or "mixed"}; '
      f'formats: {meta["image_formats"]}; encoding: {meta["encoding"]}')
  names = meta['class_names']
  order = [f'{i}: {n}' for i, n in enumerate(names)]
  if len(order) > 16:
    order = order[:10] + ['...'] + order[-5:]
  log(f'  class ids ({meta.get("class_order", "as given")}): {", ".join(order)}')
  if meta['has_text']:
    log(f'  texts: every image has its own (record format {meta["format_version"]}); for the '
        f'locked text tower embed them once: python -m launch.prepare_text --data_dir={out_dir}')
  if 'holdout' in meta:
    h = meta['holdout']
    log(f'  held out {h["split"]!r}: {h["fraction"]:g} of {h["from"]!r}, seed {h["seed"]}'
        f'{", stratified by class" if h["stratified"] else ""}')
  for split, m in meta['splits'].items():
    disk = sum(os.path.getsize(os.path.join(out_dir, s)) for s in m['shards'])
    log(f'  {split:>10}: {m["num_examples"]:>9,} examples, {m["num_skipped"]} skipped, '
        f'{m["num_bytes"] / 2**20:,.1f} MiB of images, {disk / 2**20:,.1f} MiB on disk, '
        f'{len(m["shards"])} shard(s)')
    if meta['multi_label']:
      log(f'  {"":>10}  {m["num_labels"]:,} labels, {m["num_unlabelled"]:,} unlabelled, '
          f'at most {m["max_labels_per_image"]} per image')
  if meta['num_skipped']:
    log(f'  skipped {meta["num_skipped"]} undecodable image(s); see "skipped" in metadata.json')
  for warning in meta.get('warnings', ()):
    print(f'[prepare_data] warning: {warning}', file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m launch.prepare_data', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', required=True,
                      help='cifar10_npz | caltech101_npz | npz:TRAIN[,TEST] | folder | idx | '
                      'tfds:NAME | mosaic:NPZ_SOURCE')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--input_dir', help='folder of the npz files, or root of an image folder')
  parser.add_argument('--num_shards', type=int, help='shards per split (default: at most '
                      '~256 MiB and --shard_records records each)')
  parser.add_argument('--shard_records', type=int, default=SHARD_RECORDS,
                      help=f'most records per shard when --num_shards is not given (default '
                      f'{SHARD_RECORDS:,})')
  parser.add_argument('--tfds_data_dir', help='TFDS data_dir (for tfds:NAME)')
  parser.add_argument('--image_key', help='TFDS image feature (default: image)')
  parser.add_argument('--label_key', help='TFDS label feature (default: label)')
  parser.add_argument('--splits', help='comma-separated subset of the splits to write')
  parser.add_argument('--num_workers', type=int, help='decode-check threads')
  parser.add_argument('--labels_file', help='folder: FILE.csv|FILE.jsonl (train) or '
                      'train=a.csv,test=b.jsonl (multi-label; with a text per image: CSV header '
                      'path,labels,text, JSONL key "text")')
  parser.add_argument('--class_names_file', help='folder + labels, or idx: one class name per '
                      'line (class id = line number - 1)')
  parser.add_argument('--label_sep', default='|', help="CSV labels separator (default '|')")
  parser.add_argument('--seed', type=int, default=0, help='mosaic, --holdout_split: seed of '
                      'every draw')
  parser.add_argument('--num_mosaics', help='mosaic: N per split or train=N,test=M '
                      '(default: as many as source images)')
  parser.add_argument('--holdout_split', help='make this new split from a seeded fraction of '
                      '--holdout_from (stratified by class; seed --seed)')
  parser.add_argument('--holdout_fraction', type=float, default=0.1,
                      help='fraction held out (default 0.1)')
  parser.add_argument('--holdout_from', default='train', help='split to hold out from')
  args = parser.parse_args(argv)
  try:
    prepare(args.source, args.out, input_dir=args.input_dir, num_shards=args.num_shards,
            shard_records=args.shard_records,
            tfds_data_dir=args.tfds_data_dir, image_key=args.image_key,
            label_key=args.label_key, splits=args.splits.split(',') if args.splits else None,
            num_workers=args.num_workers, labels_file=args.labels_file,
            class_names_file=args.class_names_file, label_sep=args.label_sep, seed=args.seed,
            num_mosaics=args.num_mosaics, holdout_split=args.holdout_split,
            holdout_fraction=args.holdout_fraction, holdout_from=args.holdout_from)
  except (ValueError, FileNotFoundError) as e:
    # Bad input, not a bug: the message says what is wrong and where; no traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
