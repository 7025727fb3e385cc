"""Class padding, sharding rules and FSDP (issue 26): padded classes are invisible, shardings are
what the compiler actually uses, and checkpoints move between paddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from heads.base import PADDED_LOGIT
from heads.registry import build_head
from tests.helpers import override
from training import sharding
from training.mesh import build_mesh

K, D, B = 5, 6, 4

HEADS = {
    'det_softmax': ('softmax', dict(label_smoothing=0.1)),
    'det_sigmoid': ('softmax', dict(link='sigmoid', label_smoothing=0.1, bias_init=-2.0)),
    'hetxl_softmax_mc': ('hetxl', dict(num_factors=2, train_mc_samples=7, eval_mc_samples=7,
                                       mc_chunk_size=3, label_smoothing=0.1)),
    'hetxl_sigmoid_mc': ('hetxl', dict(num_factors=2, link='sigmoid', train_mc_samples=7,
                                       eval_mc_samples=7, parameter_efficient=True,
                                       label_smoothing=0.1)),
    'hetxl_quadrature': ('hetxl', dict(num_factors=2, link='sigmoid', mc_method='quadrature',
                                       head_bias_init=-3.0, learn_temperature=True)),
    'het_quadrature': ('het', dict(num_factors=2, link='sigmoid', mc_method='quadrature')),
}


def _pad_params(params, padded_size, key):
  """The unpadded head's params with every class dimension (size K or K * R) padded to the
  padded head's, with large random values in the padding (which must not matter)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for leaf, k, target in zip(leaves, keys, jax.tree.leaves(padded_size)):
    if not leaf.shape:                      # a scalar (the temperature): nothing to pad
      out.append(leaf)
      continue
    pad = [(0, t - s) for s, t in zip(leaf.shape, target.shape)]
    noise = 50.0 * jax.random.normal(k, target.shape)
    mask = np.zeros(target.shape, bool)
    mask[tuple(slice(0, s) for s in leaf.shape)] = True
    out.append(jnp.where(mask, jnp.pad(leaf, pad), noise))
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize('name', sorted(HEADS))
def test_padded_head_equals_the_unpadded_one(name):
  kind, kwargs = HEADS[name]
  plain = build_head(kind, K, **kwargs)
  padded = build_head(kind, K, **kwargs).clone(class_multiple=8)
  assert padded.padded_classes == 8
  x = jax.random.normal(jax.random.key(0), (B, D))
  labels = jnp.array([0, 4, 2, 4])
  rngs = {'diag_noise_samples': jax.random.key(1), 'standard_norm_noise_samples': jax.random.key(2)}
  params = plain.init({'params': jax.random.key(3), **rngs}, x, labels, train=True)['params']
  # The padded head initialises its real classes exactly as the unpadded one ...
  init_padded = padded.init({'params': jax.random.key(3), **rngs}, x, labels, train=True)['params']
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init_padded)):
    sl = tuple(slice(0, s) for s in a.shape)
    np.testing.assert_array_equal(np.asarray(b)[sl], a)
  # ... and whatever the padding holds, its outputs, losses and real gradients are the same.
  padded_params = _pad_params(params, init_padded, jax.random.key(4))

  def run(head, p):
    def loss_fn(p):
      out = head.apply({'params': p}, x, labels, train=True, rngs=rngs)
      return out.loss.sum(), out
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    return loss, out, grads

  loss, out, grads = jax.jit(lambda p: run(plain, p))(params)
  loss_p, out_p, grads_p = jax.jit(lambda p: run(padded, p))(padded_params)
  np.testing.assert_allclose(loss_p, loss, rtol=2e-5)
  np.testing.assert_allclose(out_p.logits[:, :K], out.logits, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(out_p.logits[:, K:], PADDED_LOGIT)
  for g, gp in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_p)):
    sl = tuple(slice(0, s) for s in g.shape)
    np.testing.assert_allclose(np.asarray(gp)[sl], g, rtol=2e-4, atol=1e-6)
    rest = np.asarray(gp).copy()
    rest[sl] = 0.0
    np.testing.assert_array_equal(rest, 0.0)   # no gradient ever reaches a padded class
  # eval: a padded class has probability 0 and never wins top-1
  logits = jax.jit(lambda p: padded.apply({'params': p}, x, train=False).logits)(padded_params)
  link = padded.link
  probs = np.asarray(jax.nn.softmax(logits) if link == 'softmax' else jax.nn.sigmoid(logits))
  np.testing.assert_array_equal(probs[:, K:], 0.0)
  assert (np.argmax(probs, -1) < K).all()


