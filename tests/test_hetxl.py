"""Oracles for the HET and HET-XL heads (spec: shared/spec/hetxl.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from heads.softmax import SoftmaxHead
from hetxl import HETHead, HETXLHead

B, D, K, R = 3, 4, 6, 2


def rngs(seed: int = 0, params: bool = False):
  keys = jax.random.split(jax.random.key(seed), 3)
  out = {'standard_norm_noise_samples': keys[0], 'diag_noise_samples': keys[1]}
  if params:
    out['params'] = keys[2]
  return out


def features(batch: int = B, dim: int = D, seed: int = 1):
  return jax.random.normal(jax.random.key(seed), (batch, dim))


def init_params(head, x, randomize: float = 0.0, seed: int = 2):
  """Unboxed params; with `randomize`, every array (biases and b_J included) is N(0, randomize^2)."""
  params = nn.meta.unbox(head.init(rngs(0, params=True), x, train=False)['params'])
  if randomize:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [randomize * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
    params = jax.tree.unflatten(tree, leaves)
  return params


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


HEADS = [HETHead, HETXLHead]
VARIANTS = [(cls, pe, dn) for cls in HEADS for pe in (False, True)
            for dn in ('independent', 'rank1')]


def variant_id(v):
  cls, pe, dn = v
  return f"{cls.__name__}-{'pe' if pe else 'full'}-{dn}"


@pytest.mark.parametrize('cls', HEADS)
@pytest.mark.parametrize('pe', [False, True])
@pytest.mark.parametrize('link', ['softmax', 'sigmoid'])
def test_zero_noise_limit(cls, pe, link):
  head = cls(num_classes=K, num_factors=R, parameter_efficient=pe, link=link, temperature=0.7,
             eval_mc_samples=16, mc_chunk_size=5)
  x = features()
  params = init_params(head, x, randomize=1.0)
  scale = 'scale_layer_heteroscedastic' if pe else 'scale_layer'
  params[scale] = jax.tree.map(jnp.zeros_like, params[scale])
  params['diag_layer'] = {'kernel': jnp.zeros_like(params['diag_layer']['kernel']),
                          'bias': jnp.full_like(params['diag_layer']['bias'], -30.0)}
  out = head.apply({'params': params}, x, train=False, rngs=rngs())
  mu = np_terms(head, params, x)[2] / 0.7
  if link == 'softmax':
    want, got = jax.nn.softmax(mu), jax.nn.softmax(out.logits)
  else:
    want, got = jax.nn.sigmoid(mu), jax.nn.sigmoid(out.logits)
  np.testing.assert_allclose(got, want, atol=1e-3)
  assert np.abs(np.asarray(want) - np.asarray(jax.nn.softmax(mu * 0.7))).max() > 1e-2  # tau matters


@pytest.mark.parametrize('variant', VARIANTS, ids=variant_id)
def test_covariance_of_logit_noise(variant):
  cls, pe, diag_noise = variant
  head = cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=diag_noise,
             eval_mc_samples=40000)
  x = features(batch=2)
  params = init_params(head, x, randomize=0.7)
  u = np.asarray(head.apply({'params': params}, x, method=head.sample_logits, rngs=rngs()),
                 np.float64)
  for mode in ('independent', 'rank1'):
    mean, cov = np_moments(head, params, x, mode)
    for i in range(x.shape[0]):
      emp = np.cov(u[i].T)
      scale = np.abs(cov[i]).max()
      err = np.abs(emp - cov[i]).max() / scale
      if mode == diag_noise:
        assert err < 0.05, (mode, err)
        std_err = np.sqrt(np.diag(cov[i]) / u.shape[1])
        assert np.all(np.abs(u[i].mean(0) - mean[i]) < 5 * std_err + 1e-6)
      else:   # the other diagonal mode predicts a visibly different covariance
        assert err > 0.15, (mode, err)


@pytest.mark.parametrize('variant', VARIANTS, ids=variant_id)
@pytest.mark.parametrize('link', ['softmax', 'sigmoid'])
def test_mc_matches_numpy(variant, link):
  cls, pe, diag_noise = variant
  head = cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=diag_noise,
             link=link, learn_temperature=True, temperature_bounds=(0.2, 2.0),
             train_mc_samples=23, mc_chunk_size=5)
  x = features()
  labels = jnp.array([0, 3, 5])
  params = init_params(head, x, randomize=0.7)
  params['temperature']['pre_sigmoid_temperature'] = jnp.float32(0.4)
  tau = 0.2 + 1.8 * float(jax.nn.sigmoid(0.4))
  variables = {'params': params}
  noise = head.apply(variables, x, train=True, method=head.draw_noise, rngs=rngs(3))
  assert noise['eps_r'].shape == (B, 23, R)
  assert noise['eps_diag'].shape[:2] == (B, 23)
  u_np = np_logit_samples(head, params, x, noise)
  u = head.apply(variables, x, train=True, method=head.sample_logits, rngs=rngs(3))
  np.testing.assert_allclose(u, u_np, atol=1e-4, rtol=1e-4)

  out = head.apply(variables, x, labels, train=True, rngs=rngs(3))
  y = np.eye(K)[np.asarray(labels)]
  if link == 'softmax':
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


@pytest.mark.parametrize('variant', VARIANTS[::3] + VARIANTS[5:7], ids=variant_id)
@pytest.mark.parametrize('link', ['softmax', 'sigmoid'])
def test_chunked_equals_unchunked(variant, link):
  cls, pe, diag_noise = variant
  x = features()
  labels = jnp.array([1, 2, 4])

  def run(chunk):
    head = cls(num_classes=K, num_factors=R, parameter_efficient=pe, diag_noise=diag_noise,
               link=link, learn_temperature=True, train_mc_samples=30, mc_chunk_size=chunk)
    params = init_params(head, x, randomize=0.7)

    def loss(params, x):
      out = head.apply({'params': params}, x, labels, train=True, rngs=rngs(5))
      return out.loss.mean(), out.logits
    (value, logits), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x)
    return value, logits, grads

  ref = run(None)
  for chunk in (1, 7, 30):
    got = run(chunk)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got[2], ref[2])


def test_share_samples_across_batch():
  x = jnp.concatenate([features(batch=1)] * 2)
  for cls in HEADS:
    for share in (False, True):
      head = cls(num_classes=K, num_factors=R, eval_mc_samples=8,
                 share_samples_across_batch=share)
      variables = {'params': init_params(head, x)}
      noise = head.apply(variables, x, method=head.draw_noise, rngs=rngs())
      logits = head.apply(variables, x, rngs=rngs()).logits
      same = [np.allclose(noise['eps_r'][0], noise['eps_r'][1]),
              np.allclose(noise['eps_diag'][0], noise['eps_diag'][1]),
              np.allclose(logits[0], logits[1])]
      assert all(same) if share else not any(same)


def test_lse_loss_vs_clipped_parity():
  """Where no clipping is active both agree; where p_y < 1e-7 only the LSE loss has a gradient."""
  x = features()
  labels = jnp.array([0, 1, 2])
  for cls in HEADS:
    base = dict(num_classes=K, num_factors=R, train_mc_samples=16, mc_chunk_size=6)
    head, parity = cls(**base), cls(**base, clip_probs_parity=True)
    params = init_params(head, x)

    def loss(params, h):
      return h.apply({'params': params}, x, labels, train=True, rngs=rngs()).loss

    np.testing.assert_allclose(loss(params, head), loss(params, parity), rtol=1e-5)
    far = jax.tree.map(lambda a: a, params)
    far['loc_layer']['bias'] = far['loc_layer']['bias'].at[0].set(-40.0)
    l_lse, l_par = loss(far, head), loss(far, parity)
    assert l_lse[0] > 30 and abs(float(l_par[0]) + np.log(1e-7)) < 1e-3
    g_lse = jax.grad(lambda p: loss(p, head)[0])(far)['loc_layer']['bias'][0]
    g_par = jax.grad(lambda p: loss(p, parity)[0])(far)['loc_layer']['bias'][0]
    assert abs(float(g_lse) + 1.0) < 1e-3 and abs(float(g_par)) < 1e-5


@pytest.mark.parametrize('learn_temperature', [False, True])
def test_parameter_counts(learn_temperature):
  dim, k, r = 8, 20, 3
  x = features(dim=dim)
  det = n_params(init_params(SoftmaxHead(num_classes=k), x))
  assert det == (dim + 1) * k
  extra = {}
  for cls, n in ((HETHead, k), (HETXLHead, dim)):
    for pe, formula in ((False, (dim + 1) * (r + 1) * n), (True, n * (2 * dim + r + 3))):
      head = cls(num_classes=k, num_factors=r, parameter_efficient=pe,
                 learn_temperature=learn_temperature)
      extra[cls, pe] = n_params(init_params(head, x)) - det - int(learn_temperature)
      assert extra[cls, pe] == formula, (cls.__name__, pe)
  for pe in (False, True):
    assert extra[HETHead, pe] * dim == extra[HETXLHead, pe] * k   # ratio exactly K / D


def test_latent_dim_must_equal_feature_dim():
  x = features()
  HETXLHead(num_classes=K, num_factors=R, latent_dim=D).init(rngs(0, True), x)
  with pytest.raises(ValueError, match='latent_dim'):
    HETXLHead(num_classes=K, num_factors=R, latent_dim=D + 1).init(rngs(0, True), x)


@pytest.mark.parametrize('cls', HEADS)
def test_learnt_temperature(cls):
  lower, upper = 0.05, 5.0
  head = cls(num_classes=K, num_factors=R, learn_temperature=True,
             temperature_bounds=(lower, upper), train_mc_samples=8)
  x, labels = features(), jnp.array([0, 1, 2])

  def loss(params):
    out, state = head.apply({'params': params}, x, labels, train=True, rngs=rngs(),
                            mutable=['head_metrics'])
    return out.loss.mean(), state['head_metrics']['temperature']['temperature'][0]

  params = init_params(head, x)
  (_, tau), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert abs(float(tau) - (lower + upper) / 2) < 1e-6
  assert abs(float(grads['temperature']['pre_sigmoid_temperature'])) > 1e-6
  for lr in (1e4, -1e4):   # huge steps in both directions
    p = params
    for _ in range(3):
      (_, tau), grads = jax.value_and_grad(loss, has_aux=True)(p)
      p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
      assert lower <= float(tau) <= upper
    assert lower <= float(loss(p)[1]) <= upper


def test_learnt_temperature_trains_with_optax():
  """A few Adam steps move tau (nonzero gradient reaches the temperature through the MC loss)."""
  head = HETXLHead(num_classes=K, num_factors=R, learn_temperature=True, train_mc_samples=8)
  x, labels = features(), jnp.array([0, 1, 2])
  params = init_params(head, x)
  opt = optax.adam(0.1)
  state = opt.init(params)
  loss = lambda p: head.apply({'params': p}, x, labels, train=True, rngs=rngs()).loss.mean()
  for _ in range(3):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state)
    params = optax.apply_updates(params, updates)
  assert abs(float(params['temperature']['pre_sigmoid_temperature'])) > 0.1


@pytest.mark.parametrize('cls', HEADS)
def test_eval_reproducible_and_normalised(cls):
  head = cls(num_classes=K, num_factors=R, train_mc_samples=4, eval_mc_samples=9)
  x = features()
  variables = {'params': init_params(head, x, randomize=0.7)}
  a = head.apply(variables, x, train=False, rngs=rngs(7)).logits
  b = head.apply(variables, x, train=False, rngs=rngs(7)).logits
  c = head.apply(variables, x, train=False, rngs=rngs(8)).logits
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Without noise rngs, eval falls back to a fixed key; training requires the rngs.
  np.testing.assert_array_equal(head.apply(variables, x).logits, head.apply(variables, x).logits)
  with pytest.raises(ValueError, match='rng'):
    head.apply(variables, x, train=True)
  assert head.apply(variables, x, method=head.draw_noise, rngs=rngs())['eps_r'].shape[1] == 9
  assert a.shape == (B, K) and a.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.softmax(a).sum(-1), 1.0, atol=1e-5)
  sig = cls(num_classes=K, num_factors=R, link='sigmoid', eval_mc_samples=9)
  probs = jax.nn.sigmoid(sig.apply(variables, x, rngs=rngs()).logits)
  assert probs.shape == (B, K) and np.all((probs > 0) & (probs < 1))


@pytest.mark.parametrize('cls', HEADS)
def test_return_locs_and_bias_init(cls):
  head = cls(num_classes=K, num_factors=R, return_locs=True, temperature=2.0,
             head_bias_init=-10.0, link='sigmoid')
  x = features()
  params = init_params(head, x)
  np.testing.assert_array_equal(params['loc_layer']['bias'], -10.0)
  out = head.apply({'params': params}, x, jnp.array([0, 1, 2]))   # no rngs needed: no MC
  np.testing.assert_allclose(out.logits, np_terms(head, params, x)[2], rtol=1e-5, atol=1e-5)
  assert out.loss.shape == (B,)


@pytest.mark.parametrize('cls', HEADS)
def test_bfloat16_compute_close_to_float32(cls):
  x = features()
  kwargs = dict(num_classes=K, num_factors=R, eval_mc_samples=16, mc_chunk_size=8)
  params = init_params(cls(**kwargs), x, randomize=0.5)
  f32 = cls(**kwargs).apply({'params': params}, x, rngs=rngs()).logits
  bf16 = cls(**kwargs, compute_dtype=jnp.bfloat16).apply({'params': params}, x, rngs=rngs())
  assert bf16.logits.dtype == jnp.float32
  np.testing.assert_allclose(bf16.logits, f32, atol=0.1)
  assert not np.array_equal(bf16.logits, f32)


def test_invalid_options():
  x = features()
  for kwargs in (dict(link='softmx'), dict(diag_noise='diag'),
                 dict(link='sigmoid', label_smoothing=0.1)):
    with pytest.raises(ValueError):
      HETXLHead(num_classes=K, num_factors=R, **kwargs).init(rngs(0, True), x)


@pytest.mark.parametrize('cls', HEADS)
def test_sharded_matches_unsharded(cls):
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (fake) devices')
  batch, dim, k = 8, 8, 16
  head = cls(num_classes=k, num_factors=R, learn_temperature=True, train_mc_samples=12,
             mc_chunk_size=5)
  x = features(batch=batch, dim=dim)
  labels = jnp.arange(batch) % k
  boxed = head.init(rngs(0, params=True), x, train=False)['params']
  params = nn.meta.unbox(boxed)

  def step(params, x, labels):
    def loss(params, x):
      out = head.apply({'params': params}, x, labels, train=True, rngs=rngs(4))
      return out.loss.mean(), out.logits
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  ref = jax.jit(step)(params, x, labels)
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  specs = nn.get_partition_spec(boxed)
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    assert sharded['loc_layer']['kernel'].sharding.spec == P(None, 'model')
    xs = jax.device_put(x, NamedSharding(mesh, P('data', None)))
    ys = jax.device_put(labels, NamedSharding(mesh, P('data')))
    got = jax.jit(step)(sharded, xs, ys)
  (value, logits), grads = got
  assert logits.sharding.spec[0] == 'data'
  np.testing.assert_allclose(value, ref[0][0], rtol=1e-5)
  np.testing.assert_allclose(logits, ref[0][1], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref[1])
