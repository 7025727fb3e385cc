r"""End-to-end training throughput (images/s) of backbone x head x class count, side by side.

Each cell is the project's real jitted training step (`training.train_step.make_train_step`:
forward, loss, backward, optimizer update, sharded over all local devices on the 'data' axis)
on a fixed synthetic batch already on the device, so the input pipeline is not measured. Heads are
`configs.base.comparison_head` (as in `configs/compare_heads.py`) at the given K, with R, S and
the chunk from the flags; the HET sample projection runs in --dtype.

The issue's GPU measurement (plain Flax ResNet-50 + softmax does ~5,800 images/s on one H100 at
batch 256):
  python benchmarks/train_throughput.py --backbones=resnet50,vit_b16 --classes=1000,29593 \
      --batch=256 --image_size=224 --dtype=bfloat16
CPU-sized (what BENCHMARKS.md records when no GPU is lent):
  python benchmarks/train_throughput.py --backbones=resnet50,vit_b16 --classes=1000,29593 \
      --batch=8 --image_size=64 --steps=3 --dtype=float32 --parameter_efficient
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base, schema  # noqa: E402

HEADS = ('det', 'het', 'hetxl', 'soc', 'llc')


def build_config(backbone: str, head: str, num_classes: int, a: argparse.Namespace):
  c = base.synthetic_stand_in(schema.base_config(), size=a.image_size)
  c.dataset.num_classes = num_classes
  c.dataset.num_examples = a.batch
  c.input.batch_size = a.batch
  c.input.eval_batch_size = a.batch
  c.model.backbone = backbone
  c.model.dtype = a.dtype
  if backbone.startswith('resnet'):
    c.model.backbone_kwargs.stem = 'imagenet'
  c.optimizer.name = 'adamw'
  c.optimizer.weight_decay = 0.1
  base.comparison_head(c, head, num_factors=a.factors, train_samples=a.samples,
                       eval_samples=a.samples, chunk=a.chunk,
                       parameter_efficient=a.parameter_efficient)
  if head in ('het', 'hetxl'):
    c.model.head_kwargs.compute_dtype = a.dtype
  return c


def measure(config, steps: int, warmup: int) -> dict:
  """images/s of `steps` training steps after `warmup` (compile excluded)."""
  from training.experiment import Experiment
  from training.train_step import make_train_step
  from training.mesh import batch_sharding
  from training.state import create_state, param_count
  exp = Experiment.build(config)
  state = create_state(exp.model, exp.tx, exp.image_shape, exp.shardings, jax.random.key(0))
  rng = np.random.default_rng(0)
  b = config.input.batch_size
  batch = jax.device_put({
      'image': rng.standard_normal((b, *exp.image_shape), np.float32),
      'label': rng.integers(0, config.dataset.num_classes, b).astype(np.int32),
      'mask': np.ones(b, np.float32)}, batch_sharding(exp.mesh))
  step = make_train_step(exp)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / steps
  head = param_count(state.params['head'])
  if not np.isfinite(float(metrics['loss'])):
    raise RuntimeError('non-finite loss')
  return {'images_per_sec': b / seconds, 'ms_per_step': 1000 * seconds, 'compile_s': compile_s,
          'head_params': head}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--backbones', default='resnet50,vit_b16')
  p.add_argument('--classes', default='1000,29593')
  p.add_argument('--heads', default=','.join(HEADS))
  p.add_argument('--batch', type=int, default=256, help='global batch')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--factors', type=int, default=15, help='R of het / hetxl')
  p.add_argument('--samples', type=int, default=1000, help='training MC samples of het / hetxl')
  p.add_argument('--chunk', type=int, default=100, help='MC samples per chunk')
  p.add_argument('--parameter_efficient', action='store_true',
                 help='het / hetxl: the parameter-efficient noise layers (HET at K=29,593 with '
                      'D=2048, R=15 otherwise has 0.9 G scale-layer parameters)')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  a = p.parse_args(argv)
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}, batch {a.batch}, '
        f'{a.image_size} px, {a.dtype}, het/hetxl R={a.factors} S={a.samples} '
        f'chunk={a.chunk}{" parameter-efficient" if a.parameter_efficient else ""}\n')
  print('| backbone | K | head | images/s | ms/step | vs det | head params | compile s |')
  print('|---|---:|---|---:|---:|---:|---:|---:|')
  for backbone in a.backbones.split(','):
    for k in (int(x) for x in a.classes.split(',')):
      det = None
      for head in a.heads.split(','):
        r = measure(build_config(backbone, head, k, a), a.steps, a.warmup)
        det = r['images_per_sec'] if head == 'det' else det
        ratio = f'{r["images_per_sec"] / det:.2f}x' if det else '-'
        print(f'| {backbone} | {k:,} | {head} | {r["images_per_sec"]:.1f} | '
              f'{r["ms_per_step"]:.1f} | {ratio} | {r["head_params"]:,} | '
              f'{r["compile_s"]:.0f} |', flush=True)


if __name__ == '__main__':
  main()
