"""Builds the project's ArrayRecord image datasets (format: `input_pipeline.records`).

  python -m launch.prepare_data --source=SOURCE --out=DIR [--num_shards=N]

Sources:
  cifar10_npz / caltech101_npz   packed-JPEG npz files in --input_dir (train and test)
  npz:TRAIN.npz[,TEST.npz]       packed-JPEG npz files (keys blob, offsets, labels, class_names);
                                 entries may also be named: npz:train=a.npz,val=b.npz
  folder --input_dir=ROOT        ROOT/<split>/<class>/<file>, or ROOT/<class>/<file> as 'train'
  tfds:NAME --tfds_data_dir=D    a TFDS dataset already on disk (array_record file format)

Images are stored byte-for-byte as they come (never re-encoded; except TFDS images that are only
available decoded, which become lossless PNG), after checking that each one decodes; those that
do not are reported and skipped. Shards are written to a temp dir inside DIR and moved in place
when all are complete, metadata.json last (the old one is removed first), so a reader of DIR sees
the old dataset, the new one, or none (no metadata.json), never a mix.
"""
import argparse
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from input_pipeline import records

NAMED_NPZ = {
    'cifar10_npz': {'train': 'cifar10_train_jpegq75.npz', 'test': 'cifar10_test_jpegq75.npz'},
    'caltech101_npz': {'train': 'caltech101_train_64px_jpegq90.npz',
                       'test': 'caltech101_test_64px_jpegq90.npz'},
}
_SHARD_BYTES = 256 << 20  # target shard size when --num_shards is not given
_MAX_SKIPPED_LISTED = 1000
_TMP_PREFIX = '.prepare-tmp-'
_SHARD_RE = re.compile(r'.+\.array_record-\d{5}-of-\d{5}$')

Fetch = Callable[[], tuple[int, bytes]]  # reads one example: (label, encoded image)


@dataclasses.dataclass
class _Split:
  num_items: int
  num_bytes: int  # estimate, for the default number of shards
  items: Callable[[], Iterator[tuple[str, Fetch]]]  # (where it comes from, reader), in order


@dataclasses.dataclass
class _Source:
  description: str
  class_names: list[str]
  splits: dict[str, _Split]
  encoding: str = 'original bytes'


# ----------------------------------------------------------------------------- sources


def _npz_source(paths: dict[str, str]) -> _Source:
  splits, class_names = {}, None
  for split, path in paths.items():
    with np.load(path, allow_pickle=False) as d:
      names = [str(c) for c in d['class_names']]
      blob, offsets, labels = d['blob'], d['offsets'].astype(np.int64), d['labels'].astype(int)
      where = ([f'{path}:{p}' for p in d['paths']] if 'paths' in d.files else None)
    if len(offsets) != len(labels) + 1:
      raise ValueError(f'{path}: {len(offsets)} offsets for {len(labels)} labels.')
    if class_names is None:
      class_names = names
    elif names != class_names:
      raise ValueError(f'{path}: class_names differ from those of the other npz files.')

    def items(blob=blob, offsets=offsets, labels=labels, where=where, path=path):
      for i, label in enumerate(labels):
        fetch = functools.partial(_slice_bytes, blob, int(offsets[i]), int(offsets[i + 1]),
                                  int(label))
        yield (where[i] if where else f'{path}[{i}]'), fetch

    splits[split] = _Split(len(labels), int(offsets[-1] - offsets[0]), items)
  desc = 'packed-JPEG npz: ' + ', '.join(f'{s}={os.path.basename(p)}' for s, p in paths.items())
  return _Source(desc, class_names, splits)


def _slice_bytes(blob: np.ndarray, start: int, end: int, label: int) -> tuple[int, bytes]:
  return label, blob[start:end].tobytes()


def _read_file(path: str, label: int) -> tuple[int, bytes]:
  with open(path, 'rb') as f:
    return label, f.read()


def _visible(root: str) -> list[str]:
  return sorted(n for n in os.listdir(root) if not n.startswith('.'))


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
  class_names = sorted(set(itertools.chain.from_iterable(files.values())))
  index = {c: i for i, c in enumerate(class_names)}
  splits = {}
  for split, by_class in files.items():
    paths = [(os.path.join(split_dirs[split], c, f), index[c])
             for c in sorted(by_class) for f in by_class[c]]

    def items(paths=paths):
      for path, label in paths:
        yield path, functools.partial(_read_file, path, label)

    num_bytes = sum(os.path.getsize(p) for p, _ in paths)
    splits[split] = _Split(len(paths), num_bytes, items)
  layout = '<split>/<class>/<file>' if nested else '<class>/<file> (one split: train)'
  return _Source(f'image folder {os.path.abspath(root)} ({layout})', class_names, splits)


