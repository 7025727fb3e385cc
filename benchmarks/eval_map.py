r"""The on-device mAP (evaluation.evaluator, top-k + logit histograms) against scikit-learn's
exact `average_precision_score` at JFT's eval size, and the accumulator's memory per device.

AP is per class, so N (the images) is kept at uncertainty-baselines' JFT eval size, 49,511, and
the classes are a sample of `--classes` columns (mAP is their mean; the exact reference needs
the whole [N, classes] matrix on the host). Positives per class are heavy-tailed (geometric,
mean `--mean_positives`, a few classes with hundreds, some with none); sigmoid logits of
positives N(mu+, sd+) among negatives N(mu-, sd-) for each `--case`. Run on the 8-device CPU
mesh (2, 4), one accumulator per data row, as on a pod. Prints a markdown table.

  python benchmarks/eval_map.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402

from configs.schema import base_config
from evaluation.evaluator import EvalStep  # noqa: E402
from input_pipeline.pipeline import to_global  # noqa: E402
from training.mesh import batch_sharding, build_mesh  # noqa: E402

CASES = {'jft-like': (-2.0, 3.0, -8.0, 2.0),        # mu+, sd+, mu-, sd- of the logits
         'crowded': (-2.5, 1.0, -3.0, 1.0)}         # negatives crowd the positives
_N = flags.DEFINE_integer('images', 49_511, 'eval images N')
_K = flags.DEFINE_integer('classes', 512, 'classes sampled')
_POS = flags.DEFINE_float('mean_positives', 3.2, 'mean positives a class (JFT: ~3.2)')
_BATCH = flags.DEFINE_integer('batch', 1024, 'eval batch')
_SETTINGS = flags.DEFINE_list('settings', ['64:512', '1:512', '64:128'],
                              'map_top_k:map_bins pairs')


def data(rng, n, k, case):
  mu_p, sd_p, mu_n, sd_n = CASES[case]
  y = np.zeros((n, k), np.float32)
  counts = np.minimum(rng.geometric(1 / (1 + _POS.value), k) - 1, n // 10)
  for c, npos in enumerate(counts):
    y[rng.choice(n, npos, replace=False), c] = 1
  logits = np.where(y > 0, rng.normal(mu_p, sd_p, (n, k)), rng.normal(mu_n, sd_n, (n, k)))
  return logits.astype(np.float32), y


def run(mesh, logits, y, top_k, bins):
  replicated = NamedSharding(mesh, P())
  step = EvalStep(lambda p, b, x: x, 'sigmoid', logits.shape[1], mesh, (replicated,) * 2,
                  ml_collections.ConfigDict({**base_config().eval, 'map_top_k': top_k,
                                             'map_bins': bins}))
  width = max(1, int(y.sum(1).max()))
  labels = np.full((len(y), width), -1, np.int32)
  for i, row in enumerate(y):
    ids = np.flatnonzero(row)
    labels[i, :len(ids)] = ids
  b, n = _BATCH.value, len(logits)
  pad = -n % b
  logits = np.concatenate([logits, np.zeros((pad, logits.shape[1]), np.float32)])
  labels = np.concatenate([labels, np.full((pad, width), -1, np.int32)])
  mask = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
  acc, zero = None, jnp.zeros(())
  t0 = time.time()
  for i in range(0, len(logits), b):
    batch = to_global({'image': logits[i:i + b], 'label': labels[i:i + b],
                       'mask': mask[i:i + b]}, batch_sharding(mesh))
    acc = step.accumulator(zero, zero, batch) if acc is None else acc
    acc = step(acc, zero, zero, batch)
  metrics = step.results(acc)[0]
  per_device = sum(a.addressable_shards[0].data.nbytes for a in acc.values())
  return metrics, time.time() - t0, per_device


def main(argv):
  del argv
  mesh = build_mesh(('data', 'model'), (2, 4))
  rng = np.random.default_rng(0)
  print(f'N = {_N.value} images, {_K.value} classes sampled, mesh (data 2, model 4), '
        f'{jax.devices()[0].platform}')
  print('| case | classes with a positive | sklearn mAP | top_k | bins | mAP | error | bound | '
        'accumulator / device / class | eval s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for case in CASES:
    logits, y = data(rng, _N.value, _K.value, case)
    keep = y.sum(0) > 0
    p = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))
    want = average_precision_score(y[:, keep], p[:, keep], average='macro')
    for setting in _SETTINGS.value:
      top_k, bins = map(int, setting.split(':'))
      m, seconds, per_device = run(mesh, logits, y, top_k, bins)
      per_class = per_device / (_K.value / 4)
      print(f'| {case} | {int(keep.sum())} | {want:.5f} | {top_k} | {bins} | {m["map"]:.5f} | '
            f'{m["map"] - want:+.1e} | {m["map_error_bound"]:.1e} | {per_class:.0f} B | '
            f'{seconds:.1f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
