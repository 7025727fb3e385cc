r"""Training input throughput per worker core, side by side with a bare Pillow loop.

Builds a set of ImageNet-size JPEGs (random ~400x350 crops of the two photos scikit-learn
ships), prepares them as ArrayRecord with `launch.prepare_data`, then measures images/s of:
  * bare:  one core, a plain loop: PIL decode -> random-resized-crop(224) -> flip;
  * grain: the project's full training pipeline (ArrayRecord read, decode + crop + flip in
           `random_map`, batching), in-process and with N `mp_prefetch` worker processes.

  python benchmarks/input_pipeline.py [--images=512] [--batch=64] [--workers=0,1,2]

Issue 29 (datasets of any size), on datasets written as `launch.prepare_data` writes them
(records of 8x8 and 32x32 PNG thumbnails or of ~400x350 JPEG photos, shards sized by
`prepare_data.default_num_shards` unless --per_shard says otherwise):
  --mode=reads     random reads/s of one shard of 2,000 and 200,000 records: ArrayRecord's
                   read([i]) (what grain's ArrayRecordDataSource calls) against seek + read
                   (RecordSource), writer group_size 1 against the default;
  --mode=readers   training input images/s of the global and the sharded reader
                   (input.reader), thumbnails and photos at 2,000 and 200,000 records;
  --mode=startup   a fresh training process's peak RSS and time to its first batch at
                   --records=2000,200000,2000000 tiny images, each reader.
"""
import argparse
import io
import os
import shutil
import sys
import tempfile
import time

# This file's name equals the package it measures: put the repo root first, not this folder.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from PIL import Image


def make_jpegs(folder: str, n: int, seed: int = 0) -> list[str]:
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images  # two 427x640 RGB photos
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    photo = photos[i % 2]
    h, w = int(rng.integers(330, 380)), int(rng.integers(380, 427))
    top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
    cls = os.path.join(folder, 'train', f'c{i % 2}')
    os.makedirs(cls, exist_ok=True)
    path = os.path.join(cls, f'{i:05d}.jpg')
    Image.fromarray(photo[top:top + h, left:left + w]).save(path, quality=90)
    paths.append(path)
  return paths


def bare_loop(paths: list[str], size: int = 224, seconds: float = 5.0) -> float:
  """A plain single-core Pillow loop: decode, Inception crop, resize, flip."""
  from input_pipeline.image_ops import sample_crop_window
  blobs = [open(p, 'rb').read() for p in paths]
  rng = np.random.default_rng(0)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    im = Image.open(io.BytesIO(blobs[n % len(blobs)])).convert('RGB')
    top, left, h, w = sample_crop_window(im.height, im.width, rng)
    out = np.asarray(im.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    if rng.random() < 0.5:
      out = out[:, ::-1]
    n += 1
  return n / (time.perf_counter() - t0)


def record_source(data_dir: str):
  from input_pipeline import records
  from input_pipeline.sources import RecordSource
  meta = records.read_metadata(data_dir)
  return RecordSource(records.split_paths(data_dir, 'train'), meta['format_version'],
                      meta['splits']['train'].get('shard_lengths'))


def grain_pipeline(data_dir: str, workers: int, batch: int, seconds: float = 8.0,
                   reader: str = 'global', augment: str = 'inception',
                   image_size: int = 224) -> float:
  """Training input images/s; reader 'before' = the global reader as main had it before
  issue 29 (`GrainRecords`)."""
  from input_pipeline import records
  from input_pipeline.pipeline import train_dataset
  source = (GrainRecords(records.split_paths(data_dir, 'train')) if reader == 'before'
            else record_source(data_dir))
  reader = 'global' if reader == 'before' else reader
  it = iter(train_dataset(source, global_batch=batch, seed=0, augment=augment,
                          image_size=image_size, channels=3, num_workers=workers,
                          reader=reader))
  for _ in range(3 if workers else 1):  # start-up: worker processes, first batches
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += len(b['label'])
  return n / (time.perf_counter() - t0)


# ----- Issue 29: datasets of any size ---------------------------------------------------------

def image_bytes(kind: str, n: int, seed: int = 0) -> list[bytes]:
  """`n` distinct encoded images (up to 500, then repeated): 8x8 / 32x32 PNG thumbnails or
  ~400x350 JPEG photos (crops of scikit-learn's two sample photos)."""
  rng = np.random.default_rng(seed)
  out = []
  if kind == 'photo':
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
  for i in range(min(n, 500)):
    if kind == 'photo':
      photo = photos[i % 2]
      h, w = int(rng.integers(330, 380)), int(rng.integers(380, 427))
      top, left = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
      im, fmt = Image.fromarray(photo[top:top + h, left:left + w]), 'JPEG'
    else:
      side = int(kind)
      im, fmt = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), 'PNG'
    b = io.BytesIO()
    im.save(b, format=fmt, quality=90) if fmt == 'JPEG' else im.save(b, format=fmt)
    out.append(b.getvalue())
  return out


