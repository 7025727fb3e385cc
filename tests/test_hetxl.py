"""Oracles for the HET and HET-XL heads (spec: shared/spec/hetxl.md).

Each test compiles one program covering all its head variants: on a 2-core CPU, XLA compile
time, not compute, dominates, and one combined program compiles much faster than many.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from heads.softmax import SoftmaxHead
from hetxl import HETHead, HETXLHead

B, D, K, R = 3, 4, 6, 2
# Tiny programs: compile time dominates, and LLVM -O0 halves it.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
HEADS = [HETHead, HETXLHead]
VARIANTS = [(cls, pe, dn) for cls in HEADS for pe in (False, True)
            for dn in ('independent', 'rank1')]


def variant_id(v):
  cls, pe, dn = v
  return f"{cls.__name__}-{'pe' if pe else 'full'}-{dn}"


def rngs(seed=0, params: bool = False):
  keys = jax.random.split(jax.random.key(seed), 3)
  out = {'standard_norm_noise_samples': keys[0], 'diag_noise_samples': keys[1]}
  if params:
    out['params'] = keys[2]
  return out


def features(batch: int = B, dim: int = D, seed: int = 1):
  return jax.random.normal(jax.random.key(seed), (batch, dim))


def param_shapes(head, x):
  """Unboxed param shapes, traced only (a `return_locs` clone has the same tree, no MC)."""
  return jax.eval_shape(
      lambda: nn.meta.unbox(head.clone(return_locs=True).init(rngs(0, True), x)['params']))


def init_params(head, x, scale: float = 0.7, seed: int = 2):
  """Every param (biases and b_J included) N(0, scale^2) from numpy; temperature logit 0."""
  gen = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(scale * gen.standard_normal(s.shape), jnp.float32),
                        param_shapes(head, x))
  if 'temperature' in params:
    params['temperature']['pre_sigmoid_temperature'] = jnp.float32(0.0)
  return params


def apply(head, params, x, *args, seed=0, train=False, **kwargs):
  return head.apply({'params': params}, x, *args, train=train, rngs=rngs(seed), **kwargs)


def n_params(tree) -> int:
  return sum(int(np.size(l)) for l in jax.tree.leaves(tree))


def softplus(a):
  return np.logaddexp(0.0, a)


def np_terms(head, params, x):
  """From the param arrays in float64: mu, d, the factor matrix V [B, n, R] and the noise mean."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  lin = lambda name, inp: inp @ p[name]['kernel'] + p[name]['bias']
  n = x.shape[1] if isinstance(head, HETXLHead) else head.num_classes
  d = softplus(lin('diag_layer', x)) + 1e-3
  if head.parameter_efficient:
    v = lin('scale_layer_heteroscedastic', x)
    hom = p['scale_layer_homoscedastic']
    factors = v[:, :, None] * hom['kernel'].T[None]
    noise_mean = hom['bias'] * v
  else:
    factors = lin('scale_layer', x).reshape(x.shape[0], n, head.num_factors)
    noise_mean = np.zeros_like(d)
  return p, x, lin('loc_layer', x), d, factors, noise_mean


def np_logit_samples(head, params, x, noise):
  """u_s recomputed in numpy from the params and the head's standard-normal draws: [B, S, K]."""
  p, x, mu, d, factors, noise_mean = np_terms(head, params, x)
  eps_r = np.asarray(noise['eps_r'], np.float64)
  eps_diag = np.asarray(noise['eps_diag'], np.float64)
  noise_n = (noise_mean[:, None] + np.einsum('bnr,bsr->bsn', factors, eps_r)
             + d[:, None] * eps_diag)
  if isinstance(head, HETXLHead):   # edward2's HET-XL: loc_layer applied to phi + eps'
    return (x[:, None] + noise_n) @ p['loc_layer']['kernel'] + p['loc_layer']['bias']
  return mu[:, None] + noise_n


def np_moments(head, params, x, diag_noise):
  """Mean [B, K] and covariance [B, K, K] of the pre-temperature logits, from the formulas."""
  p, x, mu, d, factors, noise_mean = np_terms(head, params, x)
  diag = (d[:, :, None] * d[:, None, :] if diag_noise == 'rank1'
          else np.einsum('bn,nm->bnm', d ** 2, np.eye(d.shape[1])))
  cov = np.einsum('bnr,bmr->bnm', factors, factors) + diag
  if isinstance(head, HETXLHead):
    w = p['loc_layer']['kernel']
    return mu + noise_mean @ w, np.einsum('nk,bnm,ml->bkl', w, cov, w)
  return mu + noise_mean, cov


