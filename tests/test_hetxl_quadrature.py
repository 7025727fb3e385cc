"""Oracles for `mc_method='quadrature'` (sigmoid link without sampling; shared/spec/hetxl.md).

The references are independent of the head's closed form: adaptive scalar integration
(scipy.integrate.quad) for the one-dimensional rule, and Monte Carlo in numpy over the FULL
noise vector (eps_R, eps_n projected through W for HET-XL), built from the head's own params,
for the marginal mean and variance.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from scipy import integrate, special

from hetxl import HETHead, HETXLHead
from hetxl.quadrature import sigmoid_log_marginals, use_hermite
from tests.test_hetxl import (B, D, K, R, VARIANTS, apply, features, init_params, jit,
                              np_moments, np_terms, param_shapes, variant_id)


def exact_log_p(z: float, r: float) -> float:
  """log E[sigmoid(u)], u ~ N(z, r^2), by adaptive quadrature in float64 (integrand in log
  space, integrated over the region that carries its mass: around z, and around the
  exponentially tilted mode z + r^2 clipped at 0)."""
  def f(u):
    return np.exp(-np.logaddexp(0.0, -u) - (u - z) ** 2 / (2 * r * r)) / (r * np.sqrt(2 * np.pi))
  c = min(z + r * r, 0.0) if z < 0 else max(z - r * r, 0.0)
  lo, hi = min(z, c) - 14 * r, max(z, c) + 14 * r
  points = sorted({p for p in (0.0, c, z) if lo < p < hi})
  value, _ = integrate.quad(f, lo, hi, points=points, limit=2000, epsabs=0, epsrel=1e-12)
  return float(np.log(value))


def test_rule_matches_adaptive_integration():
  """Both rules (Gauss-Hermite and the step split) against scipy, z = m/tau in [-30, 30],
  r = s/tau in [1e-3, 100]: log p and log(1 - p) to 2e-5 (float32)."""
  zs = np.concatenate([-np.geomspace(0.05, 30, 8), [0.0], np.geomspace(0.05, 30, 8)])
  rs = np.geomspace(1e-3, 100, 12)
  z, r = (a.ravel() for a in np.meshgrid(zs, rs))
  want_p = np.array([exact_log_p(a, b) for a, b in zip(z, r)])
  want_1mp = np.array([exact_log_p(-a, b) for a, b in zip(z, r)])
  tau = 0.3   # results depend on m / tau and s / tau only
  got = jax.jit(sigmoid_log_marginals)(jnp.asarray(z * tau, jnp.float32),
                                       jnp.asarray((r * tau) ** 2, jnp.float32), tau)
  hermite = np.asarray(use_hermite(jnp.asarray(z), jnp.asarray(r)))
  assert 0 < hermite.sum() < hermite.size   # both rules are exercised
  for g, want in zip(got, (want_p, want_1mp)):
    np.testing.assert_allclose(np.asarray(g, np.float64), want, atol=2e-5, rtol=2e-6)


def test_plain_hermite_fails_where_the_split_is_used():
  """The rule choice matters: plain Gauss-Hermite at r = 10 is off by > 1e-3, the chosen rule
  is not (so the split is what makes wide marginals accurate)."""
  z, r = -2.0, 10.0
  want = exact_log_p(z, r)
  x, w = np.polynomial.hermite.hermgauss(32)
  plain = special.logsumexp(np.log(w / np.sqrt(np.pi)) - np.logaddexp(0, -(z + np.sqrt(2) * r * x)))
  got = sigmoid_log_marginals(jnp.float32(z), jnp.float32(r * r), 1.0)[0]
  assert abs(plain - want) > 1e-3
  assert abs(float(got) - want) < 1e-5


def mc_reference(head, params, x, tau, num_samples=10 ** 6, seed=0):
  """numpy Monte Carlo of log p and log(1 - p) [B, K] with antithetic pairs, sampling the whole
  noise vector (eps_R [R] and the diagonal noise [n], or one scalar in rank-1 mode) and, for
  HET-XL, projecting it through W; float64."""
  p, x, mu, d, factors, noise_mean = np_terms(head, params, x)
  gen = np.random.default_rng(seed)
  half = num_samples // 2
  n = d.shape[1]
  out_p, out_1mp = [], []
  for i in range(x.shape[0]):
    eps_r = gen.standard_normal((half, factors.shape[2]))
    eps_n = gen.standard_normal((half, 1 if head.diag_noise == 'rank1' else n))
    noise = eps_r @ factors[i].T + d[i] * eps_n                   # [S/2, n], zero mean
    if isinstance(head, HETXLHead):
      mean = (x[i] + noise_mean[i]) @ p['loc_layer']['kernel'] + p['loc_layer']['bias']
      noise = noise @ p['loc_layer']['kernel']
    else:
      mean = mu[i] + noise_mean[i]
    u = np.concatenate([mean + noise, mean - noise]) / tau         # [S, K]
    out_p.append(np.log(special.expit(u).mean(0)))
    out_1mp.append(np.log(special.expit(-u).mean(0)))
  return np.stack(out_p), np.stack(out_1mp)


def test_matches_numpy_monte_carlo():
  """log p, log(1 - p) within 1e-3 of 10^6-sample numpy MC, all 8 variants (HET / HET-XL, full /
  PE, both diag modes); the loss on padded label sets is -(y log p + (1 - y) log(1 - p))."""
  x = features()
  tau = 1.5
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn,
               link='sigmoid', temperature=tau, mc_method='quadrature') for cls, pe, dn in VARIANTS]
  all_params = [init_params(h, x, scale=0.45) for h in heads]
  labels = jnp.array([[1, 4, -1], [0, -1, -1], [5, 5, 2]])
  outs = jit(lambda ps, x: [apply(h, p, x, labels) for h, p in zip(heads, ps)])(all_params, x)
  for head, params, out in zip(heads, all_params, outs):
    want_p, want_1mp = mc_reference(head, params, x, tau)
    got_1mp = -np.logaddexp(0, np.asarray(out.logits, np.float64))   # log(1 - sigmoid(logits))
    got_p = np.asarray(out.logits, np.float64) + got_1mp
    name = variant_id((type(head), head.parameter_efficient, head.diag_noise))
    np.testing.assert_allclose(got_p, want_p, atol=1e-3, err_msg=name)
    np.testing.assert_allclose(got_1mp, want_1mp, atol=1e-3, err_msg=name)
    y = np.zeros((B, K))
    for i, row in enumerate(np.asarray(labels)):
      y[i, row[row >= 0]] = 1.0
    np.testing.assert_allclose(out.loss, -(y * want_p + (1 - y) * want_1mp).sum(-1), atol=5e-3,
                               err_msg=name)


def test_marginal_moments_match_covariance_formula():
  """The head's closed-form marginal mean and variance [B, K] equal the diagonal of the
  explicit numpy mean and covariance (W^T (V'V'^T + diag(d'^2)) W etc., float64), and not the
  other diag mode's (HET's marginals do not depend on the mode, HET-XL's do)."""
  x = features()
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn)
           for cls, pe, dn in VARIANTS]
  all_params = [init_params(h, x) for h in heads]
  got = jit(lambda ps, x: [apply(h, p, x, method=h.marginals) for h, p in zip(heads, ps)])(
      all_params, x)
  for head, params, (mean, var) in zip(heads, all_params, got):
    name = variant_id((type(head), head.parameter_efficient, head.diag_noise))
    for mode in ('independent', 'rank1'):
      want_mean, cov = np_moments(head, params, x, mode)
      want_var = np.diagonal(cov, axis1=1, axis2=2)
      if mode == head.diag_noise:
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-5, err_msg=name)
      elif isinstance(head, HETXLHead):
        assert np.abs(var - want_var).max() > 1e-2, name


