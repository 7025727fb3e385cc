"""Per-parameter optimizer rules (training/optimizer.py): frozen parameters, weight-decay and
learning-rate multipliers, against numpy closed forms of one optimizer step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.schema import base_config
from training.optimizer import build_optimizer, param_multipliers, param_paths

LR, WD, EPS = 0.1, 0.01, 1e-8  # EPS: optax's adam default
# rtol 2e-5 below: optax forms adam's bias correction 1 - 0.999**t in float32 (6e-6 off)


def _params():
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {'backbone': {'conv1': {'kernel': leaf(3, 4), 'bias': leaf(4)},
                       'bn': {'scale': leaf(4), 'bias': leaf(4)}},
          'head': {'loc_layer': {'kernel': leaf(4, 5), 'bias': leaf(5)},
                   'temperature': {'pre_sigmoid_temperature': leaf()}}}


def _grads(seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())


def _config(name='adamw', **fields):
  c = base_config().optimizer
  c.name, c.learning_rate, c.schedule, c.weight_decay, c.momentum = name, LR, 'constant', WD, 0.9
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def _step(c, params, grads_list):
  """Updates (one per gradient) and the final state of the optimizer `c` builds."""
  tx = build_optimizer(c, 100, params)
  state, out = tx.init(params), []
  for g in grads_list:
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, state, params


def _flat(tree):
  return dict(zip(param_paths(tree), jax.tree.leaves(tree)))


def _one_step_closed_form(name, p, g, wd):
  """One step from a fresh state, lr constant LR: numpy, from the optimizers' definitions."""
  p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
  if name == 'adamw':   # m_hat = g, v_hat = g^2; decoupled decay
    return -LR * (g / (np.abs(g) + EPS) + wd * p)
  g = g + wd * p        # coupled: L2 in the gradient
  if name == 'adam':
    return -LR * g / (np.abs(g) + EPS)
  return -LR * g        # sgd, momentum trace starts at 0: trace = g


@pytest.mark.parametrize('name', ['adamw', 'adam', 'sgd'])
def test_default_decay_skips_bias_norm_scale_and_temperature(name):
  params, grads = _params(), _grads()
  (update,), _, _ = _step(_config(name), params, [grads])
  decays = {'backbone/conv1/kernel', 'head/loc_layer/kernel'}
  for path, p in _flat(params).items():
    want = _one_step_closed_form(name, p, _flat(grads)[path], WD if path in decays else 0.0)
    np.testing.assert_allclose(_flat(update)[path], want, rtol=2e-5, atol=1e-7, err_msg=path)


@pytest.mark.parametrize('name', ['adamw', 'adam', 'sgd'])
def test_zero_gradient_moves_only_decayed_parameters(name):
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  (update,), _, _ = _step(_config(name), params, [zeros])
  for path, u in _flat(update).items():
    p = np.asarray(_flat(params)[path], np.float64)
    if path.endswith('/kernel'):
      # adamw: -lr * wd * p; coupled adam: g = wd p, so -lr * sign(p) (to within eps)
      want = -LR * (WD * p if name != 'adam' else WD * p / (np.abs(WD * p) + EPS))
      np.testing.assert_allclose(u, want, rtol=2e-5, err_msg=path)
    else:
      assert not np.any(np.asarray(u)), f'{path} decayed'


def test_decay_all_decays_every_parameter_and_wd_mults_override():
  params, grads = _params(), _grads()
  c = _config('adamw', decay_all=True, wd_mults=(('head/loc_layer/.*', 0.5), ('.*/bn/.*', 0.0)))
  (update,), _, _ = _step(c, params, [grads])
  for path, p in _flat(params).items():
    mult = 0.5 if path.startswith('head/loc_layer') else 0.0 if '/bn/' in path else 1.0
    want = _one_step_closed_form('adamw', p, _flat(grads)[path], WD * mult)
    np.testing.assert_allclose(_flat(update)[path], want, rtol=2e-5, atol=1e-7, err_msg=path)


