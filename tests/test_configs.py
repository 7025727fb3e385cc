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
