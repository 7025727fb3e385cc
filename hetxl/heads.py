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

Eval (`train=False`) uses `eval_mc_samples`; without the noise rngs it uses a fixed key, so
repeated evals agree. `return_locs=True` returns mu (not divided by tau) and no MC is run.
"""
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from heads.base import (HeadOutput, class_sharded, link_loss, sigmoid_cross_entropy,
                        sigmoid_targets)
from heads.temperature import BoundedTemperature
from hetxl import mc, quadrature

MIN_SCALE = 1e-3
CLIP_EPS = 1e-7
EVAL_SEED = 0
_RNG_R, _RNG_DIAG = 'standard_norm_noise_samples', 'diag_noise_samples'


class _DenseParams(nn.Module):
  """A Dense layer's `kernel` [in, out] and `bias` [out]; the heads do the matmuls themselves."""
  in_features: int
  features: int
  shard_classes: bool = False
  bias_value: float = 0.0

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel_init = nn.initializers.lecun_normal()
    bias_init = nn.initializers.constant(self.bias_value)
    if self.shard_classes:
      kernel_init, bias_init = class_sharded(kernel_init), class_sharded(bias_init, ndim=1)
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
                 shard: bool = False) -> Callable[[jax.Array, Any], NoiseScales]:
  """Creates the noise layers inside the calling compact module (edward2's names:
  `scale_layer` or `scale_layer_homoscedastic` + `scale_layer_heteroscedastic`, and
  `diag_layer`) and returns `scales(x [B, in_features], compute_dtype) -> NoiseScales`.

  Shared by the HET / HET-XL heads and the contrastive HET-XL head (`hetxl.contrastive`).
  """
  R = num_factors
  if R and parameter_efficient:
    hom_k, hom_b = _DenseParams(R, n, shard, name='scale_layer_homoscedastic')()
    het_k, het_b = _DenseParams(in_features, n, shard, name='scale_layer_heteroscedastic')()
  elif R:
    scale_k, scale_b = _DenseParams(in_features, n * R, shard, name='scale_layer')()
  diag_k, diag_b = _DenseParams(in_features, n, shard, name='diag_layer')()

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