def test_padded_softmax_matches_a_numpy_oracle():
  """DET softmax with smoothing a: loss = -sum_k ((1 - a) y_k + a / K) log softmax(z)_k over the
  K real classes only, whatever the padded kernel columns hold."""
  a = 0.2
  head = build_head('softmax', K, label_smoothing=a).clone(class_multiple=4)
  x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
  labels = np.array([1, 0, 4, 3], np.int32)
  params = nn.meta.unbox(head.init(jax.random.key(0), x)['params'])
  kernel = np.asarray(params['loc_layer']['kernel']).copy()
  kernel[:, K:] = 1e3                       # would win every argmax if it were not masked
  params = {'loc_layer': {'kernel': kernel, 'bias': params['loc_layer']['bias']}}
  out = head.apply({'params': params}, x, labels)
  z = x @ kernel[:, :K]
  log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  target = (1 - a) * np.eye(K)[labels] + a / K
  np.testing.assert_allclose(out.loss, -(target * log_p).sum(-1), rtol=1e-5)
  assert (np.argmax(out.logits, -1) == np.argmax(z, -1)).all()


def test_sharding_rules_fsdp_replicate_shard_dim():
  mesh = build_mesh(('data', 'model'), (2, 4))
  big = jax.ShapeDtypeStruct((512, 1024), jnp.float32)     # 2 MiB
  small = jax.ShapeDtypeStruct((3, 5), jnp.float32)
  head = jax.ShapeDtypeStruct((64, 1024), jnp.float32)
  params = {'backbone': {'big': big, 'small': small}, 'head': {'kernel': head}}
  declared = {'backbone': {'big': P(), 'small': P()}, 'head': {'kernel': P(None, 'model')}}
  rules = (('backbone/.*', 'fsdp(min_size_mb=1)'), ('.*', 'fsdp(axes="data", min_size_mb=0)'))
  specs = sharding.param_specs(declared, params, rules, mesh)
  assert specs['backbone']['big'] == P(None, ('data', 'model'))   # largest dim, all 8 devices
  assert specs['backbone']['small'] == P(None, None)              # under the threshold
  assert specs['head']['kernel'] == P('data', 'model')            # classes stay on 'model'
  specs = sharding.param_specs(declared, params, (('.*', 'replicate'),), mesh)
  assert specs['backbone']['big'] == P(None, None) and specs['head']['kernel'] == P(None, 'model')
  specs = sharding.param_specs(declared, params, (('.*big', 'shard_dim(dim=0, axes=("data",))'),),
                               mesh)
  assert specs['backbone']['big'] == P('data', None)
  with pytest.raises(sharding.ShardingRuleError, match='backbone/small.*cannot split'):
    sharding.param_specs(declared, params, (('.*small', 'shard_dim(dim=0)'),), mesh)
  for bad, match in [('fsdp(axis=1)', 'takes'), ('zero3', 'unknown sharding tactic'),
                     ('fsdp(min_size_mb=x)', 'literals'), ('fsdp(', 'does not parse')]:
    with pytest.raises(sharding.ShardingRuleError, match=match):
      sharding.compile_rules((('.*', bad),))


def _odd_k_config(k=1001, mesh=(2, 4), head=None, **extra):
  from configs import base, schema
  c = schema.base_config()
  c.dataset.name = 'synthetic'
  c.dataset.num_classes = k
  c.dataset.image_size = 8
  c.dataset.channels = 1
  c.dataset.num_examples = 64
  c.input.batch_size = 16
  c.input.eval_batch_size = 16
  c.model.backbone = 'convnet'
  base.hetxl_head(c, num_factors=2, link='sigmoid', **(head or {'mc_method': 'quadrature'}))
  c.mesh.shape = mesh
  c.train.num_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.sharding.rules = (('.*', 'fsdp(min_size_mb=0.01)'),)
  return override(c, extra)


