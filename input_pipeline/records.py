"""The on-disk format of the project's ArrayRecord image datasets.

A prepared dataset is a directory holding

  <split>.array_record-00000-of-0000N   shards; a record is `encode_record(labels, image)`
  metadata.json                         class names, splits and their shards, image size,
                                        whether the dataset is multi-label...

Format version 2 (written now): a record is

  struct.pack('<H', n) + n little-endian int32 class ids + image

so an image carries 0, 1 or many labels (a multi-label dataset such as JFT or the mosaic
benchmark); `image` is the encoded file (JPEG, PNG) exactly as it came from the source.
Version 1 (`struct.pack('<i', label) + image`, one label per image) is still read. Records of
a split are the concatenation of its shards in the order listed in the metadata, whose
`format_version` says how to decode them. Build such a directory with
`python -m launch.prepare_data`.
"""
import json
import os
import struct
from typing import Any, Sequence

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
RECORD_FORMAT = "struct.pack('<H', n) + n int32 class ids (little-endian) + encoded image bytes"
METADATA_FILE = 'metadata.json'
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: cheap random access
MAX_LABELS = 65535
_COUNT = struct.Struct('<H')
_V1_LABEL = struct.Struct('<i')

_HOW_TO_PREPARE = (
    'Create it with the preparation command, e.g.\n'
    '  python -m launch.prepare_data --source=folder --input_dir=/path/to/images --out={dir}\n'
    '  python -m launch.prepare_data --source=idx --input_dir=/path/to/mnist_files --out={dir}\n'
    '(see `python -m launch.prepare_data --help` for all sources).')


def encode_record(labels: int | Sequence[int], image: bytes) -> bytes:
  """A version-2 record of one class id or a set of them (0 to 65,535 ids) and the image."""
  ids = np.atleast_1d(np.asarray(labels, dtype='<i4'))
  if ids.ndim != 1 or len(ids) > MAX_LABELS:
    raise ValueError(f'a record holds a flat list of at most {MAX_LABELS} class ids, got '
                     f'shape {ids.shape}')
  return _COUNT.pack(len(ids)) + ids.tobytes() + bytes(image)


def decode_record(record: bytes, version: int = FORMAT_VERSION) -> tuple[np.ndarray, bytes]:
  """Inverse of `encode_record` for a dataset of `version`: (class ids int32 [n], image bytes)."""
  if version == 1:
    if len(record) < _V1_LABEL.size:
      raise ValueError(f'Record of {len(record)} bytes is too short to hold a label.')
    return np.array([_V1_LABEL.unpack_from(record)[0]], np.int32), bytes(record[_V1_LABEL.size:])
  if version != 2:
    raise ValueError(f'record format version {version!r} unknown; readable: {READABLE_VERSIONS}')
  if len(record) < _COUNT.size:
    raise ValueError(f'Record of {len(record)} bytes is too short to hold its label count.')
  (n,) = _COUNT.unpack_from(record)
  end = _COUNT.size + 4 * n
  if len(record) < end:
    raise ValueError(f'Record of {len(record)} bytes is too short for its {n} labels.')
  ids = np.frombuffer(record, dtype='<i4', count=n, offset=_COUNT.size).astype(np.int32)
  return ids, bytes(record[end:])


def shard_name(split: str, index: int, num_shards: int) -> str:
  """File name of shard `index` of `num_shards` of `split`."""
  return f'{split}.array_record-{index:05d}-of-{num_shards:05d}'


def write_metadata(data_dir: str, meta: dict[str, Any]) -> None:
  """Writes `meta` to `data_dir/metadata.json` atomically (temp file, then rename)."""
  meta = {'format_version': FORMAT_VERSION, **meta}
  path = os.path.join(data_dir, METADATA_FILE)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


def read_metadata(data_dir: str, how_to_prepare: str | None = None) -> dict[str, Any]:
  """Reads `data_dir/metadata.json`; FileNotFoundError saying how to prepare it if missing
  (`how_to_prepare`, or the generic preparation commands)."""
  data_dir = os.fspath(data_dir)
  path = os.path.join(data_dir, METADATA_FILE)
  hint = how_to_prepare or _HOW_TO_PREPARE.format(dir=data_dir)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'No prepared dataset: directory {data_dir!r} does not exist. '
                            + hint)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'No prepared dataset in {data_dir!r}: {METADATA_FILE} is missing (never prepared, '
        'or an interrupted preparation). ' + hint)
  with open(path) as f:
    meta = json.load(f)
  version = meta.get('format_version')
  if version not in READABLE_VERSIONS:
    raise ValueError(f'{path}: format_version {version!r}, this version of the code reads '
                     f'{READABLE_VERSIONS}. Re-run the preparation command.')
  meta.setdefault('multi_label', False)            # version 1: one label per image
  meta.setdefault('max_labels_per_image', 1)
  return meta


def split_paths(data_dir: str, split: str) -> list[str]:
  """Paths of the shards of `split`, in record order."""
  meta = read_metadata(data_dir)
  if split not in meta['splits']:
    raise FileNotFoundError(
        f'Split {split!r} is not in prepared dataset {os.fspath(data_dir)!r}, which has '
        f'{sorted(meta["splits"])}: use one of them, or re-prepare with --holdout_split={split} '
        '--holdout_fraction=0.1 to hold one out of the training split.')
  paths = [os.path.join(os.fspath(data_dir), name) for name in meta['splits'][split]['shards']]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'Shards listed in {METADATA_FILE} are missing: {missing[:3]}... '
                            + _HOW_TO_PREPARE.format(dir=data_dir))
  return paths
