"""What experiment configs share: typed variant arguments, the one `:runlocal`, recipes, heads.

Configs start from `configs.schema.base_config()` and set what their experiment needs with
these: `parse_arg` types the variants after the colon (`configs/x.py:det,runlocal` or
`configs/x.py:phase=2,bits=20`), `runlocal` shrinks any config for a CPU, the recipes
(`small_image_recipe`, `vit_pretraining`, `prepared_dataset`, `hold_out_classes`, ...) and head
setters (`hetxl_head`, `det_head`, `comparison_head`) set groups of fields.
"""
import dataclasses

import ml_collections
import numpy as np

from heads.registry import head_class
from training.resolve import split_classes

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """The variant string after a config's colon, typed (big_vision's `parse_arg`):
  parse_arg('det,bits=20', det=False, bits=0, data='') -> {det: True, bits: 20, data: ''}.

  Each keyword is an argument the config accepts; its default's type converts the given text:
  bool ('True' / 'true' / the bare name -> True, 'False' / 'false' -> False), int, float or
  str. A default `(None, type)` stays None unless given (for arguments whose absence matters).
  Returns every argument, given or default. Raises ValueError naming `arg`, the argument and
  what it accepts, for an unknown argument or a value its type cannot hold.
  """
  kinds = {k: v[1] if isinstance(v, tuple) else type(v) for k, v in defaults.items()}
  parsed = ConfigDict({k: v[0] if isinstance(v, tuple) else v for k, v in defaults.items()})
  for part in filter(None, (arg or '').split(',')):
    key, has_value, text = (s.strip() for s in part.partition('='))
    if key not in kinds:
      raise ValueError(f'unknown config argument {key!r} in {arg!r}; this config accepts '
                       f'{sorted(kinds)}')
    parsed[key] = _typed(arg, key, text if has_value else None, kinds[key])
  return parsed


def _typed(arg: str, key: str, text: str | None, kind: type):
  """`text` (None: the bare name) as a `kind`; a ValueError naming `arg`, `key` and `kind`."""
  if kind is bool:
    value = True if text is None else {'true': True, 'false': False}.get(text.lower())
  else:
    try:
      value = None if text is None else kind(text)
    except ValueError:
      value = None
  if value is None:
    want = ('True or False (the bare name is True)' if kind is bool else
            f'{kind.__name__}: {key}=<{kind.__name__}>')
    given = key if text is None else f'{key}={text}'
    raise ValueError(f'config argument {given!r} in {arg!r}: {key} must be {want}')
  return value


def runlocal(c: ConfigDict, *, stand_in: bool = False) -> ConfigDict:
  """`:runlocal`: shrinks any config so it trains and evaluates on a 2-core CPU in seconds:
  batches of 16 (eval 32), 4 steps, 64 eval examples, the same backbone family at a tiny
  width, 8 MC samples for a HET / HET-XL head. `stand_in=True` (private or large data) also
  swaps in a synthetic source with the config's class count (`synthetic_stand_in`), computes
  in float32 and evaluates on its 'test' split. Call it last, once the head is set."""
  if stand_in:
    synthetic_stand_in(c)
    c.model.dtype = 'float32'
    if 'compute_dtype' in c.model.head_kwargs:
      c.model.head_kwargs.compute_dtype = 'float32'
    c.dataset.eval_split = 'test'
  c.input.batch_size = min(c.input.batch_size, 16)
  c.input.eval_batch_size = min(c.input.eval_batch_size, 32)
  c.input.num_workers = 0
  c.train.num_steps = min(c.train.num_steps or 4, 4)
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_every_epochs = 0.0
  c.train.checkpoint_every = c.train.num_steps
  c.train.checkpoint_every_epochs = 0.0
  c.eval.max_examples = 64
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, 1)
  c.optimizer.warmup_epochs = 0.0
  if c.model.backbone.startswith('resnet'):
    c.model.backbone_kwargs.width = 0.125
  elif c.model.backbone.startswith('vit'):
    c.model.backbone_kwargs.update(dict(width=64, depth=1, num_heads=2, mlp_dim=128))
  if c.model.head in ('het', 'hetxl'):
    c.model.head_kwargs.update(dict(train_mc_samples=8, eval_mc_samples=8, mc_chunk_size=4))
  return c


PREPARED = {
    # name: how to prepare it (its facts - classes, channels, size, counts - are read from the
    # prepared directory's metadata.json when the config is resolved)
    'cifar10': 'python -m launch.prepare_data --source=cifar10_npz --input_dir=../shared/data '
               '--out=.data/cifar10',
    'caltech101': 'python -m launch.prepare_data --source=caltech101_npz '
                  '--input_dir=../shared/data --out=.data/caltech101',
}


