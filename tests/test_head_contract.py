"""The head contract (`heads.base.Head`) for every registered head: output shapes, the loss
against numpy, the declared rng streams / sown values / fixed variables against what the head
really does, the class dimension sharded over 'model' on a 4x2 mesh, one train step, and eval
probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from evaluation.evaluator import EVAL_SEED
from heads.base import LINKS, Head, probabilities
from heads.registry import head_class, head_names
from training.mesh import build_mesh
from training.model import step_rngs

B, D, K = 4, 5, 6          # every other size differs from K, so a dim of size K is a class dim
LABELS = np.array([0, 3, 5, 3])
MC = dict(num_factors=2, train_mc_samples=8, eval_mc_samples=8, mc_chunk_size=3)

# (registry name, kwargs): every registered head, plus the sigmoid-link variants.
CASES = [
    ('softmax', {}),
    ('softmax', dict(link='sigmoid', learn_temperature=True)),
    ('het', dict(MC, learn_temperature=True)),
    ('hetxl', dict(MC, parameter_efficient=True)),
    ('hetxl', dict(MC, link='sigmoid', mc_method='quadrature', quadrature_nodes=8)),
    ('soc', dict(dims=3)),
    ('llc_codebook', dict(bits=4)),
    ('llc_instance', dict(bits=4)),
    ('contrastive', dict(text_tower='locked', embed_dim=4, noise='hetxl', num_factors=2,
                         train_mc_samples=4, temperature='bounded')),
]


def test_cases_cover_the_registry():
  assert {name for name, _ in CASES} == set(head_names())


def _build(name, kwargs, tmp_path):
  cls = head_class(name)
  if name == 'llc_instance':
    path = tmp_path / 'codebook.npy'
    np.save(path, np.random.default_rng(0).normal(size=(K, kwargs['bits'])).astype(np.float32))
    kwargs = dict(kwargs, codebook=str(path))
  if name == 'contrastive':   # a caption table of precomputed text embeddings [K, T, E_text]
    kwargs = dict(kwargs, captions=np.random.default_rng(1).normal(size=(K, 2, 7)).astype(
        np.float32))
  return cls(num_classes=K, **kwargs)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def _link_loss(link, logits, labels, smoothing=0.0):
  y = np.eye(logits.shape[-1])[labels]
  if link == 'softmax':
    y = y * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(y * _log_softmax(logits)).sum(-1)
  return -(y * _log_sigmoid(logits) + (1 - y) * _log_sigmoid(-logits)).sum(-1)


def _gauss(x, means):
  sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
  return -0.5 * sq - 0.5 * x.shape[-1] * np.log(2 * np.pi)


def _numpy_oracle(name, head, v, x, out):
  """(expected logits or None, expected per-example loss or None), in numpy float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
  x = np.asarray(x, np.float64)
  logits = np.asarray(out.logits, np.float64)
  if name == 'softmax':
    expected = x @ p['loc_layer']['kernel'] + p['loc_layer']['bias']
    if head.learn_temperature:
      lo, hi = head.temperature_bounds
      expected = expected / (lo + (hi - lo) / (1 + np.exp(-p['temperature'][
          'pre_sigmoid_temperature'])))
    return expected, _link_loss(head.link, expected, LABELS)
  if name in ('het', 'hetxl'):   # the MC / quadrature loss is -log p(y) of the head's own p
    return None, _link_loss(head.link, logits, LABELS)
  if name == 'soc':
    z = x @ p['projection']['kernel'] + p['projection']['bias']
    means = p['class_means']
    expected = _gauss(z, means)
    class_term = _link_loss('softmax', _gauss(means, means), np.arange(K), 0.1).mean()
    return expected, (_link_loss('softmax', expected, LABELS, 0.1) + class_term) / 2
  if name == 'llc_codebook':
    expected = (x @ p['projection']['kernel']) @ np.where(p['codebook'] > 0, 1.0, -1.0).T
    return expected, _link_loss('softmax', expected, LABELS, 0.1)
  if name == 'llc_instance':
    o = x @ p['projection']['kernel']
    t = (np.asarray(v['batch_stats']['class_codes']) + 1) / 2
    bce = -(t[LABELS] * _log_sigmoid(o) + (1 - t[LABELS]) * _log_sigmoid(-o)).mean(-1)
    return o @ t.T, bce
  return None, None     # contrastive: tests/test_contrastive.py has its numpy oracles


@pytest.mark.parametrize('name,kwargs', CASES, ids=lambda c: c if isinstance(c, str) else
                         '-'.join(f'{k}={v}' for k, v in sorted(c.items())
                                  if k in ('link', 'mc_method')))
