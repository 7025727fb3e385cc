"""The loop's bookkeeping (`launch.train`), the heads' step metrics (`training.train_step`) and
the one JSON writer (`training.json_file`), against hand-worked values."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch.train import StepMetrics, _progress
from training import json_file
from training.train_step import head_metrics


class _Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, scalars):
    self.rows.append((step, dict(scalars)))


def _metrics(loss, finite=True, **extra):
  return {'loss': jnp.float32(loss), 'params_finite': jnp.bool_(finite),
          **{k: jnp.float32(v) for k, v in extra.items()}}


def test_head_metrics_are_named_by_their_full_path():
  sown = {'head': {'a': {'temperature': (jnp.float32(1.0),)},
                   'b': {'temperature': (jnp.array([2.0, 4.0]), jnp.float32(5.0))}}}
  got = {k: float(v) for k, v in head_metrics(sown).items()}
  # Two modules that sow 'temperature' stay apart; a value sown twice is averaged (3 and 5).
  assert got == {'head/a/temperature': 1.0, 'head/b/temperature': 4.0}
  assert head_metrics({}) == {}


def test_step_metrics_are_read_one_step_late_and_written_when_due():
  writer = _Writer()
  m = StepMetrics(writer, log_every=2)
  m.add(1, _metrics(3.0, tau=0.5))
  assert writer.rows == []                      # nothing read yet
  m.add(2, _metrics(2.0, tau=0.25))
  assert writer.rows == []                      # step 1 read, not due
  m.add(3, _metrics(1.0))
  assert writer.rows == [(2, {'loss': 2.0, 'tau': 0.25})]   # params_finite is not logged
  m.close()                                     # the last step is written whenever it ends
  assert writer.rows[-1] == (3, {'loss': 1.0})


@pytest.mark.parametrize('loss, finite, what, first_bad', [
    (float('nan'), True, 'loss (nan) on the parameters of step 5', 5),
    (1.0, False, 'parameter update', 6)])
def test_a_non_finite_step_condemns_the_checkpoints_of_its_parameters(loss, finite, what,
                                                                      first_bad):
  """Checkpoint s holds the parameters of step s + 1's loss: a NaN loss at step 6 makes
  checkpoint 5 bad; a NaN update of a finite loss at step 6 only step 6's parameters."""
  asked = []
  m = StepMetrics(_Writer(), log_every=1,
                  set_aside=lambda s: asked.append(s) or (4, ['ckpt/5.nonfinite']))
  m.add(6, _metrics(loss, finite))
  with pytest.raises(FloatingPointError) as err:
    m.add(7, _metrics(1.0))
  assert asked == [first_bad]
  assert str(err.value).startswith(f'non-finite {what} at step 6 (the losses up to step '
                                   f'{first_bad} were finite)')
  assert 'moved aside: ckpt/5.nonfinite.' in str(err.value)
  assert 'Last good checkpoint: step 4;' in str(err.value)
  none_left = StepMetrics(_Writer(), log_every=1)
  with pytest.raises(FloatingPointError, match='No good checkpoint is left'):
    none_left.read(1, _metrics(loss, finite))


def test_progress_line_shows_every_metric():
  line = _progress(5, 10, {'loss': 1.5, 'learning_rate': 3e-5, 'head/t/temperature': 0.75},
                   2.0, 8)
  assert line == ('step 5/10 | loss 1.5 | learning_rate 3e-05 | head/t/temperature 0.75 | '
                  '2.00 steps/s | 16 img/s | ETA 00:00:02')


def test_write_json_writes_from_process_0_only_and_atomically(tmp_path, monkeypatch):
  path = str(tmp_path / 'eval_results.json')
  record = {'step': 3, 'accuracy': 0.5, 'rows': [1, 2]}
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  json_file.write_json(path, record)
  assert os.listdir(tmp_path) == []               # another process writes nothing
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  json_file.write_json(path, record)
  assert json.loads(open(path).read()) == record
  with pytest.raises(TypeError):                  # cannot encode: the old file stays whole
    json_file.write_json(path, {'bad': object()})
  assert json.loads(open(path).read()) == record
  assert os.listdir(tmp_path) == ['eval_results.json']   # no temporary file left behind
