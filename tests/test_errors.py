"""Bad input gets a clear error and loses nothing."""
import json
import os
import socket

import pytest

from tests.helpers import load_config, run_main
from training.checkpointing import Checkpointer, IncompatibleCheckpointError
from launch.train import train_and_evaluate
from training.workdir import WorkdirInUseError


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


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
  c = _config(steps=40)
  c.train.checkpoint_every = 1
  c.optimizer.learning_rate = 1e30
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  with pytest.raises(FloatingPointError, match=r'non-finite .* at step (\d+)') as err:
    train_and_evaluate(c, str(tmp_path))
  bad_step = int(err.value.args[0].split('at step ')[1].split()[0])
  latest = Checkpointer(str(tmp_path), save_every=1, keep=1, read_only=True).latest_step()
  assert latest is not None and latest < bad_step
  assert f'Last good checkpoint: step {latest}' in err.value.args[0]


def test_nan_stop_in_a_process_commits_the_async_save_it_names(tmp_path):
  """The issue's command: the process exits right after the NaN; the async save of step 1 must
  be finalised (not left as 1.orbax-checkpoint-tmp) and a re-run must resume from it."""
  args = ['--config=configs/quickstart.py:runlocal', f'--workdir={tmp_path}',
          '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=1e20',
          '--config.optimizer.schedule=constant', '--config.optimizer.warmup_steps=0',
          '--config.train.num_steps=12', '--config.train.checkpoint_every=1']
  first = run_main(*args, check=False)
  assert first.returncode != 0 and 'Last good checkpoint: step 1.' in first.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  again = run_main(*args, check=False)
  assert 'Resumed from checkpoint at step 1.' in again.stdout


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


def test_batch_not_divisible_by_data_axis(tmp_path):
  c = _config()
  c.input.batch_size = 12  # 8 fake devices on the data axis
  with pytest.raises(ValueError, match='not divisible by the data axis'):
    train_and_evaluate(c, str(tmp_path))


def test_private_dataset_config_stops_with_a_message(tmp_path):
  from tests.helpers import run_main
  proc = run_main('--config=configs/hetxl_jft.py', f'--workdir={tmp_path}', check=False)
  assert proc.returncode == 1
  assert 'JFT-4B is not public' in proc.stderr
  assert 'Traceback' not in proc.stderr
