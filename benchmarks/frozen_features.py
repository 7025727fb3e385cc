r"""Heads trained on frozen features (issue 14, item 3): extract a trained backbone's pre-logits
once, then train DET / HET / HET-XL heads on them under label noise, many seeds, cheaply.

  # 1. features [N, D] of the train and test splits (eval preprocessing, clean labels), and the
  #    trained model's class probabilities on the train split (the input-dependent noise's
  #    reference), from the latest checkpoint of a workdir:
  python benchmarks/frozen_features.py --mode=extract \
      --config=configs/compare_heads.py:dataset=cifar10,head=det --workdir=/tmp/det \
      --features=/tmp/f.npz
  # 2. heads x noise kinds x rates x seeds; one markdown table of mean +- standard error:
  python benchmarks/frozen_features.py --mode=train --features=/tmp/f.npz --heads=det,het,hetxl \
      --noise=0,0.2,0.4 --kinds=symmetric,class_dependent,input_dependent --seeds=5 --epochs=10 \
      --out=/tmp/frozen.jsonl
  #    an ablation of one head (a config field per --set, named by --tag in the table):
  python benchmarks/frozen_features.py --mode=train --features=/tmp/f.npz --heads=hetxl \
      --noise=0.4 --kinds=symmetric --tag=fixed_tau1 --set=model.head_kwargs.learn_temperature=False
  # 3. NLL against the noise rate per head and kind, and HET-XL's tau per epoch, from --out:
  python benchmarks/frozen_features.py --mode=plot --out=/tmp/frozen.jsonl --plot=/tmp/frozen.png

Training: the heads of `configs.base.comparison_head` (HET / HET-XL with --factors, --samples
train / 1000 eval samples, temperature learnt in [0.05, 5]), Adam (--lr, warmup + cosine, the
project's `build_optimizer`), batch --batch, noisy labels from `input_pipeline.sources.
NoisyLabels` (seeded by the run's seed; 'input_dependent' uses the extracted probabilities as
its reference). Evaluation on the clean test split: accuracy, NLL, ECE (15 bins), the learnt
temperature at the end; every run also goes to --out as one JSON line (with the temperature
after each epoch). The backbone is frozen in eval mode (batch-norm running statistics), unlike
end-to-end training.
"""
import ast
import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from ml_collections import config_flags  # noqa: E402

BINS = 15


def extract(config, workdir: str, out: str) -> dict:
  """Writes `out` (.npz): train_features [N, D] float32, train_labels [N], train_probs [N, K]
  (the model's predictions), test_features, test_labels. Returns a summary."""
  from evaluation.from_checkpoint import restore_checkpoint
  from evaluation.collect import collect
  from evaluation.reference_probs import class_probabilities
  from input_pipeline.sources import build_source

  def features_and_probs(module, images):
    return {'features': module.features(images, train=False).astype(jnp.float32),
            **class_probabilities(module, images)}

  exp, variables, step = restore_checkpoint(config, workdir)
  arrays = {}
  for split, name in ((config.dataset.train_split, 'train'), (config.dataset.eval_split, 'test')):
    source, _ = build_source(config.dataset, split, config.seed, train=False)
    c = collect(exp, variables, features_and_probs, source)
    arrays.update({f'{name}_features': c['features'], f'{name}_labels': c['label']})
    if name == 'train':
      arrays['train_probs'] = c['probs']
  if jax.process_index() == 0:
    tmp = out + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
  return {'out': out, 'step': step, 'train': list(arrays['train_features'].shape),
          'test': list(arrays['test_features'].shape),
          'train_accuracy': float(np.mean(arrays['train_probs'].argmax(1) ==
                                          arrays['train_labels']))}


def head_config(head: str, num_classes: int, a: types.SimpleNamespace):
  """The head (as compare_heads builds it) and the optimizer section, for K classes."""
  from configs import base, schema
  c = schema.base_config()
  c.dataset.num_classes = num_classes
  base.comparison_head(c, head, num_factors=a.factors, train_samples=a.samples,
                       eval_samples=1000, chunk=min(100, a.samples))
  from heads.registry import resolve_head_kwargs   # e.g. LLC bits = ceil(2 log2 K)
  c.model.head_kwargs.update(resolve_head_kwargs(c.model.head, num_classes,
                                                 c.model.head_kwargs.to_dict()))
  c.optimizer.learning_rate = a.lr
  for key, value in parse_overrides(getattr(a, 'set', ())).items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f'--set {key}: the config has no field {leaf!r} under '
                       f'{".".join(parents) or "the top level"}; it has {sorted(node.keys())}')
    node[leaf] = value
  return c