def _tfds_source(name: str, data_dir: Optional[str], image_key: Optional[str],
                 label_key: Optional[str]) -> _Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared under {builder.data_dir!r}; '
                            'this command does not download.')
  features = builder.info.features
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  image_key = image_key or ('image' if 'image' in images else (images or [None])[0])
  label_key = label_key or ('label' if 'label' in labels else (labels or [None])[0])
  if image_key is None or label_key is None:
    raise ValueError(f'{name}: need an Image and a ClassLabel feature (top level); found '
                     f'{list(features)}. Pass --image_key/--label_key.')
  class_names = list(features[label_key].names)
  raw = builder.as_data_source(decoders={image_key: tfds.decode.SkipDecoding()})
  probe = next((raw[s][0][image_key] for s in raw if len(raw[s])), None)
  reencode = not _decodes(probe)
  sources = builder.as_data_source() if reencode else raw

  def fetch(ds, i: int) -> tuple[int, bytes]:
    ex = ds[i]
    image = _png(np.asarray(ex[image_key])) if reencode else bytes(ex[image_key])
    return int(ex[label_key]), image

  splits = {}
  for split, ds in sources.items():

    def items(ds=ds, split=split):
      for i in range(len(ds)):
        yield f'tfds:{name}/{split}[{i}]', functools.partial(fetch, ds, i)

    splits[split] = _Split(len(ds), int(builder.info.splits[split].num_bytes or 0), items)
  encoding = ('png (re-encoded losslessly from the decoded TFDS images)' if reencode
              else 'original bytes')
  desc = f'tfds {builder.info.full_name} from {builder.data_dir} ({image_key}, {label_key})'
  return _Source(desc, class_names, splits, encoding)


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


def make_source(source: str, input_dir: Optional[str] = None,
                tfds_data_dir: Optional[str] = None, image_key: Optional[str] = None,
                label_key: Optional[str] = None) -> _Source:
  """Parses a --source value (see the module docstring)."""
  if source in NAMED_NPZ:
    if not input_dir:
      raise ValueError(f'--source={source} needs --input_dir (the folder holding '
                       f'{", ".join(NAMED_NPZ[source].values())}).')
    return _npz_source({s: os.path.join(input_dir, f) for s, f in NAMED_NPZ[source].items()})
  if source.startswith('npz:'):
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
    return _npz_source(paths)
  if source == 'folder':
    if not input_dir:
      raise ValueError('--source=folder needs --input_dir=ROOT.')
    return _folder_source(input_dir)
  if source.startswith('tfds:'):
    return _tfds_source(source[5:], tfds_data_dir, image_key, label_key)
  raise ValueError(f'Unknown --source {source!r}: use cifar10_npz, caltech101_npz, '
                   'npz:TRAIN[,TEST], folder or tfds:NAME.')


# ----------------------------------------------------------------------------- writing


def _inspect(image: bytes) -> tuple[str, tuple[int, int, int]]:
  """Fully decodes `image`; returns (format, (h, w, c)) or raises."""
  with Image.open(io.BytesIO(image)) as im:
    im.load()
    return im.format or '?', (im.size[1], im.size[0], len(im.getbands()))


def _check(item: tuple[str, Fetch]):
  """(where, label, bytes, format, shape, error) for one source item."""
  where, fetch = item
  label = -1
  try:
    label, data = fetch()
    fmt, shape = _inspect(data)
    return where, label, data, fmt, shape, None
  except Exception as e:  # pylint: disable=broad-except
    return where, label, None, None, None, f'{type(e).__name__}: {e}'


def _write_split(split: str, spec: _Split, num_classes: int, num_shards: int, tmp_dir: str,
                 pool: concurrent.futures.Executor, stats: dict[str, Any], log) -> dict[str, Any]:
  """Writes one split's shards into `tmp_dir`; returns its metadata entry."""
  n = spec.num_items
  names = [records.shard_name(split, i, num_shards) for i in range(num_shards)]
  lengths, class_counts = [0] * num_shards, [0] * num_classes
  writer, current, num_bytes, skipped, t0 = None, -1, 0, 0, time.time()
  results = _ordered_map(pool, _check, spec.items())
  for k, (where, label, data, fmt, shape, error) in enumerate(results):
    if error is None and not 0 <= label < num_classes:
      error = f'label {label} outside [0, {num_classes})'
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
    writer.write(records.encode_record(label, data))
    lengths[shard] += 1
    class_counts[label] += 1
    num_bytes += len(data)
    stats['formats'][fmt] = stats['formats'].get(fmt, 0) + 1
    stats['shapes'].add(shape)
    if (k + 1) % 50000 == 0:
      log(f'  {split}: {k + 1}/{n} ({time.time() - t0:.0f} s)')
  while current < num_shards - 1:  # shards left empty (everything in them skipped)
    if writer is not None:
      writer.close()
    current += 1
    writer = ArrayRecordWriter(os.path.join(tmp_dir, names[current]), records.WRITER_OPTIONS)
  writer.close()
  return {'num_examples': sum(lengths), 'num_skipped': skipped, 'num_bytes': num_bytes,
          'shards': names, 'shard_lengths': lengths, 'class_counts': class_counts}


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