@pytest.mark.parametrize('name', ['adamw', 'adam', 'sgd'])
def test_lr_multiplier_scales_the_whole_update_exactly(name):
  params, grads = _params(), [_grads(s) for s in range(3)]
  base, _, _ = _step(_config(name), params, grads)
  scaled, _, _ = _step(_config(name, lr_mults=(('head/.*', 0.5), ('.*/conv1/kernel', 4.0))),
                       params, grads)
  # The parameters differ after step 1 only where the multiplier is not 1, so compare the
  # first step everywhere and later steps on the unscaled parameters (their state is theirs).
  # To 1e-6, not bit for bit: XLA fuses a group's elementwise ops differently when the groups
  # differ (1-ulp changes); a multiplier off by more than that still fails.
  for path in _flat(params):
    mult = 0.5 if path.startswith('head/') else 4.0 if path.endswith('conv1/kernel') else 1.0
    np.testing.assert_allclose(_flat(scaled[0])[path], mult * _flat(base[0])[path], rtol=1e-6,
                               err_msg=path)
    if mult == 1.0:
      for b, s in zip(base, scaled):
        np.testing.assert_allclose(_flat(s)[path], _flat(b)[path], rtol=1e-6, err_msg=path)


def test_frozen_parameters_get_no_update_and_no_state():
  params, grads = _params(), [_grads(s) for s in range(3)]
  c = _config('adamw', frozen=('backbone/.*',), lr_mults=(('head/temperature/.*', 0.0),))
  updates, state, new = _step(c, params, grads)
  frozen = [p for p in _flat(params) if p.startswith(('backbone/', 'head/temperature/'))]
  for path in frozen:
    assert np.asarray(_flat(new)[path]).tobytes() == np.asarray(_flat(params)[path]).tobytes()
  # Adam state: mu and nu for the trainable parameters only (and scalar step counts).
  trainable = sum(x.size for p, x in _flat(params).items() if p not in frozen)
  state_size = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert state_size == 2 * trainable
  state_paths = [param_path for param_path in param_paths(state)]
  assert not [s for s in state_paths for f in frozen if s.endswith(f)]


def test_clipping_uses_trainable_gradients_only():
  params = _params()
  grads = jax.tree.map(lambda g: 0.01 * g, _grads())
  grads['backbone']['conv1']['kernel'] = 1e6 * jnp.ones((3, 4))  # frozen: must not clip others
  c = _config('sgd', frozen=('backbone/conv1/.*',), grad_clip_norm=1.0, weight_decay=0.0)
  (update,), _, _ = _step(c, params, [grads])
  for path, g in _flat(grads).items():
    if not path.startswith('backbone/conv1/'):
      np.testing.assert_allclose(_flat(update)[path], -LR * np.asarray(g), rtol=1e-6)


def test_multipliers_table():
  c = _config(frozen=('head/temperature/.*',), lr_mults=(('head/.*', 2.0),),
              wd_mults=(('.*/conv1/bias', 3.0),))
  assert param_multipliers(c, _params()) == {
      'backbone/bn/bias': (1.0, 0.0), 'backbone/bn/scale': (1.0, 0.0),
      'backbone/conv1/bias': (1.0, 3.0), 'backbone/conv1/kernel': (1.0, 1.0),
      'head/loc_layer/bias': (2.0, 0.0), 'head/loc_layer/kernel': (2.0, 1.0),
      'head/temperature/pre_sigmoid_temperature': (0.0, 0.0)}


@pytest.mark.parametrize('field, value, message', [
    ('wd_mults', (('head/nothing/.*', 0.0),), r"wd_mults: the regex 'head/nothing/\.\*' matches "
                                               r"no parameter.*'head/loc_layer/kernel'"),
    ('lr_mults', (('conv1/kernel', 2.0),), 'matches no parameter'),  # fullmatch, not search
    ('frozen', ('/backbone/.*',), 'starts with "/"'),
    ('frozen', ('backbone/(',), 'not a valid regex'),
    ('lr_mults', (('head/.*', -1.0),), 'finite number >= 0'),
    ('wd_mults', ('head/.*',), r'\(regex, multiplier\) pair'),
    ('name', 'lamb', "unknown optimizer.name 'lamb'"),
])
def test_bad_rules_are_clear_errors(field, value, message):
  with pytest.raises(ValueError, match=message):
    build_optimizer(_config(**{field: value}), 10, _params())


