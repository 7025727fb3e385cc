"""Every config builds (with :runlocal), variants parse, unknown fields fail clearly."""
import glob
import os

import jax
import pytest

from tests.helpers import ROOT, load_config, resolved_config, run_main
from training.experiment import Experiment

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if 'def get_config(' in open(p).read() and not p.endswith('workdir.py'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_runlocal(name):
  config = resolved_config(name, 'runlocal')
  assert config.train.num_steps <= 10
  assert config.input.batch_size <= 16
  # Abstract model + optimizer state (no compile, no data read for private datasets).
  from training.model import build_model
  from training.optimizer import build_optimizer
  from training.state import abstract_params
  model = build_model(config)
  shape = (config.input.image_size or config.dataset.image_size,) * 2 + (config.dataset.channels,)
  tx = build_optimizer(config.optimizer, config.train.num_steps, abstract_params(model, shape))
  assert model.head.num_classes == config.dataset.num_classes
  assert tx is not None


def test_quickstart_experiment_has_sharded_head():
  config = load_config('quickstart.py', 'runlocal')
  config.mesh.shape = (4, 2)
  exp = Experiment.build(config)
  kernel = exp.shardings.params['head']['loc_layer']['kernel']
  assert tuple(kernel.spec) == (None, 'model')
  assert exp.mesh.shape == {'data': 4, 'model': 2}


def test_unknown_config_argument_fails():
  with pytest.raises(ValueError, match='unknown config argument'):
    load_config('quickstart.py', 'runlocal,typo')


def test_unknown_override_field_fails_clearly(tmp_path):
  proc = run_main('--config=configs/quickstart.py:runlocal', f'--workdir={tmp_path}',
                  '--config.model.no_such_field=1', check=False, timeout=120)
  assert proc.returncode != 0
  assert 'no_such_field' in proc.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_locked_config_rejects_new_fields():
  config = load_config('quickstart.py')
  config.lock()
  with pytest.raises(AttributeError):
    config.train.num_step = 3  # typo of num_steps


# --- typed config arguments (`configs.base.parse_arg`) ------------------------------------------

def test_parse_arg_types_and_defaults():
  from configs.base import parse_arg
  spec = dict(det=False, bits=0, lr=1.0, name='x', runlocal=False, phase=(None, int))
  args = parse_arg(' det ,bits=20,lr=5e-4,name=a=b', **spec)
  assert args.to_dict() == {'det': True, 'bits': 20, 'lr': 5e-4, 'name': 'a=b',
                            'runlocal': False, 'phase': None}
  assert type(args.bits) is int and type(args.lr) is float   # pylint: disable=unidiomatic-typecheck
  assert parse_arg(None, **spec).to_dict() == parse_arg('', **spec).to_dict() == {
      'det': False, 'bits': 0, 'lr': 1.0, 'name': 'x', 'runlocal': False, 'phase': None}
  assert parse_arg('det=False,runlocal=true,phase=2,lr=3', **spec).to_dict() == {
      'det': False, 'bits': 0, 'lr': 3.0, 'name': 'x', 'runlocal': True, 'phase': 2}
  assert parse_arg('name=', **spec).name == ''


@pytest.mark.parametrize('arg, message', [
    ('det,bitz=3', "unknown config argument 'bitz' in 'det,bitz=3'; this config accepts "
                   r"\['bits', 'det', 'lr'\]"),
    ('bits=ten', "config argument 'bits=ten' in 'bits=ten': bits must be int: bits=<int>"),
    ('bits=2.5', "config argument 'bits=2.5' in 'bits=2.5': bits must be int"),
    ('lr', "config argument 'lr' in 'lr': lr must be float: lr=<float>"),
    ('det=maybe', "config argument 'det=maybe' in 'det=maybe': det must be True or False "
                  r"\(the bare name is True\)"),
])
def test_parse_arg_rejects_unknown_keys_and_bad_values(arg, message):
  from configs.base import parse_arg
  with pytest.raises(ValueError, match=f'^{message}'):
    parse_arg(arg, det=False, bits=0, lr=1.0)


def test_config_arguments_arrive_typed():
  c = load_config('mosaic.py', 'det,epochs=12,width=0.5')   # both differ from the defaults
  assert (c.model.head, c.train.epochs, c.model.backbone_kwargs.width) == ('softmax', 12.0, 0.5)
  c = load_config('compare_heads.py', 'dataset=cifar10,head=det,epochs=10,width=0.125,'
                  'noise=0.0,noise_kind=symmetric')
  assert (c.train.epochs, c.model.backbone_kwargs.width, c.dataset.label_noise) == (
      10.0, 0.125, 0.0)
  assert load_config('contrastive_caltech.py', 'batch=64,size=32').input.image_size == 32
  assert load_config('compare_heads.py', 'head=hetxl,tau_lr=10').optimizer.lr_mults == (
      ('.*temperature.*', 10.0),)
  with pytest.raises(ValueError, match='tau_lr= applies to head=het or hetxl only'):
    load_config('compare_heads.py', 'head=det,tau_lr=10')
  with pytest.raises(ValueError, match="'epochs=ten' in 'det,epochs=ten': epochs must be float"):
    load_config('mosaic.py', 'det,epochs=ten')


def test_runlocal_shrinks_any_config_the_same_way():
  hetxl = load_config('hetxl_cifar10.py', 'runlocal')
  assert (hetxl.input.batch_size, hetxl.input.eval_batch_size, hetxl.train.num_steps,
          hetxl.train.checkpoint_every, hetxl.eval.max_examples) == (16, 32, 4, 4, 64)
  assert hetxl.model.backbone_kwargs.width == 0.125
  kw = hetxl.model.head_kwargs
  assert (kw.train_mc_samples, kw.eval_mc_samples, kw.mc_chunk_size) == (8, 8, 4)
  assert load_config('hetxl_cifar10.py', 'det,runlocal').model.head_kwargs.to_dict() == \
      load_config('hetxl_cifar10.py', 'det').model.head_kwargs.to_dict()   # no MC to shrink
  jft = load_config('hetxl_jft.py', 'runlocal')   # stand_in: synthetic data, float32, tiny ViT
  assert (jft.dataset.name, jft.dataset.num_classes, jft.dataset.eval_split) == (
      'synthetic', 29_593, 'test')
  assert (jft.model.dtype, jft.model.head_kwargs.compute_dtype) == ('float32', 'float32')
  assert (jft.model.backbone_kwargs.width, jft.model.backbone_kwargs.depth) == (64, 1)
  assert load_config('hetxl_jft.py').model.dtype == 'bfloat16'


# --- head setters (`configs.base.hetxl_head`) ---------------------------------------------------

@pytest.mark.parametrize('kind', ['het', 'hetxl'])
def test_hetxl_head_sets_only_what_differs_from_the_head_class(kind):
  """Every option is listed (so a locked config accepts it) at the class's own default; the
  options a recipe passes are the only values that differ."""
  from configs import base, schema
  from hetxl import heads
  cls = {'het': heads.HETHead, 'hetxl': heads.HETXLHead}[kind]
  c = base.hetxl_head(schema.base_config(), kind, num_factors=4, mc_chunk_size=7,
                      **base.LEARNT_TEMPERATURE)
  c.lock()
  c.model.head_kwargs.quadrature_nodes = 9          # every option exists on a locked config
  kwargs = c.model.head_kwargs.to_dict()
  assert c.model.head == kind and sorted(kwargs) == sorted(base.HETEROSCEDASTIC_OPTIONS)
  head = cls(num_classes=3, **kwargs)
  given = dict(num_factors=4, mc_chunk_size=7, quadrature_nodes=9, learn_temperature=True,
               temperature_bounds=(0.05, 5.0))
  for name in base.HETEROSCEDASTIC_OPTIONS:
    got, want = getattr(head, name), given.get(name, getattr(cls, name, None))
    if name == 'compute_dtype':
      got, want = jax.numpy.dtype(got), jax.numpy.dtype(want)
    assert got == want, name
  with pytest.raises(ValueError, match='unknown'):
    base.hetxl_head(schema.base_config(), kind, num_factors=2, train_samples=10)  # old name
  with pytest.raises(ValueError, match='needs num_factors'):
    base.hetxl_head(schema.base_config(), kind, mc_chunk_size=7)