def log_mean_exp(a, axis):
  m = a.max(axis, keepdims=True)
  return np.log(np.mean(np.exp(a - m), axis)) + m.squeeze(axis)



def test_zero_noise_limit():
  """Scale kernels zero, diag bias -30: MC probabilities == softmax / sigmoid of mu / tau."""
  x = features()
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, link=link,
               temperature=0.7, eval_mc_samples=16, mc_chunk_size=5)
           for cls in HEADS for pe in (False, True) for link in ('softmax', 'sigmoid')]
  all_params = []
  for head in heads:
    params = init_params(head, x, scale=1.0)
    scale = 'scale_layer_heteroscedastic' if head.parameter_efficient else 'scale_layer'
    params[scale] = jax.tree.map(jnp.zeros_like, params[scale])
    params['diag_layer'] = {'kernel': jnp.zeros_like(params['diag_layer']['kernel']),
                            'bias': jnp.full_like(params['diag_layer']['bias'], -30.0)}
    all_params.append(params)
  logits = jit(lambda ps, x: [apply(h, p, x).logits for h, p in zip(heads, ps)])(
      all_params, x)
  for head, params, got in zip(heads, all_params, logits):
    mu = np_terms(head, params, x)[2]
    act = jax.nn.softmax if head.link == 'softmax' else jax.nn.sigmoid
    np.testing.assert_allclose(act(got), act(mu / 0.7), atol=1e-3)
    assert np.abs(np.asarray(act(mu / 0.7)) - np.asarray(act(mu))).max() > 1e-2  # tau matters


def test_covariance_of_logit_noise():
  """Empirical covariance of u_s matches W^T(V'V'^T + diag(d'^2))W (HET-XL), VV^T + diag(d^2)
  (HET), with d d^T in place of diag(d^2) in rank-1 mode, and not the other mode's formula."""
  x = features(batch=2)
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn,
               eval_mc_samples=40000) for cls, pe, dn in VARIANTS]
  all_params = []
  for head in heads:
    params = init_params(head, x)
    params['diag_layer']['bias'] += 1.0   # a diagonal term large enough to tell modes apart
    all_params.append(params)
  samples = jit(lambda ps, x: [apply(h, p, x, method=h.sample_logits)
                                   for h, p in zip(heads, ps)])(all_params, x)
  for head, params, u in zip(heads, all_params, samples):
    u = np.asarray(u, np.float64)
    for mode in ('independent', 'rank1'):
      mean, cov = np_moments(head, params, x, mode)
      for i in range(x.shape[0]):
        err = np.abs(np.cov(u[i].T) - cov[i]).max() / np.abs(cov[i]).max()
        if mode == head.diag_noise:
          assert err < 0.05, (variant_id((type(head), head.parameter_efficient, mode)), err)
          std_err = np.sqrt(np.diag(cov[i]) / u.shape[1])
          assert np.all(np.abs(u[i].mean(0) - mean[i]) < 5 * std_err + 1e-6)
        else:   # the other diagonal mode predicts a visibly different covariance
          assert err > 0.1, (variant_id((type(head), head.parameter_efficient, mode)), err)