def parse_overrides(items) -> dict:
  """['model.head_kwargs.learn_temperature=False', ...] -> {key: Python value}: a value is read
  as a Python literal (False, 1.0, (0.3, 3.0)) and kept as a string if it is not one."""
  out = {}
  for item in items:
    key, sep, text = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--set {item!r}: expected key=value, e.g. '
                       'model.head_kwargs.learn_temperature=False')
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def noisy_train_labels(data: dict, rate: float, kind: str, seed: int, reference: str) -> np.ndarray:
  """The train labels after NoisyLabels (the features stand in for images)."""
  from input_pipeline.sources import ArraySource, NoisyLabels
  labels = data['train_labels']
  if rate == 0:
    return labels
  num_classes = data['train_probs'].shape[1]
  source = NoisyLabels(ArraySource(data['train_features'], labels), num_classes, rate, kind,
                       seed, reference if kind == 'input_dependent' else '')
  return np.array([source[i]['label'] for i in range(len(labels))])


def train_head(data: dict, labels: np.ndarray, head: str, seed: int,
               a: types.SimpleNamespace) -> dict:
  """Trains one head on the train features with `labels`; evaluates on the clean test split."""
  from evaluation.calibration import bin_statistics, expected_calibration_error
  from evaluation.evaluator import EVAL_SEED
  from heads.base import METRICS, probabilities
  from heads.registry import build_head
  from training.model import step_rngs
  from training.optimizer import build_optimizer
  num_classes = data['train_probs'].shape[1]
  c = head_config(head, num_classes, a)
  model = build_head(c.model.head, num_classes, **c.model.head_kwargs.to_dict())
  x, n = jnp.asarray(data['train_features']), len(labels)
  steps_per_epoch = max(1, n // a.batch)
  num_steps = a.epochs * steps_per_epoch
  c.optimizer.warmup_steps = min(steps_per_epoch, num_steps // 10)
  key = jax.random.key(seed)
  params = model.init({'params': key, **step_rngs(key, 0, model)}, x[:2])['params']
  params = nn.meta.unbox(params)
  tx = build_optimizer(c.optimizer, num_steps, params)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, i, xb, yb):
    def loss_fn(p):
      out, aux = model.apply({'params': p}, xb, yb, train=True, rngs=step_rngs(key, i, model),
                             mutable=[METRICS])
      return jnp.mean(out.loss), aux
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, loss, aux

  @jax.jit
  def predict(params, xb):
    out = model.apply({'params': params}, xb, train=False,
                      rngs=step_rngs(jax.random.key(EVAL_SEED), 0, model))
    probs = probabilities(model.link, out.logits)
    return probs / jnp.sum(probs, -1, keepdims=True)

  order_rng = np.random.default_rng(seed)
  y = jnp.asarray(labels.astype(np.int32))
  taus, i = [], 0
  for _ in range(a.epochs):
    perm = order_rng.permutation(n)[:steps_per_epoch * a.batch].reshape(steps_per_epoch, a.batch)
    for idx in perm:
      params, opt_state, loss, aux = step(params, opt_state, i, x[idx], y[idx])
      i += 1
    tau = jax.tree.leaves(aux.get(METRICS, {}))
    taus.append(float(tau[0]) if tau else None)
  probs = np.concatenate([np.asarray(predict(params, jnp.asarray(data['test_features'][s:s + 1000])))
                          for s in range(0, len(data['test_labels']), 1000)])
  test = data['test_labels']
  p_label = probs[np.arange(len(test)), test]
  bins = bin_statistics(probs.max(1), (probs.argmax(1) == test).astype(np.float64), BINS)
  return {'accuracy': float(np.mean(probs.argmax(1) == test)),
          'nll': float(np.mean(-np.log(np.maximum(p_label, 1e-30)))),
          'ece': expected_calibration_error(bins), 'final_loss': float(loss),
          'temperature': taus[-1], 'temperature_per_epoch': taus}


def mean_se(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float('nan')
  return f'{statistics.mean(values):.4f} +- {se:.4f}'


def train_all(a: types.SimpleNamespace) -> list:
  data = dict(np.load(a.features))
  reference = os.path.splitext(a.features)[0] + '_train_probs.npy'
  if 'input_dependent' in a.kinds.split(',') and not os.path.exists(reference):
    np.save(reference, data['train_probs'])
  rows, records = [], []
  print('| head | noise | kind | seeds | test accuracy | NLL | ECE | learnt tau |')
  print('|---|---:|---|---:|---:|---:|---:|---:|', flush=True)
  for head in a.heads.split(','):
    for rate in (float(r) for r in a.noise.split(',')):
      for kind in (a.kinds.split(',') if rate else ['none']):
        runs = []
        for seed in range(a.seeds):
          t0 = time.time()
          labels = noisy_train_labels(data, rate, kind, seed, reference)
          r = train_head(data, labels, head, seed, a)
          r.update(head=head, noise=rate, kind=kind, seed=seed, seconds=time.time() - t0,
                   tag=a.tag, overrides=list(a.set), factors=a.factors, samples=a.samples,
                   epochs=a.epochs, batch=a.batch, lr=a.lr,
                   realised_noise=float(np.mean(labels != data['train_labels'])))
          runs.append(r)
          records.append(r)
          if a.out:
            with open(a.out, 'a') as f:
              f.write(json.dumps(r) + '\n')
        row = (f'| {head}{" " + a.tag if a.tag else ""} | {rate:g} | {kind} | {len(runs)} | '
               f'{mean_se([r["accuracy"] for r in runs])} | {mean_se([r["nll"] for r in runs])} | '
               f'{mean_se([r["ece"] for r in runs])} | {mean_se([r["temperature"] for r in runs])} |')
        rows.append(row)
        print(row, flush=True)
  return records


def plot(records: list, path: str) -> None:
  """One PNG: test NLL against the fraction of flipped labels per head and noise kind (mean +-
  standard error over seeds; clean runs at 0 in every panel), and HET-XL's learnt temperature
  after each epoch (one line per seed and cell)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = [r for r in records if not r.get('tag')]
  kinds = sorted({r['kind'] for r in records} - {'none'})
  heads = list(dict.fromkeys(r['head'] for r in records))
  fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4 * (len(kinds) + 1), 3.4))
  for ax, kind in zip(axes, kinds):
    for head in heads:
      cell = {}
      for r in records:
        if r['head'] == head and r['kind'] in (kind, 'none'):
          cell.setdefault(r['noise'], []).append(r['nll'])
      rates = sorted(cell)
      mean = [statistics.mean(cell[x]) for x in rates]
      se = [statistics.stdev(cell[x]) / len(cell[x]) ** 0.5 if len(cell[x]) > 1 else 0
            for x in rates]
      ax.errorbar(rates, mean, yerr=se, marker='o', capsize=3, label=head)
    ax.set(title=f'{kind} noise', xlabel='fraction of training labels flipped', ylabel='test NLL')
    ax.legend()
  ax = axes[-1]
  for r in records:
    if r['head'] == 'hetxl' and r.get('temperature_per_epoch'):
      taus = r['temperature_per_epoch']
      ax.plot(range(1, len(taus) + 1), taus, alpha=0.4,
              color={0.0: 'k', 0.2: 'tab:blue', 0.4: 'tab:red'}.get(r['noise'], 'tab:gray'))
  ax.set(title='HET-XL tau (black 0%, blue 20%, red 40%)', xlabel='epoch', ylabel='tau')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when the command runs, so tests can import this module beside other
  modules that define --config."""
  config_flags.DEFINE_config_file('config', None, 'extract: config[:args] of --workdir')
  flags.DEFINE_enum('mode', None, ['extract', 'train', 'plot'],
                    'extract features, train heads on them, or plot the --out records')
  flags.DEFINE_string('workdir', None, 'extract: trained workdir (latest checkpoint)')
  flags.DEFINE_string('features', None, 'extract: .npz to write; train: .npz to read')
  flags.DEFINE_string('heads', 'det,het,hetxl', 'train: heads (configs.base.comparison_head)')
  flags.DEFINE_string('noise', '0,0.2,0.4', 'train: fractions of training labels flipped')
  flags.DEFINE_string('kinds', 'symmetric,class_dependent,input_dependent', 'train: noise kinds')
  flags.DEFINE_integer('seeds', 5, 'train: seeds per cell')
  flags.DEFINE_integer('epochs', 10, 'train: epochs over the training features')
  flags.DEFINE_integer('batch', 128, 'train: batch size')
  flags.DEFINE_float('lr', 1e-3, 'train: Adam learning rate (warmup + cosine)')
  flags.DEFINE_integer('factors', 6, 'train: R of het / hetxl')
  flags.DEFINE_integer('samples', 100, 'train: training MC samples of het / hetxl')
  flags.DEFINE_string('out', '', 'train: JSON lines file, one line per run (appended)')
  flags.DEFINE_multi_string('set', [], 'train: config field=value for every head (ablations), '
                            'e.g. --set=model.head_kwargs.learn_temperature=False '
                            '--set=model.head_kwargs.temperature_bounds=(0.3,3.0)')
  flags.DEFINE_string('plot', '', 'plot: the PNG to write from the --out JSON lines')
  flags.DEFINE_string('tag', '', 'train: a name for this variant, in the table and JSON lines')


def main(argv) -> None:
  del argv
  if FLAGS.mode == 'extract':
    if not (FLAGS.config and FLAGS.workdir and FLAGS.features):
      raise app.UsageError('--mode=extract needs --config, --workdir and --features')
    print(json.dumps(extract(FLAGS.config, FLAGS.workdir, FLAGS.features)), flush=True)
  elif FLAGS.mode == 'plot':
    if not (FLAGS.out and FLAGS.plot):
      raise app.UsageError('--mode=plot needs --out (JSON lines of --mode=train) and --plot')
    with open(FLAGS.out) as f:
      plot([json.loads(line) for line in f], FLAGS.plot)
  else:
    if not FLAGS.features:
      raise app.UsageError('--mode=train needs --features (written by --mode=extract)')
    names = ('features', 'heads', 'noise', 'kinds', 'seeds', 'epochs', 'batch', 'lr', 'factors',
             'samples', 'out', 'set', 'tag')
    train_all(types.SimpleNamespace(**{k: FLAGS[k].value for k in names}))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flag_as_required('mode')
  app.run(main)