def test_zero_noise_limit():
  """Scale kernels zero, diag bias -30: log p == log_sigmoid(mu / tau) for every variant."""
  x = features()
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn,
               link='sigmoid', temperature=0.7, mc_method='quadrature')
           for cls, pe, dn in VARIANTS]
  all_params = []
  for head in heads:
    params = init_params(head, x, scale=1.0)
    scale = 'scale_layer_heteroscedastic' if head.parameter_efficient else 'scale_layer'
    params[scale] = jax.tree.map(jnp.zeros_like, params[scale])
    params['diag_layer'] = {'kernel': jnp.zeros_like(params['diag_layer']['kernel']),
                            'bias': jnp.full_like(params['diag_layer']['bias'], -30.0)}
    all_params.append(params)
  logits = jit(lambda ps, x: [apply(h, p, x).logits for h, p in zip(heads, ps)])(all_params, x)
  for head, params, got in zip(heads, all_params, logits):
    mu = np_terms(head, params, x)[2]
    if head.parameter_efficient:   # v = 0 also removes the PE noise mean
      assert np.abs(np_terms(head, params, x)[5]).max() == 0
    np.testing.assert_allclose(got, mu / 0.7, rtol=1e-4, atol=1e-4)


def test_gradients_match_finite_differences():
  """Directional derivatives of the mean loss in params (learnt temperature included) and x,
  central differences in float32; temperature bounds chosen so both rules are used."""
  x = features()
  labels = jnp.array([1, 0, 5])
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise='independent',
               link='sigmoid', learn_temperature=True, temperature_bounds=(0.1, 1.0),
               mc_method='quadrature') for cls in (HETHead, HETXLHead) for pe in (False, True)]
  all_params = [init_params(h, x, scale=0.8) for h in heads]
  gen = np.random.default_rng(5)
  dirs = [(jax.tree.map(lambda a: jnp.asarray(gen.standard_normal(a.shape), jnp.float32), p),
           jnp.asarray(gen.standard_normal(x.shape), jnp.float32)) for p in all_params]
  h = 1e-3

  def loss(head, params, x):
    return apply(head, params, x, labels).loss.mean()

  def check(ps, x):
    out = []
    for head, params, (dp, dx) in zip(heads, ps, dirs):
      grads = jax.grad(loss, argnums=(1, 2))(head, params, x)
      analytic = sum(jnp.vdot(g, v) for g, v in
                     zip(jax.tree.leaves(grads), jax.tree.leaves((dp, dx))))
      shift = lambda s: loss(head, jax.tree.map(lambda a, v: a + s * v, params, dp), x + s * dx)
      out.append((analytic, (shift(h) - shift(-h)) / (2 * h)))
    return out

  for (analytic, numeric), head in zip(jax.jit(check)(all_params, x), heads):
    assert abs(float(analytic)) > 1e-2
    np.testing.assert_allclose(analytic, numeric, rtol=3e-3, err_msg=type(head).__name__)
  # Both rules were active in this test (r = s / tau above and below the switch point).
  rs = np.concatenate([   # tau starts at the midpoint, 0.55
      np.sqrt(np.diagonal(np_moments(head, params, x, 'independent')[1], axis1=1, axis2=2)) / 0.55
      for head, params in zip(heads, all_params)], axis=None)
  assert rs.min() < 2 < rs.max()