def test_mc_matches_numpy():
  """Logit samples recomputed in numpy from the params and the head's draws; MC probabilities,
  logits (log mean softmax, no clipping) and losses recomputed from them."""
  cases = [(v, 'softmax') for v in VARIANTS] + [(VARIANTS[0], 'sigmoid'),
                                               (VARIANTS[7], 'sigmoid')]
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn, link=link,
               learn_temperature=True, temperature_bounds=(0.2, 2.0), train_mc_samples=23,
               mc_chunk_size=5) for (cls, pe, dn), link in cases]
  x = features()
  labels = jnp.array([0, 3, 5])
  all_params = [init_params(head, x) for head in heads]
  for params in all_params:
    params['temperature']['pre_sigmoid_temperature'] = jnp.float32(0.4)
  tau = 0.2 + 1.8 * float(jax.nn.sigmoid(0.4))

  @jit
  def run(all_params, x, labels):
    return [(apply(h, p, x, train=True, seed=3, method=h.draw_noise),
             apply(h, p, x, train=True, seed=3, method=h.sample_logits),
             apply(h, p, x, labels, train=True, seed=3))
            for h, p in zip(heads, all_params)]

  y = np.eye(K)[np.asarray(labels)]
  for head, params, (noise, u, out) in zip(heads, all_params, run(all_params, x, labels)):
    assert noise['eps_r'].shape == (B, 23, R)
    assert noise['eps_diag'].shape[:2] == (B, 23)
    u_np = np_logit_samples(head, params, x, noise)
    np.testing.assert_allclose(u, u_np, atol=1e-4, rtol=1e-4)
    if head.link == 'softmax':
      z = u_np / tau
      log_sm = z - log_mean_exp(z, -1)[..., None] - np.log(K)
      log_p = log_mean_exp(log_sm, 1)                      # log mean_s softmax
      np.testing.assert_allclose(jax.nn.softmax(out.logits), np.exp(log_p), atol=1e-5)
      np.testing.assert_allclose(out.logits, log_p, atol=1e-4)
      np.testing.assert_allclose(out.loss, -(y * log_p).sum(-1), rtol=1e-5, atol=1e-5)
    else:
      probs = (1 / (1 + np.exp(-u_np / tau))).mean(1)
      np.testing.assert_allclose(jax.nn.sigmoid(out.logits), probs, atol=1e-5)
      want = -(y * np.log(probs) + (1 - y) * np.log1p(-probs)).sum(-1)
      np.testing.assert_allclose(out.loss, want, rtol=1e-5)


def test_chunked_equals_unchunked():
  """Same noise, same loss, logits and gradients for any chunk size (7 pads the last chunk)."""
  cases = [(VARIANTS[0], 'softmax'), (VARIANTS[6], 'sigmoid'), (VARIANTS[7], 'softmax')]
  x = features()
  labels = jnp.array([1, 2, 4])
  heads = [[cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn, link=link,
                learn_temperature=True, train_mc_samples=30, mc_chunk_size=chunk)
            for chunk in (None, 7)] for (cls, pe, dn), link in cases]
  all_params = [init_params(pair[0], x) for pair in heads]

  def value_and_grad(head, params, x):
    def loss(params, x):
      out = apply(head, params, x, labels, train=True, seed=5)
      return out.loss.mean(), out.logits
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  results = jit(lambda ps, x: [[value_and_grad(h, p, x) for h in pair]
                                   for pair, p in zip(heads, ps)])(all_params, x)
  for (ref, got) in results:
    np.testing.assert_allclose(got[0][0], ref[0][0], rtol=1e-5)
    np.testing.assert_allclose(got[0][1], ref[0][1], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got[1], ref[1])
    assert np.abs(np.asarray(got[1][1])).max() > 1e-3   # gradients do flow through the scan
    assert abs(float(got[1][0]['temperature']['pre_sigmoid_temperature'])) > 1e-6


def test_share_samples_across_batch():
  x = jnp.concatenate([features(batch=1)] * 2)
  heads = [cls(num_classes=K, num_factors=R, eval_mc_samples=8, share_samples_across_batch=share)
           for cls in HEADS for share in (False, True)]
  all_params = [init_params(head, x) for head in heads]
  results = jit(lambda ps, x: [(apply(h, p, x, method=h.draw_noise), apply(h, p, x).logits)
                                   for h, p in zip(heads, ps)])(all_params, x)
  for head, (noise, logits) in zip(heads, results):
    same = [np.allclose(noise['eps_r'][0], noise['eps_r'][1]),
            np.allclose(noise['eps_diag'][0], noise['eps_diag'][1]),
            np.allclose(logits[0], logits[1])]
    assert all(same) if head.share_samples_across_batch else not any(same)