def test_compiled_train_step_shards_an_odd_k_head_and_fsdp():
  """The shardings the compiled step really uses (jax can silently replicate what a constraint
  cannot divide, jax#26946): an odd K's head kernel split over 'model', FSDP'd backbone kernels
  and their Adam moments over the batch axes, the batch over all 8 devices."""
  from training.experiment import Experiment
  from training.train_step import make_train_step
  exp = Experiment.build(_odd_k_config(), with_data=False)
  assert exp.model.head.padded_classes == 1024          # 1001 -> a multiple of 128 x 4
  compiled = make_train_step(exp).lower(exp.abstract_restore_target(),
                                        exp.abstract_batch()).compile()
  state_in, batch_in = compiled.input_shardings[0]
  kernel = state_in.params['head']['loc_layer']['kernel']
  assert kernel.spec == P('data', 'model')
  assert kernel.shard_shape((exp.abstract_state.params['head']['loc_layer']['kernel'].shape)) \
      == (exp.abstract_state.params['head']['loc_layer']['kernel'].shape[0] // 2, 256)
  fc = state_in.params['backbone']['fc']['kernel']
  assert set(jax.tree.leaves(tuple(fc.spec))) == {'data', 'model'}
  mu = state_in.opt_state[0].mu if hasattr(state_in.opt_state[0], 'mu') else None
  moments = [s for p, s in jax.tree_util.tree_flatten_with_path(state_in.opt_state)[0]
             if 'fc' in jax.tree_util.keystr(p) and 'kernel' in jax.tree_util.keystr(p)]
  assert moments and all(m.spec == fc.spec for m in moments), (mu, moments)
  assert batch_in['image'].spec == P(('data', 'model'))


def _losses(workdir):
  import json
  import os
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def test_a_million_odd_classes_on_a_data_by_model_mesh_with_fsdp(tmp_path):
  """Point 5 of issue 26: HET-XL (sigmoid, MC with 2 samples: CPU-sized) with K = 1,000,003
  trains and evaluates on a (2, 4) data x model mesh with FSDP, its head padded to 1,000,448
  (a multiple of 128 x 4) and split over 'model'; losses and eval equal the (8, 1)
  data-parallel run's (no padding there), and every padded class has probability 0."""
  from evaluation.from_checkpoint import restore_checkpoint
  from launch.train import train_and_evaluate
  k = 1_000_003
  extra = {'model.backbone_kwargs.features': 16, 'input.batch_size': 8,
           'input.eval_batch_size': 8, 'dataset.num_examples': 8,
           'sharding.rules': (('.*', 'fsdp(min_size_mb=1)'),), 'train.async_checkpointing': False}
  mc = dict(train_mc_samples=2, eval_mc_samples=2, mc_chunk_size=2)
  results, configs = {}, {}
  for mesh in ((8, 1), (2, 4)):
    configs[mesh] = _odd_k_config(k, mesh, head=mc, **extra)
    results[mesh] = train_and_evaluate(configs[mesh], str(tmp_path / f'{mesh[0]}x{mesh[1]}'))
  a, b = (_losses(str(tmp_path / name)) for name in ('8x1', '2x4'))
  assert sorted(a) == [1, 2]
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step
  assert results[(2, 4)]['nll'] == pytest.approx(results[(8, 1)]['nll'], rel=1e-5)
  assert results[(2, 4)]['accuracy'] == results[(8, 1)]['accuracy']
  exp, variables, _ = restore_checkpoint(configs[(2, 4)], str(tmp_path / '2x4'))
  assert exp.model.head.padded_classes == 1_000_448
  kernel = variables['params']['head']['loc_layer']['kernel']
  assert kernel.sharding.spec == P('data', 'model') and kernel.shape == (16, 1_000_448)
  images = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 1), dtype=np.uint8)
  probs = jax.jit(lambda v, x: jax.nn.sigmoid(exp.model.apply(v, x, train=False).logits))(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}, images)
  assert probs.shape == (8, 1_000_448)
  assert float(jnp.max(probs[:, k:])) == 0.0 and float(jnp.min(probs[:, :k])) > 0.0


def test_resume_onto_another_model_axis_and_from_an_unpadded_checkpoint(tmp_path):
  """A checkpoint written on (8, 1) (no padding: the layout of every checkpoint from before
  padding existed) resumes on (2, 4) (K = 10 padded to 512), optimizer state included, and
  continues exactly as the straight (8, 1) run; the (2, 4) one evaluates back on (8, 1)."""
  from evaluation.from_checkpoint import evaluate_checkpoint
  from launch.train import train_and_evaluate
  from tests.helpers import load_config

  def config(steps, mesh):
    c = load_config('quickstart.py', 'runlocal')
    return override(c, {'train.num_steps': steps, 'train.checkpoint_every': 2,
                        'train.log_every': 1, 'train.async_checkpointing': False,
                        'mesh.shape': mesh})
  straight, moved = str(tmp_path / 'straight'), str(tmp_path / 'moved')
  expected = train_and_evaluate(config(4, (8, 1)), straight)
  train_and_evaluate(config(2, (8, 1)), moved)
  resumed = train_and_evaluate(config(4, (2, 4)), moved)
  a, b = _losses(straight), _losses(moved)
  assert sorted(b) == [1, 2, 3, 4]
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step
  assert resumed['nll'] == pytest.approx(expected['nll'], rel=1e-5)
  back = evaluate_checkpoint(config(4, (8, 1)), moved)
  assert back['nll'] == pytest.approx(resumed['nll'], rel=1e-6)
