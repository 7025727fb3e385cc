"""One pass of a trained model over a dataset, keeping per-example outputs on the host.

Every read-only pass (`evaluation.ood`, `evaluation.fewshot`, `evaluation.reference_probs`,
`llc.evaluate`, `llc.baseline_codebooks`, `soc.add_classes`) calls `collect` with what to
compute per batch; padding is removed and rows come back in the source's order, on any number
of processes (every process gets every row).
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from evaluation.evaluator import EVAL_SEED
from heads.base import INTERMEDIATES
from input_pipeline.pipeline import device_batches
from training.experiment import Experiment
from training.mesh import batch_sharding
from training.model import step_rngs


def prepared_dataset(config: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
  """A copy of `config.dataset` pointing at the prepared dataset in `data_dir` (every class,
  its own class count, clean labels, single-label, splits 'train' / 'test'), decoded to the
  config's channels. Raises FileNotFoundError when `data_dir` holds no prepared dataset."""
  from input_pipeline.sources import dataset_facts
  ds = ml_collections.ConfigDict(config.dataset.to_dict())
  ds.name, ds.data_dir, ds.tfds_name, ds.setup_hint = 'arrayrecord', data_dir, '', ''
  ds.classes, ds.ood_classes, ds.label_noise = (), (), 0.0
  ds.train_split, ds.eval_split, ds.multi_label, ds.max_labels = 'train', 'test', False, 0
  ds.num_classes = dataset_facts(ds).num_classes
  return ds


def collect(exp: Experiment, variables: dict, fn: Callable[[Any, Any], dict],
            source: Any = None, image_size: Optional[int] = None) -> dict:
  """{name: [N, ...]} of `fn(module, images)` (a method applied to the bound Classifier, e.g.
  `lambda m, x: {'features': m.features(x)}`) over the eval split, or over `source`; plus
  'label' [N]. `fn` may read what the model sows (`m.variables['intermediates']`, after calling
  it) and return None for a column it has nothing for (then absent). `image_size`: resize
  every image to this side first (another dataset fed to a model trained at that size);
  default: the config's own eval preprocessing."""
  model = exp.model
  if image_size:
    config = exp.config.copy_and_resolve_references()
    config.input.image_size, config.input.eval_preprocess = image_size, 'resize'
    exp = dataclasses.replace(exp, config=config)

  def step(params, batch_stats, batch):
    out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                         method=fn, rngs=step_rngs(jax.random.key(EVAL_SEED), 0, model.head),
                         mutable=[INTERMEDIATES])
    return {**{k: v for k, v in out.items() if v is not None}, 'label': batch['label'],
            'mask': batch['mask'], 'index': batch['index']}

  step = jax.jit(step, in_shardings=(exp.shardings.params, exp.shardings.batch_stats,
                                     batch_sharding(exp.mesh)),
                 out_shardings=NamedSharding(exp.mesh, P()))
  columns = {}
  for batch in device_batches(iter(exp.eval_dataset(source)), batch_sharding(exp.mesh)):
    for k, v in jax.device_get(step(variables['params'], variables['batch_stats'],
                                    batch)).items():
      columns.setdefault(k, []).append(np.asarray(v))
  c = {k: np.concatenate(v) for k, v in columns.items()}
  keep = c.pop('mask') > 0
  order = np.argsort(c.pop('index')[keep])
  return {k: v[keep][order] for k, v in c.items()}