def test_lse_loss_vs_clipped_parity():
  """Where no clipping is active both agree; where p_y < 1e-7 only the LSE loss has a gradient."""
  x = features()
  labels = jnp.array([0, 1, 2])
  base = dict(num_classes=K, num_factors=R, train_mc_samples=16, mc_chunk_size=6)
  pairs = [(HETXLHead(**base), HETXLHead(**base, clip_probs_parity=True))]
  all_params = [init_params(pair[0], x, scale=0.3) for pair in pairs]

  @jit
  def run(all_params):
    out = []
    for pair, params in zip(pairs, all_params):
      loss = lambda p, h: apply(h, p, x, labels, train=True).loss
      grad = lambda h: jax.grad(lambda p: loss(p, h)[0])(params)['loc_layer']['bias'][0]
      out.append([(loss(params, h), grad(h)) for h in pair])
    return out

  for (lse, _), (par, _) in run(all_params):
    np.testing.assert_allclose(lse, par, rtol=1e-5)
  for params in all_params:
    params['loc_layer']['bias'] = params['loc_layer']['bias'].at[0].set(-40.0)
  for (lse, g_lse), (par, g_par) in run(all_params):
    assert lse[0] > 30 and abs(float(par[0]) + np.log(1e-7)) < 1e-3
    assert abs(float(g_lse) + 1.0) < 1e-3 and abs(float(g_par)) < 1e-5


@pytest.mark.parametrize('learn_temperature', [False, True])
def test_parameter_counts(learn_temperature):
  dim, k, r = 8, 20, 3
  x = features(dim=dim)
  det = n_params(jax.eval_shape(lambda: SoftmaxHead(num_classes=k).init(rngs(0, True), x)))
  assert det == (dim + 1) * k
  extra = {}
  for cls, n in ((HETHead, k), (HETXLHead, dim)):
    for pe, formula in ((False, (dim + 1) * (r + 1) * n), (True, n * (2 * dim + r + 3))):
      head = cls(num_classes=k, num_factors=r, parameter_efficient=pe,
                 learn_temperature=learn_temperature)
      extra[cls, pe] = n_params(param_shapes(head, x)) - det - int(learn_temperature)
      assert extra[cls, pe] == formula, (cls.__name__, pe)
  for pe in (False, True):
    assert extra[HETHead, pe] * dim == extra[HETXLHead, pe] * k   # ratio exactly K / D


def test_latent_dim_must_equal_feature_dim():
  x = features()
  param_shapes(HETXLHead(num_classes=K, num_factors=R, latent_dim=D), x)
  with pytest.raises(ValueError, match='latent_dim'):
    param_shapes(HETXLHead(num_classes=K, num_factors=R, latent_dim=D + 1), x)


def test_learnt_temperature():
  """tau starts at the midpoint, gets a gradient, and stays in bounds under huge SGD steps."""
  lower, upper = 0.05, 5.0
  heads = [HETXLHead(num_classes=K, num_factors=R, learn_temperature=True,
                     temperature_bounds=(lower, upper), train_mc_samples=8)]
  x, labels = features(), jnp.array([0, 1, 2])

  @jit
  def sgd_step(all_params, lr):
    out = []
    for head, params in zip(heads, all_params):
      def loss(params):
        out, state = apply(head, params, x, labels, train=True, mutable=['head_metrics'])
        return out.loss.mean(), state['head_metrics']['temperature']['temperature'][0]
      (_, tau), grads = jax.value_and_grad(loss, has_aux=True)(params)
      out.append((jax.tree.map(lambda a, g: a - lr * g, params, grads), tau, grads))
    return out

  params = [init_params(head, x) for head in heads]
  for _, tau, grads in sgd_step(params, 0.0):
    assert abs(float(tau) - (lower + upper) / 2) < 1e-6
    assert abs(float(grads['temperature']['pre_sigmoid_temperature'])) > 1e-6
  for lr in (1e4, -1e4):   # huge steps in both directions
    p = params
    for _ in range(3):
      p, taus, _ = zip(*sgd_step(p, lr))
      assert all(lower <= float(t) <= upper for t in taus)
    taus = [t for _, t, _ in sgd_step(p, 0.0)]
    assert all(lower <= float(t) <= upper and abs(float(t) - 2.525) > 1.0 for t in taus)


