"""HET and HET-XL heteroscedastic classification heads (Collier et al. 2021, 2023).

HET (`HETHead`) puts Gaussian noise on the K logits, HET-XL (`HETXLHead`) on the D pre-logits:

  HET:    u_s = mu(x) + V(x) eps_R,s + d(x) * eps_K,s                 mu(x) = W^T phi(x) + b
  HET-XL: u_s = W^T (phi(x) + V'(x) eps_R,s + d'(x) * eps_D,s) + b     = mu(x) + W^T eps'_s
  p(y | x) = mean_s softmax(u_s / tau)      (link='softmax';  sigmoid per class for 'sigmoid')

Both follow the head contract of `heads.base`: `logits` are log mean_s softmax(u_s / tau)
(a logsumexp over samples minus log S, never a log of clipped probabilities), so softmax(logits)
is the MC-mean probability; for the sigmoid link `logits = log p - log(1 - p)` with both logs taken
as logsumexps of log_sigmoid(+-u / tau). The loss is the negative log MC probability of the label.

Mapping to google/edward2 `edward2/jax/nn/heteroscedastic_lib.py`:
  * `MCSoftmaxDenseFA(num_classes=K, ...)` is `HETHead(link='softmax')`; with `latent_dim=D` it
    is `HETXLHead`. `MCSigmoidDenseFA(num_outputs=K)` is `link='sigmoid'`.
  * options: `test_mc_samples` -> `eval_mc_samples`; `tune_temperature` -> `learn_temperature`;
    `temperature_lower_bound / _upper_bound` -> `temperature_bounds`; `eps=1e-7` probability
    clipping -> `clip_probs_parity=True`; `num_factors`, `parameter_efficient`, `temperature`,
    `train_mc_samples`, `share_samples_across_batch`, `return_locs` keep their names.
  * params (same names and shapes; n = K for HET, n = D for HET-XL): `loc_layer` Dense D->K;
    full variant `scale_layer` Dense D->n*R (reshaped [B, n, R], n-major like edward2); PE
    variant `scale_layer_homoscedastic` Dense R->n (J, b_J) and `scale_layer_heteroscedastic`
    Dense D->n (v); `diag_layer` Dense D->n with d = softplus(.) + 1e-3. The learnt temperature
    is `temperature/pre_sigmoid_temperature`, a scalar (edward2: top-level, shape [1]).
  * rng streams: 'standard_norm_noise_samples' (eps_R) and 'diag_noise_samples' (eps_n).
  * PE noise is (J eps_R + b_J) * v(x): the bias b_J of the homoscedastic Dense gives the noise a
    nonzero mean b_J * v(x). Kept for parity (b_J starts at 0, so the mean starts at 0).
  * edward2's HET-XL requires `latent_dim == D` (no projection); here `latent_dim` is optional and
    any other value raises a ValueError.
  * edward2's JAX diagonal noise is ONE scalar normal per sample times d(x) (covariance d d^T,
    rank 1). `diag_noise='independent'` (default) is the paper's diag(d^2); `'rank1'` is parity.

Cost and memory: samples are processed `mc_chunk_size` at a time in a rematerialised scan
(`hetxl.mc`), so at most one [B, chunk, K] block exists, forward or backward. HET-XL's sample
projection is one matmul [B*chunk, D] x [D, K] in `compute_dtype` with f32 accumulation (all
matmuls use `compute_dtype`; softmax and logsumexp are always f32). In rank-1 mode HET-XL uses
the exact factorised form u_s = mu + (W^T V') eps_R,s + (W^T d') z_s, costing B*K*(R+1)*(D+S)
instead of B*S*D*K. Low-dimensional noise (eps_R [B, S, R], rank-1 z [B, S, 1]) is drawn for
all S samples up front; the diagonal noise (HET's eps_K, HET-XL's eps_D) is drawn per chunk,
sample s from fold_in(key, s), so results do not depend on the chunk size and no [B, S, D] or
[B, S, K] noise exists (at JFT sizes, HET-XL's [B, S, D] draws cost 170 MiB of temporaries).

Sigmoid link without sampling: `mc_method='quadrature'` (sigmoid link only; a ValueError for
softmax) computes each class's marginal mean and variance in closed form (`_marginals`, cost
B*K*D*(R+1) for HET-XL, no [B, S, K] or [B, D, D] tensor) and log p, log(1 - p) by
`hetxl.quadrature` with `quadrature_nodes` nodes: the S -> infinity limit of the MC estimate,
deterministic, with the same params as 'mc' (checkpoints are interchangeable). The default
`mc_method='mc'` is the paper's estimator. `sample_logits` / `draw_noise` always sample.

Code: `_layers` creates every parameter and evaluates mu, the noise scales and tau; `_draws` the
standard normals; `het_samples` / `hetxl_samples` / `hetxl_rank1_samples` are the sample
functions idx -> u_s above; `mc_softmax_log_probs` and `mc_sigmoid_log_probs` the two MC
estimators (`_marginals` + `hetxl.quadrature` the sigmoid link's closed form).

Eval (`train=False`) uses `eval_mc_samples`; without the noise rngs it uses a fixed key
(`heads.base.Head.noise_key`), so repeated evals agree. `return_locs=True` returns mu (not
divided by tau) and no MC is run.
"""
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from heads.base import (LINKS, METRICS, Head, HeadOutput, class_sharded, link_loss,
                        real_classes, sigmoid_cross_entropy, sigmoid_targets)
