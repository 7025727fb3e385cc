"""The on-disk format of the project's ArrayRecord image datasets.

A prepared dataset is a directory holding

  <split>.array_record-00000-of-0000N   shards; a record is `encode_record(label, image)`
  metadata.json                         class names, splits and their shards, image size...

A record is `struct.pack('<i', label) + image`, where `image` is the encoded file (JPEG, PNG)
exactly as it came from the source. Records of a split are the concatenation of its shards in
the order listed in the metadata. Build such a directory with `python -m launch.prepare_data`.
"""
import json
import os
import struct
from typing import Any

FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: cheap random access
_LABEL = struct.Struct('<i')

_HOW_TO_PREPARE = (
    'Create it with the preparation command, e.g.\n'
    '  python -m launch.prepare_data --source=cifar10_npz --input_dir=../shared/data --out={dir}\n'
    '  python -m launch.prepare_data --source=folder --input_dir=/path/to/images --out={dir}\n'
    '(see `python -m launch.prepare_data --help` for all sources).')


def encode_record(label: int, image: bytes) -> bytes:
  """`struct.pack('<i', label) + image`."""
  return _LABEL.pack(label) + bytes(image)


def decode_record(record: bytes) -> tuple[int, bytes]:
  """Inverse of `encode_record`: (label, encoded image bytes)."""
  if len(record) < _LABEL.size:
    raise ValueError(f'Record of {len(record)} bytes is too short to hold a label.')
  return _LABEL.unpack_from(record)[0], bytes(record[_LABEL.size:])


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


def read_metadata(data_dir: str) -> dict[str, Any]:
  """Reads `data_dir/metadata.json`; FileNotFoundError saying how to prepare it if missing."""
  data_dir = os.fspath(data_dir)
  path = os.path.join(data_dir, METADATA_FILE)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'No prepared dataset: directory {data_dir!r} does not exist. '
                            + _HOW_TO_PREPARE.format(dir=data_dir))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'No prepared dataset in {data_dir!r}: {METADATA_FILE} is missing (never prepared, '
        'or an interrupted preparation). ' + _HOW_TO_PREPARE.format(dir=data_dir))
  with open(path) as f:
    meta = json.load(f)
  version = meta.get('format_version')
  if version != FORMAT_VERSION:
    raise ValueError(f'{path}: format_version {version!r}, expected {FORMAT_VERSION}. '
                     'Re-run the preparation command.')
  return meta


def split_paths(data_dir: str, split: str) -> list[str]:
  """Paths of the shards of `split`, in record order."""
  meta = read_metadata(data_dir)
  if split not in meta['splits']:
    raise KeyError(f'Split {split!r} not in {data_dir!r}; it has {sorted(meta["splits"])}.')
  paths = [os.path.join(os.fspath(data_dir), name) for name in meta['splits'][split]['shards']]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'Shards listed in {METADATA_FILE} are missing: {missing[:3]}... '
                            + _HOW_TO_PREPARE.format(dir=data_dir))
  return paths