def prepare(source: str, out_dir: str, *, input_dir: Optional[str] = None,
            num_shards: Optional[int] = None, tfds_data_dir: Optional[str] = None,
            image_key: Optional[str] = None, label_key: Optional[str] = None,
            splits: Optional[Sequence[str]] = None, num_workers: Optional[int] = None,
            verbose: bool = True) -> dict[str, Any]:
  """Writes the ArrayRecord dataset of `source` (see module docstring) to `out_dir`.

  `num_shards` applies to every split (default: about one per 256 MiB). Any dataset already in
  `out_dir` is replaced as a whole (other files there are left alone). Returns the metadata.
  """
  log = (lambda msg: print(msg, flush=True)) if verbose else (lambda msg: None)
  t0 = time.time()
  src = make_source(source, input_dir, tfds_data_dir, image_key, label_key)
  if splits:
    unknown = set(splits) - set(src.splits)
    if unknown:
      raise ValueError(f'Splits {sorted(unknown)} not in the source; it has {list(src.splits)}.')
    src.splits = {s: src.splits[s] for s in splits}
  empty = [s for s, spec in src.splits.items() if spec.num_items == 0]
  for s in empty:
    print(f'[prepare_data] split {s!r} has no images; leaving it out.', file=sys.stderr)
    del src.splits[s]
  if not src.splits:
    raise ValueError(f'No images found in {src.description}.')
  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}.')

  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):  # leftovers of interrupted runs
    if name.startswith(_TMP_PREFIX):
      shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
  tmp_dir = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir)
  stats = {'skipped': [], 'formats': {}, 'shapes': set()}
  try:
    workers = num_workers or min(8, os.cpu_count() or 1)
    split_meta = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # Pillow decodes without the GIL
      for split, spec in src.splits.items():
        t = time.time()
        shards = num_shards or max(1, math.ceil(spec.num_bytes / _SHARD_BYTES))
        shards = min(shards, spec.num_items)
        split_meta[split] = _write_split(split, spec, len(src.class_names), shards, tmp_dir,
                                         pool, stats, log)
        log(f'  {split}: {split_meta[split]["num_examples"]} examples in {shards} shard(s), '
            f'{time.time() - t:.1f} s')
    shapes = stats['shapes']
    meta = {
        'source': src.description,
        'record_format': records.RECORD_FORMAT,
        'multi_label': False,
        'max_labels_per_image': 1,
        'encoding': src.encoding,
        'class_names': src.class_names,
        'num_classes': len(src.class_names),
        'image_size': list(next(iter(shapes))) if len(shapes) == 1 else None,
        'image_formats': dict(sorted(stats['formats'].items())),
        'splits': split_meta,
        'num_skipped': sum(m['num_skipped'] for m in split_meta.values()),
        'skipped': stats['skipped'],
    }
    records.write_metadata(tmp_dir, meta)
    _replace_dataset(out_dir, tmp_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  meta = records.read_metadata(out_dir)
  _summary(meta, out_dir, time.time() - t0, log)
  return meta


def _summary(meta: dict[str, Any], out_dir: str, seconds: float, log) -> None:
  log(f'Prepared {out_dir} from {meta["source"]} in {seconds:.1f} s')
  log(f'  classes: {meta["num_classes"]}; image size: {meta["image_size"] or "mixed"}; '
      f'formats: {meta["image_formats"]}; encoding: {meta["encoding"]}')
  for split, m in meta['splits'].items():
    disk = sum(os.path.getsize(os.path.join(out_dir, s)) for s in m['shards'])
    log(f'  {split:>10}: {m["num_examples"]:>9,} examples, {m["num_skipped"]} skipped, '
        f'{m["num_bytes"] / 2**20:,.1f} MiB of images, {disk / 2**20:,.1f} MiB on disk, '
        f'{len(m["shards"])} shard(s)')
  if meta['num_skipped']:
    log(f'  skipped {meta["num_skipped"]} undecodable image(s); see "skipped" in metadata.json')


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m launch.prepare_data', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', required=True,
                      help='cifar10_npz | caltech101_npz | npz:TRAIN[,TEST] | folder | tfds:NAME')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--input_dir', help='folder of the npz files, or root of an image folder')
  parser.add_argument('--num_shards', type=int, help='shards per split (default ~256 MiB each)')
  parser.add_argument('--tfds_data_dir', help='TFDS data_dir (for tfds:NAME)')
  parser.add_argument('--image_key', help='TFDS image feature (default: image)')
  parser.add_argument('--label_key', help='TFDS label feature (default: label)')
  parser.add_argument('--splits', help='comma-separated subset of the splits to write')
  parser.add_argument('--num_workers', type=int, help='decode-check threads')
  args = parser.parse_args(argv)
  prepare(args.source, args.out, input_dir=args.input_dir, num_shards=args.num_shards,
          tfds_data_dir=args.tfds_data_dir, image_key=args.image_key, label_key=args.label_key,
          splits=args.splits.split(',') if args.splits else None, num_workers=args.num_workers)


if __name__ == '__main__':
  main()