def prepared_dataset(c: ConfigDict, name: str, data_dir: str = '') -> ConfigDict:
  """Points `c.dataset` at ArrayRecord shards written by `launch.prepare_data`: `data_dir`, or
  the named dataset's default `.data/<name>`. Classes, channels, stored size and example counts
  are left to the data (0), so `--config.dataset.data_dir=DIR` alone retargets any recipe."""
  c.dataset.name = 'arrayrecord'
  c.dataset.data_dir = data_dir or f'.data/{name}'
  c.dataset.setup_hint = '' if data_dir else f'Prepare it with:\n  {PREPARED[name]}'
  return c


def small_image_recipe(c: ConfigDict, dataset: str = 'cifar10', epochs: float = 30,
                       batch_size: int = 128, stem: str = 'cifar',
                       data_dir: str = '') -> ConfigDict:
  """ResNet-18 on a prepared small-image dataset (32 px CIFAR-10, 64 px Caltech-101, or any
  prepared `data_dir`): pad-crop + flip, Adam 1e-3, warmup min(200 steps, 1 epoch), cosine,
  normalised with the data's own pixel statistics. Steps count in epochs of the data."""
  prepared_dataset(c, dataset, data_dir)
  c.input.batch_size = batch_size
  c.input.eval_batch_size = 500
  c.input.train_augment = 'cifar'
  c.input.num_workers = 2
  c.model.backbone = 'resnet18'
  c.model.backbone_kwargs.stem = stem
  c.model.backbone_kwargs.width = 1.0
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.warmup_epochs = 1.0
  c.train.num_steps = 0
  c.train.epochs = float(epochs)
  c.train.log_every = 100
  c.train.eval_every_epochs = 5.0
  c.train.checkpoint_every = 0
  c.train.checkpoint_every_epochs = 1.0
  return c


def hold_out_classes(c: ConfigDict, fraction: float, seed: int = 0) -> ConfigDict:
  """Trains on a seeded random (1 - fraction) of the classes; the rest become
  `dataset.ood_classes` (out-of-distribution data for evaluation, never trained on).

  Sets `dataset.ood_fraction` / `ood_seed`; the class lists follow from the data's class
  count when the config is resolved (`training.resolve`), or at once when num_classes is set."""
  if c.dataset.classes:
    raise ValueError('hold_out_classes needs the full class list, but dataset.classes is set')
  c.dataset.ood_fraction = float(fraction)
  c.dataset.ood_seed = seed
  if c.dataset.num_classes:
    split_classes(c.dataset, c.dataset.num_classes)
  return c


# The options a HET / HET-XL config lists in `model.head_kwargs`, so that each one can be set
# with --config.model.head_kwargs.X, even on a locked config (hetxl.heads._HeteroscedasticHead).
HETEROSCEDASTIC_OPTIONS = (
    'num_factors', 'link', 'parameter_efficient', 'train_mc_samples', 'eval_mc_samples',
    'mc_chunk_size', 'temperature', 'learn_temperature', 'temperature_bounds', 'head_bias_init',
    'diag_noise', 'share_samples_across_batch', 'compute_dtype', 'mc_method', 'quadrature_nodes')
# The published HET-XL configs' temperature: learnt on the training loss in [0.05, 5.0]
# (the layer's own default is a fixed tau = 1 with bounds 0.3 / 3.0; spec hetxl.md).
LEARNT_TEMPERATURE = dict(learn_temperature=True, temperature_bounds=(0.05, 5.0))


def hetxl_head(c: ConfigDict, kind: str = 'hetxl', **options) -> ConfigDict:
  """Sets a HET ('het') or HET-XL ('hetxl') head. `model.head_kwargs` lists every option in
  `HETEROSCEDASTIC_OPTIONS` at the head class's own default, then `options` (head_kwargs
  names, `num_factors` required): a recipe states only what it changes, e.g.
  `hetxl_head(c, num_factors=6, train_mc_samples=100, **LEARNT_TEMPERATURE)`.
  `mc_method='quadrature'` (sigmoid link only) replaces the S-sample MC estimate by its exact
  S -> infinity limit (hetxl.quadrature). Raises ValueError for an option not listed.
  """
  unknown = sorted(set(options) - set(HETEROSCEDASTIC_OPTIONS))
  if unknown:
    raise ValueError(f'hetxl_head: unknown options {unknown}; it takes {HETEROSCEDASTIC_OPTIONS}')
  if 'num_factors' not in options:
    raise ValueError('hetxl_head needs num_factors (R, the low-rank noise factors)')
  defaults = {f.name: f.default for f in dataclasses.fields(head_class(kind))
              if f.name in HETEROSCEDASTIC_OPTIONS and f.name != 'num_factors'}
  defaults['compute_dtype'] = np.dtype(defaults['compute_dtype']).name
  kwargs = {**defaults, **options}
  kwargs['temperature_bounds'] = tuple(kwargs['temperature_bounds'])
  c.model.head = kind
  c.model.head_kwargs = ConfigDict({k: kwargs[k] for k in HETEROSCEDASTIC_OPTIONS})
  return c


