"""A model is built, its train step compiled and a checkpoint restored without the data on disk:
the image shape comes from the config (`config_image_shape`), and no data source is opened."""
import jax
import ml_collections
import numpy as np
import pytest

from input_pipeline import sources
from tests.helpers import resolved_config
from training.checkpointing import Checkpointer, restore_variables
from training.experiment import Experiment, config_image_shape
from training.state import create_state
from training.train_step import make_train_step


def _no_data(*args, **kwargs):
  raise AssertionError('data was read')


def test_build_compile_and_restore_without_the_data(tmp_path, monkeypatch):
  missing = tmp_path / 'cifar10'          # the directory the config names does not exist
  c = resolved_config('compare_heads.py', 'dataset=cifar10,runlocal',
                      **{'dataset.data_dir': str(missing), 'dataset.image_size': 32})
  c.model.backbone, c.model.backbone_kwargs = 'convnet', ml_collections.ConfigDict()  # fast
  for name in ('build_source', 'dataset_facts'):
    monkeypatch.setattr(sources, name, _no_data)
  monkeypatch.setattr('training.experiment.build_source', _no_data)

  exp = Experiment.build(c, with_data=False)
  assert exp.image_shape == (32, 32, 3) == config_image_shape(c)
  compiled = make_train_step(exp).lower(exp.abstract_restore_target(),
                                        exp.abstract_batch()).compile()

  state = create_state(exp.model, exp.tx, exp.image_shape, exp.shardings, jax.random.key(1))
  ckpt = Checkpointer(str(tmp_path / 'work'), save_every=1, keep=1, use_async=False)
  ckpt.save(3, state, None, force=True)
  ckpt.close()
  variables, step = restore_variables(str(tmp_path / 'work'), exp.abstract_restore_target())
  assert step == 3
  for want, got in zip(jax.tree.leaves(state.params), jax.tree.leaves(variables['params'])):
    np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
    assert got.sharding == want.sharding

  # The compiled step runs on a batch of the abstract layout (the state is donated: last).
  fill = {'image': np.zeros, 'label': np.zeros, 'mask': np.ones}
  batch = {k: jax.device_put(fill[k](a.shape, a.dtype), a.sharding)
           for k, a in exp.abstract_batch().items()}
  new_state, metrics = compiled(state, batch)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics['loss']))
  assert not missing.exists()


def test_image_shape_from_the_config():
  c = resolved_config('compare_heads.py', 'dataset=cifar10,runlocal')
  c.dataset.image_size = 0
  assert config_image_shape(c) is None             # stored size unknown: only the data says
  c.dataset.image_size = 32
  assert config_image_shape(c) == (32, 32, 3)       # the stored side
  c.input.image_size = 24
  assert config_image_shape(c) == (24, 24, 3)       # the pipeline resizes to it
