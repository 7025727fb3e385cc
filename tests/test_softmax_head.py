"""The DET head: logits, loss and the learnt bounded temperature."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from heads.registry import build_head
from heads.softmax import SoftmaxHead


def _init(head, d=5, b=4):
  x = jax.random.normal(jax.random.key(0), (b, d))
  return nn.meta.unbox(head.init(jax.random.key(1), x)['params']), x


def test_logits_and_loss_match_numpy():
  head = SoftmaxHead(num_classes=3, temperature=2.0, label_smoothing=0.1)
  params, x = _init(head)
  labels = jnp.array([0, 1, 2, 1])
  out = head.apply({'params': params}, x, labels)
  w, b = np.asarray(params['loc_layer']['kernel']), np.asarray(params['loc_layer']['bias'])
  logits = (np.asarray(x) @ w + b) / 2.0
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.eye(3)[np.asarray(labels)] * 0.9 + 0.1 / 3
  np.testing.assert_allclose(out.loss, -(targets * logp).sum(-1), rtol=1e-5)


def test_learnt_temperature_midpoint_bounds_and_gradient():
  head = SoftmaxHead(num_classes=4, learn_temperature=True, temperature_bounds=(0.05, 5.0))
  params, x = _init(head)
  labels = jnp.array([0, 1, 2, 3])
  _, state = head.apply({'params': params}, x, labels, mutable=['head_metrics'])
  tau = jax.tree.leaves(state)[0]
  assert np.isclose(tau, (0.05 + 5.0) / 2)

  def loss(p):
    return head.apply({'params': p}, x, labels).loss.mean()
  grad = jax.grad(loss)(params)['temperature']['pre_sigmoid_temperature']
  assert abs(float(grad)) > 0
  tx = optax.sgd(1e4)  # huge steps: tau must still stay inside its bounds
  opt = tx.init(params)
  for _ in range(5):
    g = jax.grad(loss)(params)
    updates, opt = tx.update(g, opt)
    params = optax.apply_updates(params, updates)
    _, state = head.apply({'params': params}, x, labels, mutable=['head_metrics'])
    tau = float(jax.tree.leaves(state)[0])
    assert 0.05 <= tau <= 5.0


def test_registry_and_unknown_head():
  assert isinstance(build_head('softmax', 7), SoftmaxHead)
  with pytest.raises(ValueError, match='unknown head'):
    build_head('nope', 7)