def sigmoid_pretraining_head(c: ConfigDict, det: bool) -> ConfigDict:
  """The published HET-XL large-scale head (JFT-4B, ImageNet-21k): sigmoid link, bias init -10;
  HET-XL parameter-efficient with R = 50 factors, S = 1000 samples in chunks of 100, bf16 MC
  compute and a learnt temperature in [0.05, 5.0]; or (det) the deterministic sigmoid head."""
  if det:
    return det_head(c, link='sigmoid', bias_init=-10.0)
  return hetxl_head(c, num_factors=50, link='sigmoid', parameter_efficient=True,
                    mc_chunk_size=100, head_bias_init=-10.0, compute_dtype='bfloat16',
                    **LEARNT_TEMPERATURE)


def vit_pretraining(c: ConfigDict, *, backbone: str, num_classes: int, setup_hint: str,
                    learning_rate: float, num_steps: int) -> ConfigDict:
  """Large-scale ViT pre-training on a private / prepared ArrayRecord dataset (JFT, ImageNet-21k):
  224 px inception crop, bf16, batch 4096, AdamW wd 0.1, clip 1.0, 10k warmup then cosine; the
  encoder blocks run as one `nn.scan` (`backbone_kwargs.scan`)."""
  c.dataset.name = 'arrayrecord'
  c.dataset.data_dir = ''
  c.dataset.num_classes = num_classes
  c.dataset.channels = 3
  c.dataset.eval_split = 'validation'
  c.dataset.setup_hint = setup_hint
  c.input.batch_size = 4096
  c.input.eval_batch_size = 4096
  c.input.image_size = 224
  c.input.train_augment = 'inception'
  c.input.eval_preprocess = 'center_crop'
  c.input.num_workers = 16
  c.model.backbone = backbone
  c.model.backbone_kwargs.scan = True  # XLA compiles one encoder block, not one per layer
  c.model.backbone_kwargs.remat = False  # True: recompute each block in the backward pass
  # FSDP over every device for each parameter of 4 MiB or more (training/sharding.py): the
  # state per device shrinks with the pod; head classes also split over 'model' when
  # mesh.shape gives it devices (e.g. '(-1,16)' for K ~ 10^6)
  c.sharding.rules = (('.*', 'fsdp(min_size_mb=4)'),)
  c.model.dtype = 'bfloat16'
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = learning_rate
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.warmup_steps = 10_000
  c.train.num_steps = num_steps
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  return c


def comparison_head(c: ConfigDict, head: str, *, num_factors: int, train_samples: int,
                    eval_samples: int, chunk: int, bounds: tuple = (0.05, 5.0),
                    parameter_efficient: bool = False) -> ConfigDict:
  """The heads compared side by side, by name, at the config's class count K: det | het |
  hetxl | soc (10 dims) | socN (N dims) | llc (LLC phase 1, ceil(2 log2 K) bits, K from the data)."""
  if head == 'det':
    det_head(c)
  elif head in ('het', 'hetxl'):
    hetxl_head(c, head, num_factors=num_factors, train_mc_samples=train_samples,
               eval_mc_samples=eval_samples, mc_chunk_size=chunk, learn_temperature=True,
               temperature_bounds=bounds, parameter_efficient=parameter_efficient)
  elif head.startswith('soc') and (head[3:] == '' or head[3:].isdigit()):
    c.model.head = 'soc'
    c.model.head_kwargs.dims = int(head[3:] or 10)
  elif head == 'llc':
    c.model.head = 'llc_codebook'
    c.model.head_kwargs.bits = 0   # ceil(2 log2 K) of the data's K (llc.heads)
  else:
    raise ValueError(f'head must be det, het, hetxl, soc, socN or llc, got {head!r}')
  return c


def det_head(c: ConfigDict, *, link: str = 'softmax', bias_init: float = 0.0) -> ConfigDict:
  """The deterministic head of a HET/HET-XL config's `det` variant: same link and bias."""
  c.model.head = 'softmax'
  c.model.head_kwargs = ConfigDict(dict(link=link, bias_init=bias_init))
  return c


def synthetic_stand_in(c: ConfigDict, size: int = 32) -> ConfigDict:
  """A seeded synthetic source with the config's class count (private data, benchmarks)."""
  c.dataset.name = 'synthetic'
  c.dataset.image_size = size
  c.dataset.channels = 3
  c.dataset.num_examples = 512
  c.input.image_size = 0
  c.input.train_augment = 'none'
  c.input.eval_preprocess = 'none'
  return c