class _HeteroscedasticHead(nn.Module):
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

  _latent_noise = False

  def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False) -> HeadOutput:
    return self._run(x, labels, train, 'head')

  def sample_logits(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """All S pre-temperature logit samples u_s, [B, S, K] (materialised: for tests and analysis)."""
    return self._run(x, None, train, 'samples')

  def marginals(self, x: jax.Array, *, train: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Mean and variance [B, K] of each pre-temperature logit u_k, in closed form (what
    `mc_method='quadrature'` integrates over; any link, no samples)."""
    return self._run(x, None, train, 'marginals')

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

  def draw_noise(self, x: jax.Array, *, train: bool = False) -> Dict[str, jax.Array]:
    """The standard-normal draws the head uses for `x` with the same rngs (materialised).

    'eps_r' [B, S, R]; 'eps_diag' [B, S, n] (independent) or [B, S, 1] (rank1), n = K or D.
    """
    return self._run(x, None, train, 'noise')

  def _check(self, dim: int):
    if self.link not in ('softmax', 'sigmoid'):
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

  def _noise_key(self, name: str, train: bool) -> jax.Array:
    if self.has_rng(name):
      return self.make_rng(name)
    if train:
      raise ValueError(f"{type(self).__name__} needs the rng stream {name!r} when train=True")
    return jax.random.fold_in(jax.random.key(EVAL_SEED), (_RNG_R, _RNG_DIAG).index(name))

  @nn.compact
  def _run(self, x: jax.Array, labels: Optional[jax.Array], train: bool, mode: str):
    batch, dim = x.shape
    self._check(dim)
    x = x.astype(jnp.float32)
    K, R, cd = self.num_classes, self.num_factors, self.compute_dtype
    latent = self._latent_noise
    n = dim if latent else K        # noise dimension
    shard = not latent              # HET's noise layers have a class dimension

    # Parameters (all created whatever the options, so the param tree never changes).
    w, b = _DenseParams(dim, K, True, self.head_bias_init, name='loc_layer')()
    noise_scales = noise_layers(dim, n, R, self.parameter_efficient, shard)
    if self.learn_temperature:
      tau = BoundedTemperature(self.temperature_bounds, name='temperature')()
    else:
      tau = jnp.float32(self.temperature)

    mu = _mm('bd,dk->bk', x, w, cd) + b
    if self.return_locs and mode == 'head':
      loss = None if labels is None else link_loss(self.link, mu, labels, self.label_smoothing)
      return HeadOutput(mu, loss)

    # x-dependent noise scales.
    scales = noise_scales(x, cd)
    d, v, scale, hom_k, hom_b = scales

    if mode == 'marginals' or (self.mc_method == 'quadrature' and mode == 'head'):
      mean, var = self._marginals(mu, w, d, hom_k, hom_b, v, scale)
      if mode == 'marginals':
        return mean, var
      log_p, log_1mp = quadrature.sigmoid_log_marginals(mean, var, tau, self.quadrature_nodes)
      return self._sigmoid_output(log_p, log_1mp, labels)

    # Noise. Low-dimensional draws are made for all samples up front, diagonal ones per chunk.
    num_samples = self.train_mc_samples if train else self.eval_mc_samples
    share = self.share_samples_across_batch
    rank1 = self.diag_noise == 'rank1'
    eps_r = (mc.normal_upfront(self._noise_key(_RNG_R, train), batch, num_samples, R, share)
             if R else None)
    key_diag = self._noise_key(_RNG_DIAG, train)
    if rank1:
      eps_diag = mc.normal_upfront(key_diag, batch, num_samples, 1, share)

    def diag_noise(idx):     # [B or 1, C, n or 1]
      if rank1:
        return mc.take_samples(eps_diag, idx)
      return mc.normal_per_sample(key_diag, idx, batch, n, share)

    if mode == 'noise':
      idx = jnp.arange(num_samples)
      return {'eps_r': eps_r, 'eps_diag': jnp.broadcast_to(
          diag_noise(idx), (batch, num_samples, 1 if rank1 else n))}

    def low_rank(idx):       # V eps_R (+ PE mean), [B, C, n]
      return low_rank_noise(scales, mc.take_samples(eps_r, idx), cd)

    if not latent:
      def sample_fn(idx):
        u = mu[:, None, :] + d[:, None, :] * diag_noise(idx)
        return u + low_rank(idx) if R else u
    elif not rank1:
      def sample_fn(idx):
        eps = d[:, None, :] * diag_noise(idx)
        if R:
          eps = eps + low_rank(idx)
        return mu[:, None, :] + _mm('bcd,dk->bck', eps, w, cd)
    else:
      # Exact factorised rank-1 path: u_s = mu + (W^T V') eps_R,s + (W^T d') z_s.
      mu_eff, c = mu, _mm('bd,dk->bk', d, w, cd)
      if R and self.parameter_efficient:
        mu_eff = mu + _mm('bd,dk->bk', hom_b * v, w, cd)
        factors = hom_k[None] * v[:, None, :]                                      # [B, R, D]
      elif R:
        factors = jnp.swapaxes(scale, 1, 2)                                        # [B, R, D]
      if R:   # [B, R, K]; (the [B, R, .] layout also avoids a bf16 dot XLA:CPU lacks)
        a = _mm('brd,dk->brk', factors, w, cd)

      def sample_fn(idx):
        u = mu_eff[:, None, :] + c[:, None, :] * diag_noise(idx)
        return u + _mm('brk,bcr->bck', a, mc.take_samples(eps_r, idx), cd) if R else u

    if mode == 'samples':
      return sample_fn(jnp.arange(num_samples))

    if self.link == 'softmax':
      log_fn = lambda u: (jax.nn.log_softmax(u / tau, axis=-1),)
    else:
      log_fn = lambda u: (jax.nn.log_sigmoid(u / tau), jax.nn.log_sigmoid(-u / tau))
    log_p, *rest = mc.mc_log_mean_exp(sample_fn, log_fn, num_samples, self.mc_chunk_size)

    if self.link == 'softmax':
      logits = (jnp.log(jnp.clip(jnp.exp(log_p), CLIP_EPS)) if self.clip_probs_parity
                else log_p)
      loss = None if labels is None else link_loss('softmax', logits, labels,
                                                   self.label_smoothing)
      return HeadOutput(logits, loss)

    (log_1mp,) = rest
    return self._sigmoid_output(log_p, log_1mp, labels)

  def _marginals(self, mu, w, d, hom_k, hom_b, v, scale):
    """Mean and variance [B, K] of each pre-temperature logit u_k (closed form, no samples).

    HET: var = ||V_k||^2 + d_k^2 (full) or v_k^2 ||J_k||^2 + d_k^2 (PE, mean + b_J v); either
    diag mode has the marginal variance d_k^2. HET-XL: var = ||V'^T w_k||^2 + sum_d w_dk^2 d_d^2
    ((w_k . d)^2 in rank-1 mode) with V' = diag(v) J^T for PE (mean + W^T (b_J v)). The
    ||V'^T w_k||^2 term goes through (V'^T W) [B, R, K], never a [B, D, D] covariance: cost
    B*K*D*(R+1) multiply-adds in `compute_dtype`, f32 accumulation.
    """
    cd = self.compute_dtype
    if not self._latent_noise:
      mean, var = mu, d * d
      if v is not None:
        mean = mean + hom_b * v
        var = var + v * v * jnp.sum(hom_k * hom_k, axis=0)
      elif scale is not None:
        var = var + jnp.sum(scale * scale, axis=-1)
      return mean, var
    mean = mu
    if self.diag_noise == 'rank1':
      var = _mm('bd,dk->bk', d, w, cd) ** 2
    else:
      var = _mm('bd,dk->bk', d * d, w * w, cd)
    if v is not None:
      mean = mean + _mm('bd,dk->bk', hom_b * v, w, cd)
      factors = hom_k[None] * v[:, None, :]                                        # [B, R, D]
    elif scale is not None:
      factors = jnp.swapaxes(scale, 1, 2)                                          # [B, R, D]
    else:
      return mean, var
    a = _mm('brd,dk->brk', factors, w, cd)                                         # [B, R, K]
    return mean, var + jnp.sum(a * a, axis=1)

  def _sigmoid_output(self, log_p: jax.Array, log_1mp: jax.Array,
                      labels: Optional[jax.Array]) -> HeadOutput:
    """Sigmoid-link logits log p - log(1 - p) and loss -(y log p + (1 - y) log(1 - p))."""
    K = self.num_classes
    if self.clip_probs_parity:
      p = jnp.exp(log_p)
      logits = jnp.log(jnp.clip(p, CLIP_EPS)) - jnp.log(1.0 - jnp.clip(p, CLIP_EPS, 1 - CLIP_EPS))
      loss = None if labels is None else sigmoid_cross_entropy(logits, labels,
                                                                self.label_smoothing)
      return HeadOutput(logits, loss)
    logits = log_p - log_1mp
    loss = None
    if labels is not None:
      y = sigmoid_targets(labels, K, self.label_smoothing)
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
