"""Resume and restore after what users actually leave behind (issue 15, items 2 and 3).

Unfinished step directories (a save that a preemption cut short on gcsfuse, a stray mkdir) are
skipped with a warning by every reader; training batches and the data position do not depend
on the worker count or batch size; an optimizer change that alters the state stops with the
project's own error naming the config fields that changed.
"""
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from absl import flags

from evaluation.from_checkpoint import evaluate_checkpoint
from input_pipeline import pipeline
from input_pipeline.sources import ArraySource
from tests.test_train_eval import _config as train_eval_config, _losses
from launch.train import train_and_evaluate
from training.checkpointing import (Checkpointer, IncompatibleCheckpointError, NoCheckpointError,
                                    complete_steps, restore_variables)
from training.experiment import Experiment
from training.warm_start import warm_start


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags


def _config(steps=4, **overrides):
  # A constant learning rate that does not depend on num_steps, so 2 steps + 2 resumed equal
  # 4 straight.
  return train_eval_config(steps, **{'optimizer.schedule': 'constant',
                                     'optimizer.warmup_steps': 0, **overrides})


def _params(config, workdir, step=None):
  exp = Experiment.build(config)
  ckpt = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
  variables = ckpt.restore_variables(step or ckpt.latest_step(), exp.abstract_restore_target())
  return jax.device_get(variables['params'])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- unfinished step directories ---------------------------------------------------------------

def test_unfinished_newer_steps_are_skipped_by_eval_warm_start_and_resume(tmp_path, caplog,
                                                                          capsys):
  work = str(tmp_path)
  trained = train_and_evaluate(_config(steps=4), work)
  root = os.path.join(work, 'checkpoints')
  os.makedirs(os.path.join(root, '8'))                  # the issue's `mkdir W/checkpoints/8`
  shutil.copytree(os.path.join(root, '4', 'state'), os.path.join(root, '6', 'state'))
  # ^ a half-renamed step 6: arrays there, never finalised (no commit_success.txt)

  with caplog.at_level(logging.WARNING):
    assert complete_steps(work) == [2, 4]
    evaluated = evaluate_checkpoint(_config(steps=4), work)
  warned = caplog.text
  assert os.path.join(root, '6') in warned and os.path.join(root, '8') in warned
  assert 'never finalised' in warned
  assert evaluated['step'] == 4 and evaluated['accuracy'] == trained['accuracy']
  assert evaluated['nll'] == pytest.approx(trained['nll'], rel=1e-6)
  _assert_trees_equal(restore_variables(work)[0]['params'], _params(_config(steps=4), work, 4))

  caplog.clear()
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(_config(steps=6), work)          # resumes from 4, saves 6 again
  assert 'Resumed from checkpoint at step 4.' in capsys.readouterr().out
  assert 'renamed to ' + os.path.join(root, '6.incomplete') in caplog.text
  assert {'6.incomplete', '8.incomplete'} <= set(os.listdir(root))
  assert complete_steps(work) == [2, 4, 6]


def test_only_unfinished_steps_is_a_clear_error(tmp_path):
  os.makedirs(tmp_path / 'checkpoints' / '3' / 'state')
  with pytest.raises(NoCheckpointError, match=r'unfinished step directories: .*checkpoints/3'):
    evaluate_checkpoint(_config(), str(tmp_path))
  with pytest.raises(NoCheckpointError, match=r'(?s)no complete checkpoint.*train that run'):
    warm_start(None, str(tmp_path), ('backbone',))   # fails before it reads the state
  assert os.path.isdir(tmp_path / 'checkpoints' / '3')  # readers never move anything


# --- the data position and the worker count ----------------------------------------------------

