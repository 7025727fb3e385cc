"""End to end through the trainer: train + eval, resume equivalence, meshes, restore elsewhere."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from evaluation.from_checkpoint import evaluate_checkpoint
from tests.helpers import FAST_COMPILE, ROOT, last_json, load_config, override, run_main
from training.checkpointing import Checkpointer
from training.experiment import Experiment
from launch.train import train_and_evaluate


def _config(steps=4, **overrides):
  c = load_config('quickstart.py', 'runlocal')
  c.train.num_steps = steps
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.async_checkpointing = False
  return override(c, overrides)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _restore_params(config, workdir):
  exp = Experiment.build(config)
  ckpt = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
  variables = ckpt.restore_variables(ckpt.latest_step(), exp.abstract_restore_target())
  return jax.device_get(variables['params'])


def test_launch_main_one_step_train_then_eval(tmp_path):
  args = ['--config=configs/quickstart.py:runlocal', f'--workdir={tmp_path}',
          '--config.train.num_steps=1']
  train = run_main(*args)
  trained = last_json(train.stdout)
  assert trained['step'] == 1 and trained['num_examples'] == 64
  evaluated = last_json(run_main(*args, '--mode=eval').stdout)
  for key in ('step', 'accuracy', 'nll', 'ece', 'num_examples'):
    assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key
  assert os.path.exists(evaluated['reliability_diagram'])
  with open(tmp_path / 'eval_results.json') as f:
    assert json.load(f)['accuracy'] == evaluated['accuracy']
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['train']['num_steps'] == 1  # the resolved config, override included
  assert os.listdir(tmp_path / 'tensorboard')


class _PreemptAfter:
  """Stands in for the SIGTERM flag: reports a preemption at the n-th step."""

  def __init__(self, n):
    self.calls, self.n = 0, n

  @property
  def raised(self):
    self.calls += 1
    return self.calls >= self.n


def test_resume_is_equivalent_to_a_straight_run(tmp_path, monkeypatch):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train_and_evaluate(_config(steps=6, **{'train.checkpoint_every': 5}), straight)
  import launch.train
  monkeypatch.setattr(launch.train, '_PreemptionFlag', lambda: _PreemptAfter(3))
  interrupted = train_and_evaluate(_config(steps=6, **{'train.checkpoint_every': 5}), resumed)
  assert interrupted == {}  # preempted: saved at step 3, no final eval
  assert Checkpointer(resumed, save_every=1, keep=1, read_only=True).latest_step() == 3
  monkeypatch.undo()
  train_and_evaluate(_config(steps=6, **{'train.checkpoint_every': 5}), resumed)
  assert _losses(straight) == _losses(resumed)  # identical batches and params at every step
  a, b = _restore_params(_config(steps=6), straight), _restore_params(_config(steps=6), resumed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_meshes_agree_and_shard_the_head(tmp_path):
  results = {}
  for shape in [(4, 2), (8, 1)]:
    workdir = str(tmp_path / f'mesh{shape[0]}x{shape[1]}')
    results[shape] = train_and_evaluate(_config(steps=2, **{'mesh.shape': shape}), workdir)
  exp = Experiment.build(_config(**{'mesh.shape': (4, 2)}))
  assert exp.shardings.params['head']['loc_layer']['kernel'].spec == jax.sharding.PartitionSpec(None, 'model')
  assert results[(4, 2)]['nll'] == pytest.approx(results[(8, 1)]['nll'], rel=1e-4)
  assert results[(4, 2)]['accuracy'] == results[(8, 1)]['accuracy']


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  workdir = str(tmp_path)
  trained = train_and_evaluate(_config(steps=2, **{'mesh.shape': (4, 2)}), workdir)
  same = evaluate_checkpoint(_config(steps=2, **{'mesh.shape': (2, 4)}), workdir)
  assert same['accuracy'] == trained['accuracy']
  # A different device count altogether: 3 devices in a fresh process.
  proc = run_main('--config=configs/quickstart.py:runlocal', f'--workdir={workdir}',
                  '--config.train.num_steps=2', '--config.input.batch_size=12',
                  '--config.input.eval_batch_size=24', '--mode=eval', devices=3)
  other = last_json(proc.stdout)
  assert other['num_examples'] == trained['num_examples']
  assert other['nll'] == pytest.approx(trained['nll'], rel=1e-5)


def test_killed_during_save_keeps_last_checkpoint_loadable(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS=FAST_COMPILE)
  cmd = [sys.executable, '-m', 'launch.main', '--config=configs/quickstart.py',
         f'--workdir={tmp_path}', '--config.train.num_steps=100000',
         '--config.train.checkpoint_every=1', '--config.train.log_every=1',
         '--config.train.keep_checkpoints=2']
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    for line in proc.stdout:
      if line.startswith('step 40/'):
        break
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  config = load_config('quickstart.py')
  config.train.num_steps = 100000
  result = evaluate_checkpoint(config, str(tmp_path))
  assert result['step'] >= 30
  assert result['num_examples'] == 360
  # And training resumes from it.
  config.train.num_steps = result['step'] + 2
  config.train.eval_every = 0
  resumed = train_and_evaluate(config, str(tmp_path))
  assert resumed['step'] == result['step'] + 2


def test_warm_start_takes_the_backbone_only(tmp_path):
  source = str(tmp_path / 'source')
  train_and_evaluate(_config(steps=2), source)
  c = _config(steps=1)
  c.train.init_from = source
  c.optimizer.learning_rate = 0.0
  c.optimizer.warmup_steps = 0
  target = str(tmp_path / 'target')
  train_and_evaluate(c, target)
  src, tgt = _restore_params(_config(steps=2), source), _restore_params(c, target)
  for a, b in zip(jax.tree.leaves(src['backbone']), jax.tree.leaves(tgt['backbone'])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(src['head']['loc_layer']['kernel'], tgt['head']['loc_layer']['kernel'])
  bad = _config(steps=1)
  bad.train.init_from = source
  bad.train.init_prefixes = ('no_such_module',)
  with pytest.raises(ValueError, match='nothing under'):
    train_and_evaluate(bad, str(tmp_path / 'bad'))
