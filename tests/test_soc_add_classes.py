"""Adding classes to a trained SOC model: frozen encoder and old means, new means learnt."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from evaluation.from_checkpoint import evaluate_checkpoint
from soc.add_classes import add_classes, fit_new_means
from tests.helpers import load_config
from training.checkpointing import Checkpointer
from training.experiment import Experiment
from launch.train import train_and_evaluate


def test_new_mean_lands_on_its_cluster():
  rng = np.random.default_rng(0)
  old = jnp.array([[3.0, 0.0], [-3.0, 0.0]])
  centre = np.array([0.0, 4.0])
  z = jnp.asarray(centre + 0.3 * rng.normal(size=(200, 2)), jnp.float32)
  labels = jnp.full((200,), 2)
  new = np.asarray(fit_new_means(old, z, labels, 1, steps=400, learning_rate=0.05,
                                 label_smoothing=0.0))  # smoothing stops it early
  dist_new = np.linalg.norm(new[0] - centre)
  assert dist_new < 1.0, new
  assert dist_new < min(np.linalg.norm(np.asarray(old) - centre, axis=1))


def _soc_config():
  c = load_config('quickstart.py')
  c.model.head = 'soc'
  c.model.head_kwargs = ml_collections.ConfigDict({'dims': 8})
  c.dataset.classes = tuple(range(8))
  c.dataset.num_classes = 8
  c.train.num_steps = 150
  c.train.eval_every = 0
  c.train.async_checkpointing = False
  c.mesh.shape = (-1, 1)
  return c


def test_add_classes_end_to_end(tmp_path):
  old_dir, new_dir = str(tmp_path / 'old'), str(tmp_path / 'new')
  c = _soc_config()
  train_and_evaluate(c, old_dir)
  record = add_classes(c, old_dir, new_dir, [8, 9], steps=200, include_old=False)
  assert record['new_classes_accuracy'] > 0.3  # chance is 0.1

  def params(config, workdir):
    exp = Experiment.build(config)
    ck = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
    return jax.device_get(ck.restore_variables(ck.latest_step(), exp.abstract_restore_target()))['params']

  new_config = _soc_config()
  new_config.dataset.classes = tuple(range(10))
  new_config.dataset.num_classes = 10
  before, after = params(c, old_dir), params(new_config, new_dir)
  for a, b in zip(jax.tree.leaves(before['backbone']), jax.tree.leaves(after['backbone'])):
    np.testing.assert_array_equal(a, b)  # encoder frozen
  np.testing.assert_array_equal(before['head']['projection']['kernel'],
                                after['head']['projection']['kernel'])
  np.testing.assert_array_equal(after['head']['class_means'][:8], before['head']['class_means'])
  assert after['head']['class_means'].shape == (10, 8)
  # The new workdir evaluates through the ordinary eval path, with the same result.
  again = evaluate_checkpoint(new_config, new_dir)
  assert again['accuracy'] == record['accuracy']
  assert again['num_examples'] == 360
