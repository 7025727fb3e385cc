"""log E[sigmoid(u / tau)] and log E[sigmoid(-u / tau)] for Gaussian u, without sampling.

With the sigmoid link each class's MC-mean probability p_k = E[sigmoid(u_k / tau)] depends only
on the marginal u_k ~ N(m_k, s_k^2) (shared/spec/hetxl.md, "Sigmoid link without sampling"), so
the S -> infinity limit of the MC estimate is a one-dimensional integral per class. In standard
units z = m / tau, r = s / tau it is computed in log space by one of two exact rules:

  * Gauss-Hermite (n nodes x_i, weights w_i; numpy.polynomial.hermite.hermgauss):
      log p = logsumexp_i(log w_i - log(pi) / 2 + log_sigmoid(z + sqrt(2) r x_i)).
    The integrand is analytic in a strip of half-width pi / (sqrt(2) r) only, so this converges
    fast for small r (r <= 2: |error| <= 2e-7 in log p at n = 32, float64) and badly once the
    Gaussian is wide against the sigmoid's step (r = 10: errors of 1e-2 at n = 32). It also
    stays accurate far in the tail (|z| >= 4 r^2), where the sigmoid is an exponential over
    all of the Gaussian's mass.
  * the step split, for r > 2 (exact identity, our own derivation): with a = -|z| <= 0, the
    probability of the smaller side is
      q = Phi(a / r) + int_0^inf sigmoid(-t) [N(-t; a, r^2) - N(t; a, r^2)] dt,
    the step function's probability in closed form plus a correction that is smooth at scale
    r and decays like e^-t, taken by Gauss-Laguerre (numpy.polynomial.laguerre.laggauss). Every
    term is >= 0, so log q is a logsumexp; the larger side is log(1 - q) with q <= 1/2.

`use_hermite` picks Gauss-Hermite where r <= 2 or |z| >= 4 r^2 and the split elsewhere.
Measured against float64 adaptive integration (`benchmarks/head_speed.py --accuracy 16,24,32`,
BENCHMARKS.md), at the default 32 nodes the float32 error in log p and log(1 - p) is <= 2e-5
wherever both are above -100, i.e. float32 rounding; 24 nodes give 2e-3 and 16 nodes 3 there.
Only where both rules lose accuracy together, r around 5-15 with log p below -100 (p < 1e-43,
no float32 probability), can the relative error reach ~0.25 at 32 nodes.

Memory and cost: the nodes are a loop (lax.scan) of elementwise [B, K] operations with running
logsumexps, and a custom JVP computes d/dz and d/dr in the same loop (forward mode), so no
[B, K, nodes] tensor exists and the backward pass keeps four [B, K] arrays; about 10
transcendentals per node and element for the values, a few times that with the derivatives.
"""
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from numpy.polynomial.hermite import hermgauss
from numpy.polynomial.laguerre import laggauss

GH_MAX_RATIO = 2.0      # Gauss-Hermite where s / tau <= this ...
GH_TAIL_FACTOR = 4.0    # ... or where |m / tau| >= this * (s / tau)^2


def _nodes(num_nodes: int):
  """Nodes and log weights of both rules, float32 [n] each."""
  x, w = hermgauss(num_nodes)
  t, v = laggauss(num_nodes)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  # Laguerre: log v_i - log(1 + e^-t_i) is the node-only part of sigmoid(-t) = e^-t / (1 + e^-t).
  return ((f32(math.sqrt(2.0) * x), f32(np.log(w) - 0.5 * math.log(math.pi))),
          (f32(t), f32(np.log(v) - np.log1p(np.exp(-t)))))


def _log_sum_over_nodes(term_fn, nodes):
  """logsumexp over nodes of the tuple of [B, K] log-terms `term_fn(*node)`: a loop over nodes
  (lax.scan) with running logsumexps as carries, so no [B, K, nodes] array is ever made."""
  first = term_fn(*(a[0] for a in nodes))
  def body(acc, node):
    return tuple(jnp.logaddexp(a, b) for a, b in zip(acc, term_fn(*node))), None
  acc, _ = jax.lax.scan(body, first, tuple(a[1:] for a in nodes))
  return acc


def _log1m_exp(a: jax.Array) -> jax.Array:
  """log(1 - exp(a)) for a <= log(1/2) (no cancellation there)."""
  return jnp.log1p(-jnp.exp(a))


