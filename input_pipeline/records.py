"""The on-disk format of the project's ArrayRecord image datasets.

A prepared dataset is a directory holding

  <split>.array_record-00000-of-0000N   shards; a record is `encode_record(labels, image[, text])`
  metadata.json                         class names, splits and their shards, image size,
                                        whether the dataset is multi-label, has texts...

Format version 2 (a dataset without texts; written by every source but a captioned labels
file): a record is

  struct.pack('<H', n) + n little-endian int32 class ids + image

so an image carries 0, 1 or many labels (a multi-label dataset such as JFT or the mosaic
benchmark); `image` is the encoded file (JPEG, PNG) exactly as it came from the source.
Format version 3 (a captioned dataset: every image has its own text, e.g. an alt-text or a
caption for image-text training) is version 2 with the text between the ids and the image:

  struct.pack('<H', n) + n int32 class ids + struct.pack('<I', t) + t bytes of UTF-8 text + image

A dataset is all version 2 or all version 3 (every record has a text; `launch.prepare_data`
refuses an empty one); metadata.json says which (`format_version`, and `has_text: true` for
version 3; a dataset without texts has no `has_text` key, so it is byte for byte what it was
before version 3 existed). Version 1
(`struct.pack('<i', label) + image`, one label per image) is still read. Records of a split are
the concatenation of its shards in the order listed in the metadata, whose `format_version`
says how to decode them. Build such a directory with `python -m launch.prepare_data`.
"""
import json
import os
import struct
from typing import Any, Sequence

import numpy as np

FORMAT_VERSION = 2        # written for a dataset without texts
TEXT_FORMAT_VERSION = 3   # written for a dataset whose every image has its own text
READABLE_VERSIONS = (1, 2, 3)
RECORD_FORMAT = "struct.pack('<H', n) + n int32 class ids (little-endian) + encoded image bytes"
TEXT_RECORD_FORMAT = ("struct.pack('<H', n) + n int32 class ids (little-endian) + "
                      "struct.pack('<I', t) + t bytes of UTF-8 text + encoded image bytes")
METADATA_FILE = 'metadata.json'
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: cheap random access
MAX_LABELS = 65535
_COUNT = struct.Struct('<H')
_V1_LABEL = struct.Struct('<i')
_TEXT_LENGTH = struct.Struct('<I')

_HOW_TO_PREPARE = (
    'Create it with the preparation command, e.g.\n'
    '  python -m launch.prepare_data --source=folder --input_dir=/path/to/images --out={dir}\n'
    '  python -m launch.prepare_data --source=idx --input_dir=/path/to/mnist_files --out={dir}\n'
    '(see `python -m launch.prepare_data --help` for all sources).')


def encode_record(labels: int | Sequence[int], image: bytes, text: str | None = None) -> bytes:
  """A record of one class id or a set of them (0 to 65,535 ids), the image and, for a
  captioned dataset, its text: version 2 when `text` is None, else version 3 (`text` stored as
  UTF-8; a str that does not encode, e.g. a lone surrogate, raises UnicodeEncodeError)."""
  ids = np.atleast_1d(np.asarray(labels, dtype='<i4'))
  if ids.ndim != 1 or len(ids) > MAX_LABELS:
    raise ValueError(f'a record holds a flat list of at most {MAX_LABELS} class ids, got '
                     f'shape {ids.shape}')
  head = _COUNT.pack(len(ids)) + ids.tobytes()
  if text is None:
    return head + bytes(image)
  data = text.encode('utf-8')
  return head + _TEXT_LENGTH.pack(len(data)) + data + bytes(image)


def decode_record(record: bytes, version: int = FORMAT_VERSION) -> tuple[np.ndarray, bytes]:
  """Inverse of `encode_record` for a dataset of `version`: (class ids int32 [n], image bytes);
  a version-3 record's text is left out (`decode_record_text` returns it)."""
  return decode_record_text(record, version)[:2]


def decode_record_text(record: bytes,
                       version: int = FORMAT_VERSION) -> tuple[np.ndarray, bytes, str | None]:
  """(class ids int32 [n], image bytes, text) of a record of a dataset of `version`; the text
  is None for versions 1 and 2. ValueError for a truncated record or an unknown version."""
  if version == 1:
    if len(record) < _V1_LABEL.size:
      raise ValueError(f'Record of {len(record)} bytes is too short to hold a label.')
    return (np.array([_V1_LABEL.unpack_from(record)[0]], np.int32),
            bytes(record[_V1_LABEL.size:]), None)
  if version not in (FORMAT_VERSION, TEXT_FORMAT_VERSION):
    raise ValueError(f'record format version {version!r} unknown; readable: {READABLE_VERSIONS}')
  if len(record) < _COUNT.size:
    raise ValueError(f'Record of {len(record)} bytes is too short to hold its label count.')
  (n,) = _COUNT.unpack_from(record)
  end = _COUNT.size + 4 * n
  if len(record) < end:
    raise ValueError(f'Record of {len(record)} bytes is too short for its {n} labels.')
  ids = np.frombuffer(record, dtype='<i4', count=n, offset=_COUNT.size).astype(np.int32)
  if version == FORMAT_VERSION:
    return ids, bytes(record[end:]), None
  if len(record) < end + _TEXT_LENGTH.size:
    raise ValueError(f'Record of {len(record)} bytes is too short to hold its text length.')
  (t,) = _TEXT_LENGTH.unpack_from(record, end)
  start = end + _TEXT_LENGTH.size
  if len(record) < start + t:
    raise ValueError(f'Record of {len(record)} bytes is too short for its {t}-byte text.')
  return ids, bytes(record[start + t:]), bytes(record[start:start + t]).decode('utf-8')


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
  meta.setdefault('has_text', version == TEXT_FORMAT_VERSION)
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