def test_loss_closer_to_large_sample_mc():
  """On a batch, the quadrature loss is closer to the S = 100,000 MC loss than S = 1000 MC
  losses are (mean distance over 8 noise seeds)."""
  x = features(batch=8)
  labels = jnp.arange(8) % K
  base = dict(num_classes=K, num_factors=R, parameter_efficient=True, link='sigmoid',
              temperature=0.5)
  quad = HETXLHead(**base, mc_method='quadrature')
  mc_small = HETXLHead(**base, eval_mc_samples=1000, mc_chunk_size=1000)
  mc_large = HETXLHead(**base, eval_mc_samples=100_000, mc_chunk_size=10_000)
  params = init_params(quad, x, scale=0.8)

  def losses(params, x):
    total = lambda head, seed: apply(head, params, x, labels, seed=seed).loss.sum()
    return (total(quad, 0), total(mc_large, 0),
            jnp.stack([total(mc_small, seed) for seed in range(1, 9)]))

  got, large, small = jax.jit(losses)(params, x)
  assert abs(float(got) - float(large)) < float(np.abs(np.asarray(small) - float(large)).mean())


def test_options_and_param_tree():
  """Quadrature keeps the param tree of MC (interchangeable checkpoints); bad options raise."""
  x = features()
  for cls in (HETHead, HETXLHead):
    for pe in (False, True):
      mc = cls(num_classes=K, num_factors=R, parameter_efficient=pe, link='sigmoid')
      quad = mc.clone(mc_method='quadrature')
      assert (jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(mc, x))
              == jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(quad, x)))
  bad = [(dict(link='softmax', mc_method='quadrature'), 'softmax link'),
         (dict(link='sigmoid', mc_method='exact'), "'mc' or 'quadrature'"),
         (dict(link='sigmoid', mc_method='quadrature', quadrature_nodes=1), 'quadrature_nodes')]
  for kwargs, message in bad:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(lambda: HETXLHead(num_classes=K, num_factors=R, **kwargs).init(
          {'params': jax.random.key(0)}, x))


def test_sharded_matches_unsharded():
  """Quadrature on a (data=4, model=2) mesh of fake CPU devices, K sharded over 'model', learnt
  temperature: loss, logits and gradients equal the single-device ones."""
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (fake) devices')
  batch, dim, k = 8, 8, 16
  heads = [cls(num_classes=k, num_factors=R, parameter_efficient=pe, link='sigmoid',
               learn_temperature=True, mc_method='quadrature')
           for cls in (HETHead, HETXLHead) for pe in (False, True)]
  x = features(batch=batch, dim=dim)
  labels = jnp.arange(batch) % k
  boxed = [jax.eval_shape(lambda h=h: h.clone(return_locs=True).init(
      {'params': jax.random.key(0)}, x))['params'] for h in heads]
  all_params = [init_params(head, x) for head in heads]

  def step(all_params, x, labels):
    out = []
    for head, params in zip(heads, all_params):
      def loss(params, x):
        out = apply(head, params, x, labels, train=True)
        return out.loss.mean(), out.logits
      out.append(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x))
    return out

  ref = jit(step)(all_params, x, labels)
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                           all_params, nn.get_partition_spec(boxed))
    xs = jax.device_put(x, NamedSharding(mesh, P('data', None)))
    ys = jax.device_put(labels, NamedSharding(mesh, P('data')))
    got = jit(step)(sharded, xs, ys)
  for ((value, logits), grads), ((ref_value, ref_logits), ref_grads) in zip(got, ref):
    assert logits.sharding.spec == P('data', 'model')
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, ref_grads)