def write_dataset(out: str, kind: str, n: int, per_shard: int = 0,
                  options: str | None = None) -> dict:
  """A prepared dataset of `n` records of `kind` images (10 classes) in the format and shard
  sizes `launch.prepare_data` writes (without its decode checks, which would take hours at
  millions of images); `per_shard` > 0 sets the records per shard instead."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from input_pipeline import records
  from launch.prepare_data import default_num_shards
  blobs = image_bytes(kind, n)
  num_bytes = sum(len(blobs[i % len(blobs)]) for i in range(min(n, 5000))) * max(1, n / 5000)
  shards = -(-n // per_shard) if per_shard else default_num_shards(n, int(num_bytes))
  os.makedirs(out, exist_ok=True)
  names = [records.shard_name('train', s, shards) for s in range(shards)]
  lengths = []
  for s, name in enumerate(names):
    lo, hi = s * n // shards, (s + 1) * n // shards
    writer = ArrayRecordWriter(os.path.join(out, name),
                               records.WRITER_OPTIONS if options is None else options)
    for i in range(lo, hi):
      writer.write(records.encode_record(i % 10, blobs[i % len(blobs)]))
    writer.close()
    lengths.append(hi - lo)
  split = {'num_examples': n, 'shards': names, 'shard_lengths': lengths}
  records.write_metadata(out, {'num_classes': 10, 'class_names': [str(k) for k in range(10)],
                               'splits': {'train': split}})
  return split


def random_reads(path: str, n: int, how: str, seconds: float = 2.0) -> float:
  """Random single-record reads/s of one shard of `n` records."""
  from array_record.python.array_record_module import ArrayRecordReader
  from input_pipeline.sources import READER_OPTIONS
  reader = ArrayRecordReader(path, READER_OPTIONS if how == 'seek + read' else
                             'readahead_buffer_size:0')
  idx = np.random.default_rng(0).integers(0, n, 1 << 20)
  k, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    for _ in range(100):
      i = int(idx[k % len(idx)])
      k += 1
      if how == 'seek + read':
        reader.seek(i)
        reader.read()
      else:
        reader.read([i])
  rate = k / (time.perf_counter() - t0)
  reader.close()
  return rate


def reads_table(tmp: str, seconds: float) -> None:
  print('| records in the shard | record | writer options | read call | reads/s |')
  print('|---:|---|---|---|---:|')
  for n in (2000, 200_000):
    for kind in ('8', 'photo'):
      for options in ('group_size:1', 'default (group_size:65536)'):
        if kind == 'photo' and (n > 2000) and options != 'group_size:1':
          continue   # 6 GB more to write for a row the 8x8 one already answers
        out = os.path.join(tmp, f'r{n}-{kind}-{options[:12]}')
        split = write_dataset(out, kind, n, per_shard=n,
                              options='' if options.startswith('default') else options)
        path = os.path.join(out, split['shards'][0])
        for how in ('read([i])', 'seek + read'):
          rate = random_reads(path, n, how, seconds)
          name = '8x8 PNG' if kind == '8' else 'JPEG photo'
          print(f'| {n:,} | {name} | {options} | {how} | {rate:,.0f} |', flush=True)
        shutil.rmtree(out)


def readers_table(tmp: str, seconds: float, batch: int, kinds: list[str]) -> None:
  """Images/s of each reader; for 200,000 records also main's reader before issue 29 on the
  one 200,000-record shard its bytes-only sizing wrote for thumbnails."""
  print('| images | records | shards | reader | images/s (in-process) |')
  print('|---|---:|---:|---|---:|')
  for kind in kinds:
    size, augment = (224, 'inception') if kind == 'photo' else (int(kind), 'flip')
    name = 'JPEG ~400x350 -> crop 224' if kind == 'photo' else f'{kind}x{kind} PNG'
    for n in (2000, 200_000):
      runs = [(0, 'global'), (0, 'sharded')]
      if n > 2000 and kind != 'photo':
        runs = [(n, 'before')] + runs
      for per_shard, reader in runs:
        out = os.path.join(tmp, f'p{kind}-{n}-{per_shard}')
        if not os.path.isdir(out):
          split = write_dataset(out, kind, n, per_shard)
        rate = grain_pipeline(out, 0, batch, seconds, reader, augment, size)
        label = 'global, before issue 29 (grain read([i]))' if reader == 'before' else reader
        print(f'| {name} | {n:,} | {len(split["shards"])} | {label} | {rate:,.0f} |',
              flush=True)
      for d in os.listdir(tmp):
        shutil.rmtree(os.path.join(tmp, d))


class GrainRecords:
  """The records as main read them before issue 29: grain's ArrayRecordDataSource over every
  shard (opens each at start-up to count its records; read([i]) per record)."""

  def __init__(self, paths: list[str]):
    import grain
    self._records = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    from input_pipeline.records import decode_record
    labels, image = decode_record(self._records[i])
    return {'image': image, 'label': int(labels[0])}


def first_batch(data_dir: str, reader: str, batches: int = 200) -> None:
  """In a fresh process: seconds to the first batch of 256, peak RSS (MiB) then, and after
  `batches` batches (what `--mode=startup` runs). reader 'before' = main before issue 29."""
  import resource
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  base = rss()
  t0 = time.perf_counter()
  from input_pipeline import records
  from input_pipeline.pipeline import train_dataset
  source = (GrainRecords(records.split_paths(data_dir, 'train')) if reader == 'before'
            else record_source(data_dir))
  it = iter(train_dataset(source, global_batch=256, seed=0, augment='flip', image_size=8,
                          channels=3, reader='global' if reader == 'before' else reader))
  next(it)
  seconds, first = time.perf_counter() - t0, rss()
  for _ in range(batches - 1):
    next(it)
  print(f'{seconds:.3f} {first:.1f} {rss():.1f} {base:.1f}')


def startup_table(tmp: str, counts: list[int]) -> None:
  import subprocess
  print('| records | shards | reader | time to first batch (s) | peak RSS at batch 1 (MiB) | '
        'at batch 200 | before the input imports |')
  print('|---:|---:|---|---:|---:|---:|---:|')
  for n in counts:
    out = os.path.join(tmp, f's{n}')
    split = write_dataset(out, '8', n)
    for reader in ('before', 'global', 'sharded'):
      res = subprocess.run([sys.executable, os.path.abspath(__file__), '--mode=first_batch',
                            f'--data_dir={out}', f'--reader={reader}'],
                           capture_output=True, text=True, check=True)
      seconds, first, last, base = map(float, res.stdout.split()[-4:])
      name = {'before': 'global, before issue 29 (grain ArrayRecordDataSource)'}.get(reader, reader)
      print(f'| {n:,} | {len(split["shards"])} | {name} | {seconds:.2f} | {first:,.0f} | '
            f'{last:,.0f} | {base:,.0f} |', flush=True)
    shutil.rmtree(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', default='photos',
                      choices=('photos', 'reads', 'readers', 'startup', 'first_batch'))
  parser.add_argument('--records', default='2000,200000,2000000')
  parser.add_argument('--kinds', default='8,32,photo', help='readers: image kinds')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--reader', default='global')
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--seconds', type=float, default=8.0)
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  if args.mode == 'first_batch':
    return first_batch(args.data_dir, args.reader)
  if args.mode != 'photos':
    print(f'{os.cpu_count()} CPUs, {time.strftime("%Y-%m-%d")}\n')
    with tempfile.TemporaryDirectory() as tmp:
      if args.mode == 'reads':
        reads_table(tmp, min(args.seconds, 2.0))
      elif args.mode == 'readers':
        readers_table(tmp, args.seconds, args.batch, args.kinds.split(','))
      else:
        startup_table(tmp, [int(x) for x in args.records.split(',')])
    return
  from launch.prepare_data import prepare
  with tempfile.TemporaryDirectory() as tmp:
    paths = make_jpegs(os.path.join(tmp, 'jpegs'), args.images)
    prepare('folder', os.path.join(tmp, 'ar'), input_dir=os.path.join(tmp, 'jpegs'), verbose=False)
    bare = bare_loop(paths, seconds=args.seconds)
    rows = [('bare Pillow loop', 1, bare)]
    for w in [int(x) for x in args.workers.split(',')]:
      rate = grain_pipeline(os.path.join(tmp, 'ar'), w, args.batch, args.seconds)
      rows.append((f'grain, {"in-process" if w == 0 else f"{w} mp_prefetch workers"}', max(w, 1), rate))
  print(f'{args.images} JPEGs ~400x350 -> random-resized-crop 224 + flip, batch {args.batch}, '
        f'{os.cpu_count()} CPUs\n')
  print('| pipeline | worker cores | images/s | images/s per core | per core / bare |')
  print('|---|---:|---:|---:|---:|')
  for name, cores, rate in rows:
    print(f'| {name} | {cores} | {rate:,.0f} | {rate / cores:,.0f} | {rate / cores / bare:.2f} |')
  best = max(r / c for _, c, r in rows[1:])
  print(f'\nResNet-50 on one H100 at ~5,800 images/s would need ~{5800 / best:.1f} such cores.')


if __name__ == '__main__':
  main()