def test_head_contract(name, kwargs, tmp_path):
  head = _build(name, kwargs, tmp_path)
  assert isinstance(head, Head) and head.link in LINKS
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  labels = jnp.asarray(LABELS)
  extra = {'mask': jnp.array([1.0, 1.0, 1.0, 0.0])} if head.in_batch_loss else {}
  mask = extra.get('mask', jnp.ones((B,)))
  train_rngs = step_rngs(jax.random.key(3), 0, head)    # exactly the streams the trainer gives
  mesh = build_mesh(('data', 'model'), (4, 2))   # as the trainer: shardings, no mesh context

  x, labels = (jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (x, labels))

  # Class dimension on 'model': declared by the boxed params, and real once placed. init
  # keeps the parameters and the declared fixed variables; anything else it wrote must be
  # a declared sow.
  def init(k):
    v = head.init({'params': k, **train_rngs}, x, labels, train=True, **extra)
    for c in v:
      assert c == 'params' or c in head.fixed_variables or c in head.sows, c
    return {c: v[c] for c in ('params', *head.fixed_variables)}
  boxed = jax.eval_shape(init, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  class_axes = jax.tree.leaves(jax.tree.map(
      lambda s, a: [tuple(s)[i] for i, n in enumerate(a.shape) if n == K],
      specs, nn.meta.unbox(boxed), is_leaf=lambda s: isinstance(s, P)))
  assert class_axes == ['model'] * len(class_axes)
  assert class_axes or name == 'contrastive'   # its classes are constant captions
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda s: isinstance(s, P))
  variables = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(
      jax.random.key(0))
  for leaf in jax.tree.leaves(variables):
    for axis, size in enumerate(leaf.shape):
      if size == K:
        assert leaf.sharding.shard_shape(leaf.shape)[axis] == K // 2

  # Non-parameter variables: exactly the declared fixed variables.
  kept = {(c, path[-1].key) for c, tree in variables.items() if c != 'params'
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert kept == {(c, n) for c, names in head.fixed_variables.items() for n in names}
  fixed = {c: variables[c] for c in head.fixed_variables}

  # A training forward pass: shapes, the loss against numpy, and only declared sows.
  out, sown = jax.jit(lambda v: head.apply(v, x, labels, train=True, rngs=train_rngs,
                                           mutable=True, **extra))(variables)
  assert out.logits.shape == (B, K) and out.loss.shape == (B,)
  assert out.loss.dtype == jnp.float32 and np.all(np.isfinite(out.loss))
  for c, tree in sown.items():
    if c not in ('params', *head.fixed_variables):
      for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        assert path[-2].key in head.sows.get(c, ()), (c, jax.tree_util.keystr(path))
  want_logits, want_loss = _numpy_oracle(name, head, jax.device_get(variables), x, out)
  if want_logits is not None:
    np.testing.assert_allclose(out.logits, want_logits, rtol=2e-4, atol=2e-4)
  if want_loss is not None:
    np.testing.assert_allclose(out.loss, want_loss, rtol=2e-4, atol=2e-4)
  if head.in_batch_loss:
    assert out.loss[3] == 0.0     # padding is kept out of the in-batch loss

  # One train step (the trainer's masked mean loss, SGD): parameters change, loss finite.
  tx = optax.sgd(0.5)

  @jax.jit
  def train_step(params, rngs):
    def loss_fn(p):
      o = head.apply({'params': p, **fixed}, x, labels, train=True, rngs=rngs, **extra)
      return jnp.sum(o.loss * mask) / jnp.sum(mask)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params))
    return optax.apply_updates(params, updates), loss

  params, loss = train_step(variables['params'], train_rngs)
  np.testing.assert_allclose(loss, np.sum(out.loss * mask) / np.sum(mask), rtol=1e-5)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params,
                                         variables['params']))
  assert any(changed)
  _, loss = train_step(params, step_rngs(jax.random.key(3), 1, head))
  assert np.isfinite(loss)

  # Eval: the evaluator's rngs, repeatable, probabilities of the declared link.
  evaluate = jax.jit(lambda p: head.apply({'params': p, **fixed}, x, train=False,
                                          rngs=step_rngs(jax.random.key(EVAL_SEED), 0, head)))
  out = evaluate(params)
  assert out.loss is None and out.logits.shape == (B, K)
  np.testing.assert_array_equal(out.logits, evaluate(params).logits)
  probs = np.asarray(probabilities(head.link, out.logits))
  if head.link == 'softmax':
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert np.all((probs >= 0) & (probs <= 1))
  scores = head.apply({'params': params, **fixed}, x, out.logits, method=head.ood_scores)
  assert all(s.shape == (B,) and np.all(np.isfinite(s)) for s in scores.values())


class _Plain(nn.Module):       # not a heads.base.Head
  num_classes: int


class _NoLink(Head):           # a Head that does not state its link
  num_classes: int


@pytest.mark.parametrize('cls', [_Plain, _NoLink])
def test_registry_refuses_a_head_without_the_contract(cls, monkeypatch):
  from heads import registry
  monkeypatch.setitem(registry._HEADS, 'custom', f'{__name__}:{cls.__name__}')
  with pytest.raises(TypeError, match='must derive from heads.base.Head|must declare its link'):
    registry.build_head('custom', K)