def _source(n=40, size=8):
  """Pixel (0, 0) encodes the index; the rest is noise, so augmentation shows."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  return ArraySource(images, np.arange(n) % 7)


def _batches(num_workers, count, batch=4, state=None):
  it = pipeline.train_dataset(_source(), global_batch=batch, seed=3, augment='cifar',
                              image_size=8, channels=1, num_workers=num_workers)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(count)]
  final = it.get_state()
  it.close()
  return out, final


def _stack(batches, key):
  return np.concatenate([b[key] for b in batches])


def test_batches_are_identical_for_any_worker_count():
  reference, _ = _batches(0, 6)
  for workers in (1, 2):
    got, _ = _batches(workers, 6)
    np.testing.assert_array_equal(_stack(got, 'image'), _stack(reference, 'image'))
    np.testing.assert_array_equal(_stack(got, 'label'), _stack(reference, 'label'))


@pytest.mark.parametrize('before,after', [(0, 2), (2, 0)])
def test_position_resumes_across_worker_counts_and_batch_sizes(before, after):
  reference, _ = _batches(0, 9)                           # 36 examples in batches of 4
  _, state = _batches(before, 3)
  assert state == {'next_example': 12}
  got, _ = _batches(after, 6, state=state)
  np.testing.assert_array_equal(_stack(got, 'image'), _stack(reference[3:], 'image'))
  halves, end = _batches(after, 12, batch=2, state=state)  # a smaller batch, same examples
  np.testing.assert_array_equal(_stack(halves, 'image'), _stack(reference[3:], 'image'))
  assert end == {'next_example': 36}


def test_states_of_the_previous_pipeline_are_converted():
  reference, _ = _batches(0, 6)
  legacy = [  # what grain 0.2.18 returned for the earlier batch-after-iter pipeline, 3 batches
      {'next_index': 12},                                   # in-process
      {'next_index_in_cycle': 0, 'next_index_in_datasets': 1, 'iterators_in_use_indices': [0],
       'iterators_in_use_states': [{'next_index': 12}], 'exhausted': [0], 'future_states': {}},
  ]
  for state in legacy:
    got, _ = _batches(2, 3, state=state)
    np.testing.assert_array_equal(_stack(got, 'image'), _stack(reference[3:], 'image'))
  with pytest.raises(ValueError, match='unrecognised training data-iterator state'):
    _batches(0, 1, state={'position': 3})


def test_resume_with_another_worker_count_continues_exactly(tmp_path):
  straight, work = str(tmp_path / 'straight'), str(tmp_path / 'work')
  train_and_evaluate(_config(steps=4, **{'input.num_workers': 0}), straight)
  train_and_evaluate(_config(steps=2, **{'input.num_workers': 0}), work)
  train_and_evaluate(_config(steps=4, **{'input.num_workers': 2}), work)  # the case
  assert _losses(work) == _losses(straight)             # the same batches at every step
  _assert_trees_equal(_params(_config(steps=4), work), _params(_config(steps=4), straight))


# --- a changed optimizer, a checkpoint that cannot resume ----------------------------------------

def test_optimizer_change_on_resume_names_the_field_and_keeps_the_checkpoint(tmp_path):
  train_and_evaluate(_config(steps=2), str(tmp_path))
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  for field, value, shown in [('optimizer.grad_clip_norm', 1.0, '0.0 -> 1.0'),
                              ('optimizer.name', 'sgd', "'adam' -> 'sgd'")]:
    changed = _config(steps=4, **{field: value})
    with pytest.raises(IncompatibleCheckpointError) as error:
      train_and_evaluate(changed, str(tmp_path))
    message = str(error.value)
    assert f'{field}: {shown}' in message, message
    assert 'train.num_steps: 2 -> 4' in message          # every changed field is listed
    assert f'--config.train.init_from={tmp_path}' in message and 'new --workdir' in message
    assert 'opt_state/' in message                       # and the arrays that differ
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before


def test_checkpoint_without_this_process_data_position_is_a_clear_error(tmp_path):
  train_and_evaluate(_config(steps=2), str(tmp_path))
  data = tmp_path / 'checkpoints' / '2' / 'data'
  os.rename(data / 'process_0-of-1.json', data / 'process_0-of-2.json')
  with pytest.raises(IncompatibleCheckpointError, match=r'process_0-of-2\.json.*process count'):
    train_and_evaluate(_config(steps=4), str(tmp_path))
  shutil.rmtree(data)                                    # state only, as soc.add_classes writes
  with pytest.raises(IncompatibleCheckpointError, match='no data-iterator position'):
    train_and_evaluate(_config(steps=4), str(tmp_path))
