"""SOC head against direct [B, K, m] evaluations and the behaviour its loss must have."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from soc.head import SOCHead, gaussian_log_density, max_log_density, softmax_entropy


def _setup(learn_scale, k=6, m=3, d=5, b=4, seed=0):
  head = SOCHead(num_classes=k, dims=m, learn_scale=learn_scale)
  x = jax.random.normal(jax.random.key(seed), (b, d))
  params = nn.meta.unbox(head.init(jax.random.key(seed + 1), x)['params'])
  if learn_scale:
    params['class_scales'] = jax.random.uniform(jax.random.key(9), (k, m), minval=0.5, maxval=2.0)
  return head, params, x


def _direct_log_density(z, means, scales):
  """Plain [B, K, m] evaluation of log N(z; mu_k, diag(s_k^2))."""
  diff = (z[:, None, :] - means[None]) / scales[None]
  return (-0.5 * diff ** 2 - np.log(scales)[None] - 0.5 * np.log(2 * np.pi)).sum(-1)


def _embedding(params, x):
  return np.asarray(x) @ np.asarray(params['projection']['kernel']) + np.asarray(
      params['projection']['bias'])


def test_unit_scale_is_half_squared_distance_up_to_a_row_constant():
  head, params, x = _setup(False)
  logits = np.asarray(head.apply({'params': params}, x).logits)
  z, mu = _embedding(params, x), np.asarray(params['class_means'])
  sq = ((z[:, None] - mu[None]) ** 2).sum(-1)
  diff = logits - (-0.5 * sq)
  np.testing.assert_allclose(diff, diff[:, :1].repeat(diff.shape[1], 1), atol=1e-4)
  np.testing.assert_allclose(logits, _direct_log_density(z, mu, np.ones_like(mu)), atol=1e-4)


def test_learnt_scale_matches_direct_evaluation():
  head, params, x = _setup(True)
  logits = np.asarray(head.apply({'params': params}, x).logits)
  z = _embedding(params, x)
  want = _direct_log_density(z, np.asarray(params['class_means']),
                             np.asarray(params['class_scales']))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_loss_is_mean_of_image_and_class_terms():
  head, params, x = _setup(False)
  labels = jnp.array([0, 2, 1, 5])
  out = head.apply({'params': params}, x, labels)
  mu = params['class_means']
  k = mu.shape[0]

  def smoothed_ce(logits, y):
    t = optax.smooth_labels(jax.nn.one_hot(y, k), 0.1)
    return optax.softmax_cross_entropy(logits, t)
  image = smoothed_ce(out.logits, labels)
  klass = smoothed_ce(gaussian_log_density(mu, mu), jnp.arange(k)).mean()
  np.testing.assert_allclose(out.loss, (image + klass) / 2, rtol=1e-5)


def test_both_loss_terms_send_gradient_to_the_means():
  head, params, x = _setup(False)
  labels = jnp.array([0, 2, 1, 5])

  def class_term(mu):
    k = mu.shape[0]
    t = optax.smooth_labels(jax.nn.one_hot(jnp.arange(k), k), 0.1)
    return optax.softmax_cross_entropy(gaussian_log_density(mu, mu), t).mean()

  def image_term(p):
    z = x @ p['projection']['kernel'] + p['projection']['bias']
    t = optax.smooth_labels(jax.nn.one_hot(labels, 6), 0.1)
    return optax.softmax_cross_entropy(gaussian_log_density(z, p['class_means']), t).mean()

  g_class = jax.grad(class_term)(params['class_means'])
  g_image = jax.grad(image_term)(params)['class_means']
  assert float(jnp.abs(g_class).sum()) > 1e-6
  assert float(jnp.abs(g_image).sum()) > 1e-6
  g_total = jax.grad(lambda p: head.apply({'params': p}, x, labels).loss.mean())(params)
  np.testing.assert_allclose(g_total['class_means'], (g_class + g_image) / 2, rtol=1e-4,
                             atol=1e-6)


def test_class_term_pushes_coincident_means_apart():
  head, params, x = _setup(False, k=3, m=2)
  mu = params['class_means'].at[1].set(params['class_means'][0] + 1e-3)
  params['class_means'] = mu
  labels = jnp.array([2, 2, 2, 2])  # the image term does not involve classes 0 and 1 directly
  grad = jax.grad(lambda p: head.apply({'params': p}, x, labels).loss.mean())(params)
  stepped = mu - 0.5 * grad['class_means']
  before = float(jnp.linalg.norm(mu[0] - mu[1]))
  after = float(jnp.linalg.norm(stepped[0] - stepped[1]))
  assert after > before * 1.05  # the very first step already separates them
  loss = lambda p: head.apply({'params': p}, x, labels).loss.mean()
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
  for _ in range(100):
    params = step(params)
  assert float(jnp.linalg.norm(params['class_means'][0] - params['class_means'][1])) > 0.3


def test_confidence_scores():
  logits = jnp.array([[0.0, -10.0, -10.0], [-1.0, -1.0, -1.0]])
  np.testing.assert_allclose(max_log_density(logits), [0.0, -1.0])
  ent = np.asarray(softmax_entropy(logits))
  assert ent[0] < 1e-3 and np.isclose(ent[1], np.log(3), atol=1e-6)


def test_blocked_class_term_equals_the_dense_one_hot_loss(monkeypatch):
  """The class term in blocks of rows (padding the last) equals CE over the full [K, K]
  class-logit matrix with smoothed one-hot targets, in value and gradient."""
  import soc.head
  rng = np.random.default_rng(3)
  for num_classes, block, learn_scale in ((7, 3, False), (10, 4, True), (6, 1024, True)):
    monkeypatch.setattr(soc.head, 'CLASS_BLOCK', block)
    means = jnp.asarray(rng.standard_normal((num_classes, 4)), jnp.float32)
    scales = jnp.asarray(0.5 + rng.random((num_classes, 4)), jnp.float32) if learn_scale else None

    def dense(mu):
      logits = gaussian_log_density(mu, mu, scales)
      targets = optax.smooth_labels(jax.nn.one_hot(jnp.arange(num_classes), num_classes), 0.1)
      return optax.softmax_cross_entropy(logits, targets).mean()

    def blocked(mu):
      return soc.head.class_mean_term(mu, scales, 0.1)
    np.testing.assert_allclose(blocked(means), dense(means), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(blocked)(means), jax.grad(dense)(means), atol=1e-6)