def test_frozen_backbone_in_the_sharded_train_step():
  """Through the real train step on a (4, 2) mesh: frozen parameters bit-identical after 3
  steps, no optimizer state for them, the rest trained."""
  from tests.helpers import load_config
  from training.experiment import Experiment
  from training.train_step import make_train_step
  from training.mesh import batch_sharding
  from training.state import create_state
  config = load_config('quickstart.py', 'runlocal')
  config.mesh.shape = (4, 2)
  config.optimizer.frozen = ('backbone/conv[12]/.*',)
  config.optimizer.weight_decay = 0.1
  exp = Experiment.build(config)
  state = create_state(exp.model, exp.tx, exp.image_shape, exp.shardings, jax.random.key(0))
  before = jax.tree.map(np.asarray, state.params)
  rng = np.random.default_rng(0)
  b = config.input.batch_size
  batch = jax.device_put({'image': rng.integers(0, 256, (b, *exp.image_shape), np.uint8),
                          'label': rng.integers(0, 10, b).astype(np.int32),
                          'mask': np.ones(b, np.float32)}, batch_sharding(exp.mesh))
  step = make_train_step(exp)
  for _ in range(3):
    state, _ = step(state, batch)
  after = _flat(jax.tree.map(np.asarray, state.params))
  for path, p in _flat(before).items():
    same = after[path].tobytes() == p.tobytes()
    assert same == path.startswith(('backbone/conv1/', 'backbone/conv2/')), path
  trainable = sum(x.size for p, x in _flat(before).items() if not p.startswith(
      ('backbone/conv1/', 'backbone/conv2/')))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0) == 2 * trainable


_SCHEDULE = (r'learning rate (\S+) at step 1, (\S+) at step (\d+) \(after (\d+) warmup steps\), '
             r'cosine to (\S+) at the last step (\d+)')


def test_a_short_run_decays_and_prints_the_schedule_the_optimizer_runs(capsys):
  """Issue 28 point 1: compare_heads at 0.25 epochs of 60k images is 117 steps, shorter than
  its min(200 steps, 1 epoch) warmup. The warmup is cut to a tenth of the run with a one-line
  warning, and the printed learning rates (first step, peak, last step) are those of the
  optimizer itself (plain SGD, gradient 1: the update of step s is -lr(s)) and of the cosine
  closed form; the last step's rate is below 1% of the peak. Resolving again prints nothing."""
  import re
  from tests.helpers import FACTS, load_config
  from training.resolve import resolve
  c = load_config('compare_heads.py', 'epochs=0.25')
  c.dataset.update(FACTS['cifar10'], train_examples=60_000)
  resolve(c, with_data=False)
  out, err = capsys.readouterr()
  assert c.train.num_steps == 117 and c.optimizer.warmup_steps == 11
  assert err.count('config warning:') == 1 and 'warmup_steps 200 >= train.num_steps 117' in err
  first, peak, peak_step, warmup, last, last_step = re.search(_SCHEDULE, out).groups()
  assert (int(peak_step), int(warmup), int(last_step)) == (12, 11, 117)
  n, w, lr = 117, 11, 1e-3
  closed = {1: 0.0, 12: lr, n: lr * 0.5 * (1 + np.cos(np.pi * (n - 1 - w) / (n - w)))}
  sgd = c.optimizer.copy_and_resolve_references()
  sgd.name, sgd.momentum, sgd.weight_decay, sgd.grad_clip_norm = 'sgd', 0.0, 0.0, 0.0
  params = {'w': jnp.zeros(())}
  tx = build_optimizer(sgd, n, params)
  state, rates = tx.init(params), []
  update = jax.jit(tx.update)
  for _ in range(n):
    u, state = update({'w': jnp.ones(())}, state, params)
    rates.append(-float(u['w']))
  for step, printed in ((1, first), (12, peak), (n, last)):
    assert float(printed) == pytest.approx(closed[step], rel=5e-3, abs=1e-12)
    assert float(printed) == pytest.approx(rates[step - 1], rel=5e-3, abs=1e-12)
  assert max(rates) == pytest.approx(lr) and rates[-1] < 0.01 * lr
  resolve(c, with_data=False)
  assert capsys.readouterr() == ('', '')