def test_eval_reproducible_and_normalised():
  heads = [cls(num_classes=K, num_factors=R, train_mc_samples=4, eval_mc_samples=9)
           for cls in HEADS]
  sig_heads = [h.clone(link='sigmoid') for h in heads]
  x = features()
  all_params = [init_params(head, x) for head in heads]

  @jit
  def run(all_params, seed):
    return [(apply(h, p, x, seed=seed).logits, h.apply({'params': p}, x).logits,
             apply(s, p, x, seed=seed).logits)
            for h, s, p in zip(heads, sig_heads, all_params)]

  for (a, fixed_a, sig), (b, fixed_b, _), (c, _, _) in zip(
      run(all_params, 7), run(all_params, 7), run(all_params, 8)):
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(fixed_a, fixed_b)   # no rngs in eval: a fixed key
    assert a.shape == (B, K) and a.dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.softmax(a).sum(-1), 1.0, atol=1e-5)
    probs = jax.nn.sigmoid(sig)
    assert probs.shape == (B, K) and np.all((probs > 0) & (probs < 1))
  for head, params in zip(heads, all_params):
    with pytest.raises(ValueError, match='rng'):   # training requires the noise rngs
      jax.eval_shape(lambda p: head.apply({'params': p}, x, train=True), params)
    noise = jax.eval_shape(lambda p: apply(head, p, x, method=head.draw_noise), params)
    assert noise['eps_r'].shape[1] == 9   # eval draws eval_mc_samples


@pytest.mark.parametrize('cls', HEADS)
def test_return_locs_and_bias_init(cls):
  head = cls(num_classes=K, num_factors=R, return_locs=True, temperature=2.0,
             head_bias_init=-10.0, link='sigmoid')
  x = features()
  params = nn.meta.unbox(head.init(rngs(0, True), x)['params'])
  np.testing.assert_array_equal(params['loc_layer']['bias'], -10.0)
  out = head.apply({'params': params}, x, jnp.array([0, 1, 2]))   # no rngs needed: no MC
  np.testing.assert_allclose(out.logits, np_terms(head, params, x)[2], rtol=1e-5, atol=1e-5)
  assert out.loss.shape == (B,)


def test_bfloat16_compute_close_to_float32():
  x = features()
  heads = [cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=dn,
               eval_mc_samples=16, mc_chunk_size=8) for cls, pe, dn in VARIANTS]
  all_params = [init_params(head, x, scale=0.5) for head in heads]
  results = jit(lambda ps: [
      (apply(h, p, x).logits, apply(h.clone(compute_dtype=jnp.bfloat16), p, x).logits)
      for h, p in zip(heads, ps)])(all_params)
  for f32, bf16 in results:
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.1)
    assert not np.array_equal(bf16, f32)


def test_invalid_options():
  x = features()
  for kwargs in (dict(link='softmx'), dict(diag_noise='diag')):
    with pytest.raises(ValueError):
      jax.eval_shape(lambda: HETXLHead(num_classes=K, num_factors=R, **kwargs).init(
          rngs(0, True), x))


def test_sharded_matches_unsharded():
  """On a (data=4, model=2) mesh of fake CPU devices, K sharded over 'model'."""
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (fake) devices')
  batch, dim, k = 8, 8, 16
  heads = [cls(num_classes=k, num_factors=R, learn_temperature=True, train_mc_samples=12,
               mc_chunk_size=5) for cls in HEADS]
  x = features(batch=batch, dim=dim)
  labels = jnp.arange(batch) % k
  boxed = [jax.eval_shape(lambda h=h: h.clone(return_locs=True).init(rngs(0, True), x))['params']
           for h in heads]
  all_params = [init_params(head, x) for head in heads]

  def step(all_params, x, labels):
    out = []
    for head, params in zip(heads, all_params):
      def loss(params, x):
        out = apply(head, params, x, labels, train=True, seed=4)
        return out.loss.mean(), out.logits
      out.append(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x))
    return out

  ref = jit(step)(all_params, x, labels)
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  specs = nn.get_partition_spec(boxed)
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                           all_params, specs)
    assert sharded[0]['scale_layer']['kernel'].sharding.spec == P(None, 'model')
    assert sharded[1]['loc_layer']['kernel'].sharding.spec == P(None, 'model')
    xs = jax.device_put(x, NamedSharding(mesh, P('data', None)))
    ys = jax.device_put(labels, NamedSharding(mesh, P('data')))
    got = jit(step)(sharded, xs, ys)
  for ((value, logits), grads), ((ref_value, ref_logits), ref_grads) in zip(got, ref):
    assert logits.sharding.spec == P('data', 'model')
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, ref_grads)