def use_hermite(z: jax.Array, r: jax.Array) -> jax.Array:
  """Where the Gauss-Hermite rule is the accurate one (see module docstring)."""
  return (r <= GH_MAX_RATIO) | (jnp.abs(z) >= GH_TAIL_FACTOR * r * r)


def _hermite(z, r, nodes):
  def terms(sx, log_w):
    arg = z + r * sx
    ls = jax.nn.log_sigmoid(arg)
    return log_w + ls, log_w + ls - arg      # log_sigmoid(-a) = log_sigmoid(a) - a
  return _log_sum_over_nodes(terms, nodes)


def _split(z, r, nodes):
  a = -jnp.abs(z)
  var = r * r
  def terms(t, log_v):
    # log N(-t; a, r^2) without its constant, + log(1 - N(t) / N(-t)) with N(t) / N(-t) =
    # exp(-2 t |a| / r^2), floored so a = 0 gives a finite (negligible) term.
    ratio = jnp.maximum(-2 * t * a / var, 1e-30)
    return (log_v - (t + a) ** 2 / (2 * var) + jnp.log(-jnp.expm1(-ratio)),)
  (acc,) = _log_sum_over_nodes(terms, nodes)
  log_corr = acc - jnp.log(r * math.sqrt(2 * math.pi))
  log_q = jnp.minimum(jnp.logaddexp(log_ndtr(a / r), log_corr), math.log(0.5))
  small, large = log_q, _log1m_exp(log_q)
  return jnp.where(z <= 0, small, large), jnp.where(z <= 0, large, small)


def _standard_marginals(z, r, hermite_nodes, laguerre_nodes):
  """(log p, log(1 - p)) for u ~ N(z, r^2), p = E[sigmoid(u)]: one [B, K]-sized loop over nodes."""
  hermite = use_hermite(z, r)
  gh = _hermite(z, r, hermite_nodes)
  # Safe stand-ins where the split is not used, so its unused branch stays finite.
  sp = _split(jnp.where(hermite, -1.0, z), jnp.where(hermite, 2 * GH_MAX_RATIO, r),
              laguerre_nodes)
  return tuple(jnp.where(hermite, g, s) for g, s in zip(gh, sp))


def sigmoid_log_marginals(mean: jax.Array, var: jax.Array, tau: jax.Array,
                          num_nodes: int = 32) -> Tuple[jax.Array, jax.Array]:
  """(log p, log(1 - p)) with p = E[sigmoid(u / tau)], u ~ N(mean, var), elementwise.

  Args:
    mean, var: float32 arrays of one shape (for the heads [B, K]); var >= 0.
    tau: positive scalar temperature (may be traced, e.g. a learnt temperature).
    num_nodes: quadrature nodes of each rule (>= 2).
  Returns:
    two float32 arrays shaped like `mean`; differentiable in mean, var and tau.
  Raises:
    ValueError: num_nodes < 2.
  """
  if num_nodes < 2:
    raise ValueError(f'quadrature needs num_nodes >= 2, got {num_nodes}')
  hermite_nodes, laguerre_nodes = _nodes(int(num_nodes))
  fn = lambda z, r: _standard_marginals(z, r, hermite_nodes, laguerre_nodes)

  # Forward-mode derivatives are computed with the values (same elementwise loop), so the
  # backward pass keeps four [B, K] coefficient arrays instead of per-node intermediates.
  @jax.custom_jvp
  def marginals(z, r):
    return fn(z, r)

  @marginals.defjvp
  def marginals_jvp(primals, tangents):
    z, r = primals
    dz, dr = tangents
    # Both unit tangents at once (vmap): the values are computed once, unbatched.
    basis = jnp.eye(2, dtype=z.dtype).reshape((2, 2) + (1,) * z.ndim) * jnp.ones_like(z)
    values, coef = jax.vmap(lambda e: jax.jvp(fn, (z, r), (e[0], e[1])), out_axes=(None, 0))(
        basis)
    return values, tuple(c[0] * dz + c[1] * dr for c in coef)

  tau = jnp.asarray(tau, jnp.float32)
  z = mean.astype(jnp.float32) / tau
  r = jnp.sqrt(jnp.maximum(var.astype(jnp.float32), 1e-30)) / tau
  return marginals(z, r)