from heads.temperature import BoundedTemperature
from hetxl import mc, quadrature

MIN_SCALE = 1e-3
CLIP_EPS = 1e-7
RNG_R, RNG_DIAG = 'standard_norm_noise_samples', 'diag_noise_samples'   # eps_R, eps_n


class _DenseParams(nn.Module):
  """A Dense layer's `kernel` [in, out] and `bias` [out]; the heads do the matmuls themselves."""
  in_features: int
  features: int
  shard_classes: bool = False
  bias_value: float = 0.0
  real_features: Optional[int] = None   # a padded class dimension: its real columns

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel_init = nn.initializers.lecun_normal()
    bias_init = nn.initializers.constant(self.bias_value)
    if self.shard_classes:
      kernel_init = class_sharded(kernel_init, num_classes=self.real_features)
      bias_init = class_sharded(bias_init, ndim=1, num_classes=self.real_features)
    kernel = self.param('kernel', kernel_init, (self.in_features, self.features), jnp.float32)
    bias = self.param('bias', bias_init, (self.features,), jnp.float32)
    return kernel, bias


def _mm(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """einsum in `dtype` with float32 accumulation and result."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class NoiseScales(NamedTuple):
  """The x-dependent scales of the Gaussian noise on an n-dim vector (n = K for HET, D for
  HET-XL): eps = V(x) eps_R + d(x) * eps_n, with V(x) = `scale` [B, n, R] (full variant) or
  V(x) eps_R = (J eps_R + b_J) * v(x) (parameter-efficient: `v` [B, n], J = `hom_k` [R, n],
  b_J = `hom_b` [n]); `d` [B, n] = softplus(.) + MIN_SCALE. Unused fields are None."""
  d: jax.Array
  v: Optional[jax.Array] = None
  scale: Optional[jax.Array] = None
  hom_k: Optional[jax.Array] = None
  hom_b: Optional[jax.Array] = None


def noise_layers(in_features: int, n: int, num_factors: int, parameter_efficient: bool,
                 shard: bool = False, real_n: Optional[int] = None
                 ) -> Callable[[jax.Array, Any], NoiseScales]:
  """Creates the noise layers inside the calling compact module (edward2's names:
  `scale_layer` or `scale_layer_homoscedastic` + `scale_layer_heteroscedastic`, and
  `diag_layer`) and returns `scales(x [B, in_features], compute_dtype) -> NoiseScales`.
  `real_n` < n: n is a padded class dimension whose first `real_n` entries are real (their
  initial values are those of the unpadded layers, the padding starts at 0).

  Shared by the HET / HET-XL heads and the contrastive HET-XL head (`hetxl.contrastive`).
  """
  R = num_factors
  real = lambda m: None if real_n is None else real_n * m
  if R and parameter_efficient:
    hom_k, hom_b = _DenseParams(R, n, shard, real_features=real(1),
                                name='scale_layer_homoscedastic')()
    het_k, het_b = _DenseParams(in_features, n, shard, real_features=real(1),
                                name='scale_layer_heteroscedastic')()
  elif R:   # [in, n * R] n-major: the first real_n * R columns are the real classes'
    scale_k, scale_b = _DenseParams(in_features, n * R, shard, real_features=real(R),
                                    name='scale_layer')()
  diag_k, diag_b = _DenseParams(in_features, n, shard, real_features=real(1),
                                name='diag_layer')()

  def scales(x: jax.Array, cd: Any) -> NoiseScales:
    d = jax.nn.softplus(_mm('bd,dn->bn', x, diag_k, cd) + diag_b) + MIN_SCALE     # [B, n]
    if R and parameter_efficient:
      v = _mm('bd,dn->bn', x, het_k, cd) + het_b                                   # [B, n]
      return NoiseScales(d, v=v, hom_k=hom_k, hom_b=hom_b)
    if R:
      scale = (_mm('bd,dm->bm', x, scale_k, cd) + scale_b).reshape(x.shape[0], n, R)
      return NoiseScales(d, scale=scale)                                            # [B, n, R]
    return NoiseScales(d)
  return scales


def low_rank_noise(s: NoiseScales, eps_r: jax.Array, cd: Any) -> jax.Array:
  """V(x) eps_R (+ the PE noise mean b_J * v(x)) for draws eps_r [B, C, R]: [B, C, n]."""
  if s.v is not None:
    return (_mm('bcr,rn->bcn', eps_r, s.hom_k, cd) + s.hom_b) * s.v[:, None, :]
  return _mm('bnr,bcr->bcn', s.scale, eps_r, cd)


class Layers(NamedTuple):
  """What the head's layers give for features x [B, D]: `mu` = W^T x + b [B, K], the loc
  kernel `w` [D, K], the noise `scales` (n = K for HET, D for HET-XL) and the temperature
  `tau` (a scalar)."""
  mu: jax.Array
  w: jax.Array
  scales: NoiseScales
  tau: jax.Array


class Draws(NamedTuple):
  """Standard-normal draws for S samples: `eps_r` [B, S, R] (None when R = 0), drawn up front,
  and `diag(idx [C])` -> [B or 1, C, n] (independent) or [B, C, 1] (rank1) for samples idx."""
  eps_r: Optional[jax.Array]
  diag: Callable[[jax.Array], jax.Array]


def latent_factors(s: NoiseScales) -> Tuple[Optional[jax.Array], Optional[jax.Array]]:
  """HET-XL's pre-logit noise written as shift + V' eps_R: (shift [B, D] = b_J * v for the
  parameter-efficient variant, else None; factors V'^T [B, R, D], None when R = 0)."""
  if s.v is not None:
    return s.hom_b * s.v, s.hom_k[None] * s.v[:, None, :]
  if s.scale is not None:
    return None, jnp.swapaxes(s.scale, 1, 2)
  return None, None


def het_samples(mu: jax.Array, s: NoiseScales, draws: Draws, cd: Any) -> mc.SampleFn:
  """HET, noise on the logits: u_s = mu + V(x) eps_R,s + d(x) * eps_K,s, [B, C, K]."""
  def sample_fn(idx):
    u = mu[:, None, :] + s.d[:, None, :] * draws.diag(idx)
    if draws.eps_r is None:
      return u
    return u + low_rank_noise(s, mc.take_samples(draws.eps_r, idx), cd)
  return sample_fn


def hetxl_samples(mu: jax.Array, w: jax.Array, s: NoiseScales, draws: Draws,
                  cd: Any) -> mc.SampleFn:
  """HET-XL, noise on the pre-logits: u_s = mu + W^T (V'(x) eps_R,s + d'(x) * eps_D,s),
  [B, C, K]; one [B*C, D] x [D, K] matmul per chunk."""
  def sample_fn(idx):
    eps = s.d[:, None, :] * draws.diag(idx)
    if draws.eps_r is not None:
      eps = eps + low_rank_noise(s, mc.take_samples(draws.eps_r, idx), cd)
    return mu[:, None, :] + _mm('bcd,dk->bck', eps, w, cd)
  return sample_fn


def hetxl_rank1_samples(mu: jax.Array, w: jax.Array, s: NoiseScales, draws: Draws,
                        cd: Any) -> mc.SampleFn:
  """HET-XL with rank-1 diagonal noise, factorised exactly: u_s = mu + W^T shift
  + (W^T V') eps_R,s + (W^T d') z_s, [B, C, K]; costs B*K*(R+1)*(D+S), no [B, C, D] tensor."""
  shift, factors = latent_factors(s)
  mu_eff = mu if shift is None else mu + _mm('bd,dk->bk', shift, w, cd)
  c = _mm('bd,dk->bk', s.d, w, cd)
  # [B, R, K]; (the [B, R, .] layout also avoids a bf16 dot XLA:CPU lacks)
  a = None if draws.eps_r is None else _mm('brd,dk->brk', factors, w, cd)

  def sample_fn(idx):
    u = mu_eff[:, None, :] + c[:, None, :] * draws.diag(idx)
    if a is None:
      return u
    return u + _mm('brk,bcr->bck', a, mc.take_samples(draws.eps_r, idx), cd)
  return sample_fn


def mc_softmax_log_probs(sample_fn: mc.SampleFn, tau: jax.Array, num_samples: int,
                         chunk_size: Optional[int]) -> jax.Array:
  """log p = log (1/S) sum_s softmax(u_s / tau), [B, K], as a logsumexp over samples of
  log_softmax minus log S (never a log of a clipped probability)."""
  log_fn = lambda u: (jax.nn.log_softmax(u / tau, axis=-1),)
  (log_p,) = mc.mc_log_mean_exp(sample_fn, log_fn, num_samples, chunk_size)
  return log_p


def mc_sigmoid_log_probs(sample_fn: mc.SampleFn, tau: jax.Array, num_samples: int,
                         chunk_size: Optional[int]) -> Tuple[jax.Array, jax.Array]:
  """(log p, log (1 - p)) with p = (1/S) sum_s sigmoid(u_s / tau), [B, K] each; as
  1 - sigmoid(u) = sigmoid(-u), both are logsumexps over samples of log_sigmoid(+-u / tau)."""
  log_fn = lambda u: (jax.nn.log_sigmoid(u / tau), jax.nn.log_sigmoid(-u / tau))
  return mc.mc_log_mean_exp(sample_fn, log_fn, num_samples, chunk_size)


class _HeteroscedasticHead(Head):
  """Shared implementation; `_latent_noise` selects HET-XL (noise in pre-logit space)."""
  num_classes: int
  num_factors: int
  parameter_efficient: bool = False
  link: str = 'softmax'
  temperature: float = 1.0
  learn_temperature: bool = False
  temperature_bounds: Tuple[float, float] = (0.3, 3.0)
  train_mc_samples: int = 1000
  eval_mc_samples: int = 1000
  mc_chunk_size: Optional[int] = 128
  share_samples_across_batch: bool = False
  return_locs: bool = False
  diag_noise: str = 'independent'
  head_bias_init: float = 0.0
  label_smoothing: float = 0.0
  clip_probs_parity: bool = False
  compute_dtype: jnp.dtype = jnp.float32
  mc_method: str = 'mc'
  quadrature_nodes: int = 32

  rng_streams = (RNG_DIAG, RNG_R)
  sows = {METRICS: ('temperature',)}     # with learn_temperature
  pads_classes = True    # mu's padded classes sit at PADDED_LOGIT, so every sample's do too
  _latent_noise = False

  def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False) -> HeadOutput:
    h = self._layers(x)
    if self.return_locs:
      loss = None if labels is None else link_loss(self.link, h.mu, labels, self.label_smoothing,
                                                   self.num_classes)
      return HeadOutput(h.mu, loss)
    if self.mc_method == 'quadrature':
      log_p, log_1mp = quadrature.sigmoid_log_marginals(*self._marginals(h), h.tau,
                                                        self.quadrature_nodes)
      return self._sigmoid_output(log_p, log_1mp, labels)
    num_samples = self._num_samples(train)
    sample_fn = self._sample_fn(h, self._draws(h, num_samples, train))
    if self.link == 'softmax':
      log_p = mc_softmax_log_probs(sample_fn, h.tau, num_samples, self.mc_chunk_size)
      return self._softmax_output(log_p, labels)
    log_p, log_1mp = mc_sigmoid_log_probs(sample_fn, h.tau, num_samples, self.mc_chunk_size)
    return self._sigmoid_output(log_p, log_1mp, labels)

  def sample_logits(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """All S pre-temperature logit samples u_s, [B, S, K] (materialised: for tests and analysis)."""
    h = self._layers(x)
    num_samples = self._num_samples(train)
    sample_fn = self._sample_fn(h, self._draws(h, num_samples, train))
    return sample_fn(jnp.arange(num_samples))

  def marginals(self, x: jax.Array, *, train: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Mean and variance [B, K] of each pre-temperature logit u_k, in closed form (what
    `mc_method='quadrature'` integrates over; any link, no samples)."""
    del train
    return self._marginals(self._layers(x))

  def draw_noise(self, x: jax.Array, *, train: bool = False) -> Dict[str, jax.Array]:
    """The standard-normal draws the head uses for `x` with the same rngs (materialised).

    'eps_r' [B, S, R]; 'eps_diag' [B, S, n] (independent) or [B, S, 1] (rank1), n = K or D.
    """
    h = self._layers(x)
    num_samples = self._num_samples(train)
    draws = self._draws(h, num_samples, train)
    batch, n = h.scales.d.shape
    shape = (batch, num_samples, 1 if self.diag_noise == 'rank1' else n)
    return {'eps_r': draws.eps_r,
            'eps_diag': jnp.broadcast_to(draws.diag(jnp.arange(num_samples)), shape)}

  def ood_scores(self, x: jax.Array, logits: jax.Array) -> Dict[str, jax.Array]:
    """'mc_entropy' [B], nats: the entropy of the MC predictive distribution
    p = mean_s link(u_s / tau) that `logits` (the head's eval output) encodes; for the sigmoid
    link the sum over classes of each class's Bernoulli entropy. Higher = more likely OOD."""
    del x
    logits = logits.astype(jnp.float32)
    if self.link == 'softmax':
      log_p = jax.nn.log_softmax(logits)
      return {'mc_entropy': -jnp.sum(jnp.exp(log_p) * log_p, -1)}
    p = jax.nn.sigmoid(logits)
    return {'mc_entropy': -jnp.sum(p * jax.nn.log_sigmoid(logits)
                                   + (1 - p) * jax.nn.log_sigmoid(-logits), -1)}

  def _check(self, dim: int):
    if self.link not in LINKS:
      raise ValueError(f"link must be 'softmax' or 'sigmoid', got {self.link!r}")
    if self.diag_noise not in ('independent', 'rank1'):
      raise ValueError(f"diag_noise must be 'independent' or 'rank1', got {self.diag_noise!r}")
    if self.mc_method not in ('mc', 'quadrature'):
      raise ValueError(f"mc_method must be 'mc' or 'quadrature', got {self.mc_method!r}")
    if self.mc_method == 'quadrature' and self.link != 'sigmoid':
      raise ValueError("mc_method='quadrature' needs link='sigmoid': the softmax link's "
                       "probability couples all classes and has no one-dimensional closed form; "
                       "use mc_method='mc' with the softmax link")
    if self.mc_method == 'quadrature' and self.quadrature_nodes < 2:
      raise ValueError(f'quadrature_nodes must be >= 2, got {self.quadrature_nodes}')
    if self.num_factors < 0 or (self.parameter_efficient and self.num_factors == 0):
      raise ValueError(f'num_factors must be >= 0 (>= 1 when parameter_efficient), '
                       f'got {self.num_factors}')
    if min(self.train_mc_samples, self.eval_mc_samples) < 1:
      raise ValueError('train_mc_samples and eval_mc_samples must be >= 1')
    if not self.learn_temperature and self.temperature <= 0:
      raise ValueError(f'temperature must be > 0, got {self.temperature}')
    latent_dim = getattr(self, 'latent_dim', None)
    if latent_dim is not None and latent_dim != dim:
      raise ValueError(f'latent_dim must equal the feature dimension D={dim} (HET-XL adds noise '
                       f'to the pre-logits, there is no projection), got latent_dim={latent_dim}')

  def _num_samples(self, train: bool) -> int:
    return self.train_mc_samples if train else self.eval_mc_samples

  @nn.compact
  def _layers(self, x: jax.Array) -> Layers:
    """Creates every parameter (whatever the options, so the param tree never changes) and
    evaluates the layers on features x [B, D]."""
    dim = x.shape[1]
    self._check(dim)
    x = x.astype(jnp.float32)
    w, b = _DenseParams(dim, self.padded_classes, True, self.head_bias_init,
                        real_features=self.num_classes, name='loc_layer')()
    # HET's noise layers have a class dimension (sharded, padded); HET-XL's do not.
    het = not self._latent_noise
    noise_scales = noise_layers(dim, self.padded_classes if het else dim, self.num_factors,
                                self.parameter_efficient, shard=het,
                                real_n=self.num_classes if het else None)
    if self.learn_temperature:
      tau = BoundedTemperature(self.temperature_bounds, name='temperature')()
    else:
      tau = jnp.float32(self.temperature)
    cd = self.compute_dtype
    # Padded classes: mu at PADDED_LOGIT, so u_s = mu + noise is too, for every sample (the
    # noise is O(1)), and their probability is 0 in MC and quadrature alike.
    mu = self.mask_padded(_mm('bd,dk->bk', x, w, cd) + b)
    return Layers(mu, w, noise_scales(x, cd), tau)

  def _draws(self, h: Layers, num_samples: int, train: bool) -> Draws:
    """eps_R for all samples up front; the diagonal noise per sample (independent: sample s
    from fold_in(key, s), so no [B, S, n] tensor exists) or up front (rank1: [B, S, 1])."""
    batch, n = h.scales.d.shape
    share = self.share_samples_across_batch
    eps_r = (mc.normal_upfront(self.noise_key(RNG_R, train), batch, num_samples,
                               self.num_factors, share) if self.num_factors else None)
    key_diag = self.noise_key(RNG_DIAG, train)
    if self.diag_noise == 'rank1':
      z = mc.normal_upfront(key_diag, batch, num_samples, 1, share)
      return Draws(eps_r, lambda idx: mc.take_samples(z, idx))
    return Draws(eps_r, lambda idx: mc.normal_per_sample(key_diag, idx, batch, n, share))

  def _sample_fn(self, h: Layers, draws: Draws) -> mc.SampleFn:
    """The sample function idx [C] -> u [B, C, K] of this head's noise model."""
    cd = self.compute_dtype
    if not self._latent_noise:
      return het_samples(h.mu, h.scales, draws, cd)
    if self.diag_noise == 'rank1':
      return hetxl_rank1_samples(h.mu, h.w, h.scales, draws, cd)
    return hetxl_samples(h.mu, h.w, h.scales, draws, cd)

  def _marginals(self, h: Layers) -> Tuple[jax.Array, jax.Array]:
    """Mean and variance [B, K] of each pre-temperature logit u_k (closed form, no samples).

    HET: var = ||V_k||^2 + d_k^2 (full) or v_k^2 ||J_k||^2 + d_k^2 (PE, mean + b_J v); either
    diag mode has the marginal variance d_k^2. HET-XL: var = ||V'^T w_k||^2 + sum_d w_dk^2 d_d^2
    ((w_k . d)^2 in rank-1 mode) with V' = diag(v) J^T for PE (mean + W^T (b_J v)). The
    ||V'^T w_k||^2 term goes through (V'^T W) [B, R, K], never a [B, D, D] covariance: cost
    B*K*D*(R+1) multiply-adds in `compute_dtype`, f32 accumulation.
    """
    cd, s, w = self.compute_dtype, h.scales, h.w
    if not self._latent_noise:
      mean, var = h.mu, s.d * s.d
      if s.v is not None:
        mean = mean + s.hom_b * s.v
        var = var + s.v * s.v * jnp.sum(s.hom_k * s.hom_k, axis=0)
      elif s.scale is not None:
        var = var + jnp.sum(s.scale * s.scale, axis=-1)
      return mean, var
    if self.diag_noise == 'rank1':
      var = _mm('bd,dk->bk', s.d, w, cd) ** 2
    else:
      var = _mm('bd,dk->bk', s.d * s.d, w * w, cd)
    shift, factors = latent_factors(s)
    mean = h.mu if shift is None else h.mu + _mm('bd,dk->bk', shift, w, cd)
    if factors is None:
      return mean, var
    a = _mm('brd,dk->brk', factors, w, cd)                                         # [B, R, K]
    return mean, var + jnp.sum(a * a, axis=1)

  def _softmax_output(self, log_p: jax.Array, labels: Optional[jax.Array]) -> HeadOutput:
    """Softmax-link logits log p (or edward2's log clip(p, 1e-7) with `clip_probs_parity`)
    and loss -log p_y (label-smoothed)."""
    logits = jnp.log(jnp.clip(jnp.exp(log_p), CLIP_EPS)) if self.clip_probs_parity else log_p
    logits = self.mask_padded(logits)
    loss = None if labels is None else link_loss('softmax', logits, labels, self.label_smoothing,
                                                 self.num_classes)
    return HeadOutput(logits, loss)

  def _sigmoid_output(self, log_p: jax.Array, log_1mp: jax.Array,
                      labels: Optional[jax.Array]) -> HeadOutput:
    """Sigmoid-link logits log p - log(1 - p) and loss -(y log p + (1 - y) log(1 - p))."""
    if self.clip_probs_parity:
      p = jnp.exp(log_p)
      logits = jnp.log(jnp.clip(p, CLIP_EPS)) - jnp.log(1.0 - jnp.clip(p, CLIP_EPS, 1 - CLIP_EPS))
      logits = self.mask_padded(logits)
      loss = None if labels is None else sigmoid_cross_entropy(logits, labels,
                                                                self.label_smoothing,
                                                                self.num_classes)
      return HeadOutput(logits, loss)
    logits = self.mask_padded(log_p - log_1mp)
    loss = None
    if labels is not None:
      # padded classes: target 0 and log(1 - p) set to its limit 0, so they add exactly 0
      y = sigmoid_targets(labels, log_p.shape[-1], self.label_smoothing, self.num_classes)
      log_1mp = jnp.where(real_classes(log_p.shape[-1], self.num_classes), log_1mp, 0.0)
      loss = -(y * log_p + (1.0 - y) * log_1mp).sum(-1)
    return HeadOutput(logits, loss)


class HETHead(_HeteroscedasticHead):
  """HET: noise in logit space, u_s = mu + V(x) eps_R + d(x) * eps_K (see module docstring).

  Extra parameters over the DET head: full (D+1)(R+1)K, parameter-efficient K(2D+R+3).
  """
  _latent_noise = False


class HETXLHead(_HeteroscedasticHead):
  """HET-XL: noise in pre-logit space, u_s = W^T (phi + V'(x) eps_R + d'(x) * eps_D) + b.

  Extra parameters over the DET head: full (D+1)(R+1)D, parameter-efficient D(2D+R+3), both
  independent of K. `latent_dim`, if given, must equal D (edward2 compatibility).
  """
  latent_dim: Optional[int] = None
  _latent_noise = True
