"""Bad input gets a clear error and loses nothing."""
import json
import os
import socket

import ml_collections
import numpy as np
import pytest

from evaluation.from_checkpoint import evaluate_checkpoint
from tests.helpers import load_config, run_main
from training.checkpointing import Checkpointer, IncompatibleCheckpointError, complete_steps
from launch.train import train_and_evaluate
from training.workdir import WorkdirInUseError, load_config as load_workdir_config


def _config(steps=2):
  c = load_config('quickstart.py', 'runlocal')
  c.train.num_steps = steps
  c.train.async_checkpointing = False
  return c


def test_missing_arrayrecord_dataset_says_how_to_prepare(tmp_path):
  c = _config()
  c.dataset.name = 'arrayrecord'
  c.dataset.data_dir = str(tmp_path / 'nothing_here')
  with pytest.raises(FileNotFoundError, match='launch.prepare_data'):
    train_and_evaluate(c, str(tmp_path / 'work'))


def test_missing_tfds_dataset_is_clear(tmp_path):
  c = _config()
  c.dataset.name = 'tfds'
  c.dataset.tfds_name = 'mnist'
  c.dataset.data_dir = str(tmp_path / 'no_tfds')
  with pytest.raises(FileNotFoundError, match="tfds dataset 'mnist'"):
    train_and_evaluate(c, str(tmp_path / 'work'))


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
  train_and_evaluate(_config(), str(tmp_path))
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  other = _config()
  other.model.backbone_kwargs.features = 64  # a different model
  with pytest.raises(IncompatibleCheckpointError, match='different model'):
    train_and_evaluate(other, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before
  assert Checkpointer(str(tmp_path), save_every=1, keep=1, read_only=True).latest_step() == 2


def _files(workdir):
  """{path: bytes} of every file under `workdir` (the LOCK a run holds excepted)."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if name != 'LOCK':
        with open(path, 'rb') as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_a_rejected_command_writes_nothing_into_the_workdir(tmp_path):
  """Issue 27, case 7: a resume refused as "a different model" used to replace config.json by
  the rejected config first (and add a config.2-N.json per try), so eval of the workdir then
  failed. Two refusals of two kinds (the parameter shapes; the optimizer state) change no file,
  and --mode=eval with the saved config still evaluates."""
  work = str(tmp_path)
  trained = train_and_evaluate(_config(), work)
  before = _files(work)
  other_model = _config(steps=4)
  other_model.model.backbone_kwargs.features = 64
  other_optimizer = _config(steps=4)
  other_optimizer.optimizer.name = 'sgd'                 # momentum trace != adam's moments
  for rejected, match in [(other_model, 'different model'), (other_model, 'different model'),
                          (other_optimizer, 'train state this config builds')]:
    with pytest.raises(IncompatibleCheckpointError, match=match):
      train_and_evaluate(rejected, work)
    assert _files(work) == before
  assert evaluate_checkpoint(load_workdir_config(work), work)['accuracy'] == trained['accuracy']


def test_a_rejected_comparison_keeps_its_saved_config(tmp_path):
  """The same kind for a config of several runs (`launch.runs`): its top-level config.json is
  written only once the runs passed their checks."""
  from launch import runs

  def compare(features=None):
    c = ml_collections.ConfigDict({'runs': {'a': _config(steps=1), 'b': _config(steps=1)}})
    if features:
      c.runs.a.model.backbone_kwargs.features = features
    return c

  runs.train(compare(), str(tmp_path))
  before = _files(str(tmp_path))
  with pytest.raises(IncompatibleCheckpointError, match='different model'):
    runs.train(compare(features=64), str(tmp_path))
  assert _files(str(tmp_path)) == before


def test_workdir_in_use_by_a_live_process(tmp_path):
  with open(tmp_path / 'LOCK', 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getppid()}, f)  # alive: our parent
  with pytest.raises(WorkdirInUseError, match='in use by pid'):
    train_and_evaluate(_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_stale_lock_is_taken_over(tmp_path):
  with open(tmp_path / 'LOCK', 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': 2**22 + 12345}, f)  # no such process
  result = train_and_evaluate(_config(steps=1), str(tmp_path))
  assert result['step'] == 1
  assert not os.path.exists(tmp_path / 'LOCK')  # released at the end


def _sgd(c, learning_rate, warmup_steps=0):
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = learning_rate
  c.optimizer.schedule = 'constant'
  c.optimizer.warmup_steps = warmup_steps
  return c


def test_nan_stop_never_names_a_checkpoint_whose_parameters_gave_the_nan(tmp_path):
  """Issue 27, case 1: SGD at 1e20 saving every step. Step 1's update is finite (~1e19), the loss
  on it (step 2) is NaN: checkpoint 1 cannot continue, so it is not named good, it is moved
  aside, and a re-run with a sane rate starts over instead of resuming into the NaN."""
  c = _sgd(_config(steps=4), 1e20)
  c.train.checkpoint_every = 1
  with pytest.raises(FloatingPointError) as err:
    train_and_evaluate(c, str(tmp_path))
  message = str(err.value)
  assert 'at step 2' in message and 'on the parameters of step 1' in message
  assert 'Last good checkpoint' not in message and 'No good checkpoint is left' in message
  assert 'learning_rate' in message                      # what to do
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1.nonfinite']   # kept, not listed
  assert complete_steps(str(tmp_path)) == []
  result = train_and_evaluate(_sgd(c, 1e-3), str(tmp_path))
  assert result['step'] == 4 and np.isfinite(result['nll'])


def test_nan_stop_keeps_and_names_the_last_checkpoint_with_a_finite_loss(tmp_path, capsys):
  """The same kind, another input: a warmup makes step 1's rate 0 (checkpoint 1 = the initial
  parameters, loss finite on them), step 2's 5e19 (checkpoint 2 huge, NaN loss at step 3).
  keep_checkpoints=1 must not rotate checkpoint 1 away; the re-run resumes from it."""
  c = _sgd(_config(steps=5), 1e20, warmup_steps=2)
  c.train.checkpoint_every = 1
  c.train.keep_checkpoints = 1
  with pytest.raises(FloatingPointError) as err:
    train_and_evaluate(c, str(tmp_path))
  message = str(err.value)
  assert 'at step 3' in message and 'on the parameters of step 2' in message
  assert 'Last good checkpoint: step 1;' in message
  assert os.path.join(str(tmp_path), 'checkpoints', '2.nonfinite') in message
  assert complete_steps(str(tmp_path)) == [1]
  capsys.readouterr()
  result = train_and_evaluate(_sgd(c, 1e-3, warmup_steps=2), str(tmp_path))
  assert 'Resumed from checkpoint at step 1.' in capsys.readouterr().out
  assert result['step'] == 5 and np.isfinite(result['nll'])


def test_nan_stop_in_a_process_commits_the_async_save_it_names(tmp_path):
  """The issue's command: the process exits right after the NaN; the async save of step 1 must
  be finalised (not left as 1.orbax-checkpoint-tmp) before it is moved aside, and the error is
  one line."""
  args = ['--config=configs/quickstart.py:runlocal', f'--workdir={tmp_path}',
          '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=1e20',
          '--config.optimizer.schedule=constant', '--config.optimizer.warmup_steps=0',
          '--config.train.num_steps=12', '--config.train.checkpoint_every=1']
  first = run_main(*args, check=False)
  assert first.returncode != 0 and 'No good checkpoint is left' in first.stderr
  assert 'Traceback' not in first.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1.nonfinite']
  assert 'commit_success.txt' in os.listdir(tmp_path / 'checkpoints' / '1.nonfinite')


def test_exception_right_after_an_async_save_keeps_that_save(tmp_path, monkeypatch):
  """Any exception leaving the loop after a save (here raised by the save call itself, once the
  async save is scheduled) leaves that step committed, and a re-run resumes from it."""
  c = _config(steps=6)
  c.train.async_checkpointing = True
  c.train.checkpoint_every = 3
  original = Checkpointer.save

  def save_then_crash(self, step, *args, **kwargs):
    saved = original(self, step, *args, **kwargs)
    if step == 3:
      raise RuntimeError('crash right after scheduling the save of step 3')
    return saved

  monkeypatch.setattr(Checkpointer, 'save', save_then_crash)
  with pytest.raises(RuntimeError, match='right after'):
    train_and_evaluate(c, str(tmp_path))
  # Checked at once: the trainer has already waited for the save to be finalised.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']
  monkeypatch.undo()
  assert train_and_evaluate(c, str(tmp_path))['step'] == 6
  with open(tmp_path / 'metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f if '"loss"' in line]
  # Step 3's metrics are read one step late, so the crash skipped them; the re-run starts at 4.
  assert steps == [1, 2, 4, 5, 6]


def test_batch_not_divisible_by_the_mesh(tmp_path):
  c = _config()
  c.input.batch_size = 12  # 8 fake devices: the batch splits over all of them
  with pytest.raises(ValueError, match='not divisible by the 8 devices of mesh'):
    train_and_evaluate(c, str(tmp_path))


def test_private_dataset_config_stops_with_a_message(tmp_path):
  from tests.helpers import run_main
  proc = run_main('--config=configs/hetxl_jft.py', f'--workdir={tmp_path}', check=False)
  assert proc.returncode == 1
  assert 'JFT-4B is not public' in proc.stderr
  assert 'Traceback' not in proc.stderr
