r"""Training input throughput per worker core, side by side with a bare Pillow loop.

Builds a set of ImageNet-size JPEGs (random ~400x350 crops of the two photos scikit-learn
ships), prepares them as ArrayRecord with `launch.prepare_data`, then measures images/s of:
  * bare:  one core, a plain loop: PIL decode -> random-resized-crop(224) -> flip;
  * grain: the project's full training pipeline (ArrayRecord read, decode + crop + flip in
           `random_map`, batching), in-process and with N `mp_prefetch` worker processes.

  python benchmarks/input_pipeline.py [--images=512] [--batch=64] [--workers=0,1,2]
"""
import argparse
import io
import os
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


def grain_pipeline(data_dir: str, workers: int, batch: int, seconds: float = 8.0) -> float:
  from input_pipeline.pipeline import train_dataset
  from input_pipeline.sources import RecordSource
  from input_pipeline.records import split_paths
  source = RecordSource(split_paths(data_dir, 'train'))
  it = iter(train_dataset(source, global_batch=batch, seed=0, augment='inception',
                          image_size=224, channels=3, num_workers=workers))
  for _ in range(3 if workers else 1):  # start-up: worker processes, first batches
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += len(b['label'])
  return n / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--seconds', type=float, default=8.0)
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
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
