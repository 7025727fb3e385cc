"""Backbones: parameter counts against published models, shapes, BN and dropout behaviour."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from backbones.registry import build_backbone
from backbones.resnet import BasicBlock, BottleneckBlock


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract_init(module, shape):
  """Variable shapes of `module` on float32 images of `shape`, without compiling anything."""
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))


def _key(seed=0):
  # 'rbg' keys: threefry initialisers take ~10x longer to compile on CPU.
  return jax.random.key(seed, impl='rbg')


def _init(module, x):
  return jax.jit(lambda k, x: module.init(k, x, train=False))(_key(), x)


def _images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# torchvision resnetN total minus its fc (512 or 2048 inputs -> 1000 classes, with bias);
# timm vit_*_224 total minus its head (width -> 1000, with bias).
@pytest.mark.parametrize('name,published', [
    ('resnet18', 11_689_512 - (512 * 1000 + 1000)),       # 11,176,512
    ('resnet50', 25_557_032 - (2048 * 1000 + 1000)),      # 23,508,032
    ('vit_b16', 86_567_656 - (768 * 1000 + 1000)),        # 85,798,656
])
def test_param_count_matches_published(name, published):
  variables = _abstract_init(build_backbone(name), (1, 224, 224, 3))
  assert _count(variables['params']) == published


def test_resnet34_param_count_matches_torchvision():
  variables = _abstract_init(build_backbone('resnet34'), (1, 224, 224, 3))
  assert _count(variables['params']) == 21_797_672 - (512 * 1000 + 1000)


def test_resnet_batch_stats_are_not_params():
  variables = _abstract_init(build_backbone('resnet50'), (1, 224, 224, 3))
  # Every BN has scale + bias in params and mean + var in batch_stats, all of size C.
  num_bn_channels = sum(x.shape[-1] for x in jax.tree_util.tree_leaves(variables['batch_stats']))
  assert _count(variables['batch_stats']) == num_bn_channels
  bn_params = [v for path, v in jax.tree_util.tree_leaves_with_path(variables['params'])
               if 'bn' in jax.tree_util.keystr(path)]
  assert _count(bn_params) == num_bn_channels


def _vit_params(width, depth, mlp_dim, patch, image=224, channels=3, token=True):
  """Closed-form ViT parameter count, written independently of the module."""
  tokens = (image // patch) ** 2 + int(token)
  embed = patch * patch * channels * width + width + int(token) * width + tokens * width
  attention = 4 * (width * width + width)                 # q, k, v, out projections
  mlp = width * mlp_dim + mlp_dim + mlp_dim * width + width
  block = 2 * 2 * width + attention + mlp                 # two LayerNorms
  return embed + depth * block + 2 * width                # final LayerNorm


@pytest.mark.parametrize('name,dims,patch,pool', [
    ('vit_b16', (768, 12, 3072), 16, 'token'),
    ('vit_ti16', (192, 12, 768), 16, 'token'),
    ('vit_l32', (1024, 24, 4096), 32, 'token'),
    ('vit_s32', (384, 12, 1536), 32, 'gap'),
])
def test_vit_param_count_closed_form(name, dims, patch, pool):
  variables = _abstract_init(build_backbone(name, pool=pool), (1, 224, 224, 3))
  assert _count(variables['params']) == _vit_params(*dims, patch, token=pool == 'token')


def test_published_vit_counts_agree_with_closed_form():
  # timm: vit_tiny_patch16_224 5,717,416 and vit_large_patch32_224 306,535,400 with heads.
  assert _vit_params(192, 12, 768, 16) == 5_717_416 - (192 * 1000 + 1000)
  assert _vit_params(1024, 24, 4096, 32) == 306_535_400 - (1024 * 1000 + 1000)


@pytest.mark.parametrize('name,stem,size,first,last', [
    ('resnet50', 'imagenet', 224, (56, 56, 256), (7, 7, 2048)),
    ('resnet18', 'imagenet', 224, (56, 56, 64), (7, 7, 512)),
    ('resnet18', 'cifar', 32, (32, 32, 64), (4, 4, 512)),
])
def test_resnet_stage_shapes(name, stem, size, first, last):
  module = build_backbone(name, stem=stem)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = _abstract_init(module, x.shape)
  is_block = lambda m, _: (m.name or '').startswith('stage')
  _, state = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=False, mutable=['intermediates'],
                                capture_intermediates=is_block),
      variables, x)
  blocks = state['intermediates']
  assert blocks['stage1_block0']['__call__'][0].shape == (2,) + first
  last_block = max(k for k in blocks if k.startswith('stage4'))
  assert blocks[last_block]['__call__'][0].shape == (2,) + last


@pytest.mark.parametrize('name,stem,size,dim', [
    ('resnet18', 'imagenet', 32, 64),
    ('resnet50', 'imagenet', 32, 256),
    ('resnet50', 'cifar', 8, 256),
])
def test_resnet_tiny_output_shape(name, stem, size, dim):
  module = build_backbone(name, stem=stem, width=0.125)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False),
                       _abstract_init(module, x.shape), x)
  assert out.shape == (2, dim) and out.dtype == jnp.float32


@pytest.fixture(scope='module')
def tiny_resnet():
  """ResNet-18, CIFAR stem, 8 channels in the first stage, initialised on 8x8 images."""
  module = build_backbone('resnet18', stem='cifar', width=0.125)
  x = _images((4, 8, 8, 3))
  return module, _init(module, x), x


def test_resnet_tiny_forward(tiny_resnet):
  module, variables, x = tiny_resnet
  out = module.apply(variables, x, train=False)
  assert out.shape == (4, 64) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.all(out >= 0)  # pooled post-relu features
  assert np.std(out) > 0


def test_batchnorm_train_updates_stats_with_momentum(tiny_resnet):
  module, variables, x = tiny_resnet
  x = x * 3.0 + 1.0
  _, state = module.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                          capture_intermediates=lambda m, _: m.name == 'stem_conv')
  conv_out = np.asarray(state['intermediates']['stem_conv']['__call__'][0])
  stats = state['batch_stats']['stem_bn']
  # Oracle: running = 0.9 * running + 0.1 * batch statistic (init mean 0, var 1).
  np.testing.assert_allclose(stats['mean'], 0.1 * conv_out.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
  # Every BN layer moved.
  for old, new in zip(jax.tree_util.tree_leaves(variables['batch_stats']),
                      jax.tree_util.tree_leaves(state['batch_stats'])):
    assert not np.allclose(old, new)


def test_batchnorm_eval_uses_running_stats(tiny_resnet):
  module, variables, x = tiny_resnet
  out, state = module.apply(variables, x, train=False, mutable=['intermediates'],
                            capture_intermediates=lambda m, _: m.name in ('stem_conv', 'stem_bn'))
  np.testing.assert_array_equal(out, module.apply(variables, x, train=False))
  # Oracle at init (running mean 0, var 1, scale 1, bias 0): BN(x) = x / sqrt(1 + eps).
  captured = state['intermediates']
  np.testing.assert_allclose(captured['stem_bn']['__call__'][0],
                             captured['stem_conv']['__call__'][0] / np.sqrt(1 + 1e-5),
                             rtol=1e-6, atol=1e-7)
  # Eval features of an example do not depend on the rest of the batch ...
  np.testing.assert_allclose(module.apply(variables, x[:2], train=False), out[:2],
                             rtol=1e-5, atol=1e-6)
  # ... whereas train-mode (batch statistics) features do.
  train = lambda x: module.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  assert not np.allclose(train(x[:2]), train(x)[:2], atol=1e-4)


def test_resnet_bf16_compute_float32_params_and_output(tiny_resnet):
  _, variables, x = tiny_resnet
  module = build_backbone('resnet18', stem='cifar', width=0.125, dtype='bfloat16')
  abstract = _abstract_init(module, x.shape)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(abstract))
  out, state = module.apply(variables, x, train=False, mutable=['intermediates'],
                            capture_intermediates=lambda m, _: m.name in ('stem_conv', 'stem_bn'))
  assert state['intermediates']['stem_conv']['__call__'][0].dtype == jnp.bfloat16
  assert state['intermediates']['stem_bn']['__call__'][0].dtype == jnp.bfloat16
  assert out.dtype == jnp.float32 and out.shape == (4, 64)
  f32 = build_backbone('resnet18', stem='cifar', width=0.125).apply(variables, x, train=False)
  np.testing.assert_allclose(out, f32, rtol=0.1, atol=0.05)


@pytest.mark.parametrize('block,channels', [(BasicBlock, 8), (BottleneckBlock, 32)])
def test_residual_block_is_identity_at_init(block, channels):
  module = block(filters=8, norm=functools.partial(nn.BatchNorm, use_running_average=False))
  x = _images((2, 4, 4, channels))
  variables = module.init(_key(), x)
  assert 'proj_conv' not in variables['params']
  out, _ = module.apply(variables, x, mutable=['batch_stats'])
  # The zero-initialised last BN scale silences the residual branch: out = relu(x + 0).
  np.testing.assert_allclose(out, jax.nn.relu(x), atol=1e-6)


def test_projection_shortcut_and_v15_stride():
  module = build_backbone('resnet50')
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = _abstract_init(module, x.shape)
  params = variables['params']
  assert 'proj_conv' in params['stage1_block0']          # 64 -> 256 channels
  assert 'proj_conv' not in params['stage1_block1']
  assert 'proj_conv' in params['stage2_block0']          # stride 2
  _, state = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=False, mutable=['intermediates'],
                                capture_intermediates=lambda m, _: m.name in ('conv1', 'conv2')),
      variables, x)
  block = state['intermediates']['stage2_block0']
  # v1.5: the 1x1 conv1 keeps stage 1's 16x16 resolution, the 3x3 conv2 halves it.
  assert block['conv1']['__call__'][0].shape == (1, 16, 16, 128)
  assert block['conv2']['__call__'][0].shape == (1, 8, 8, 128)


def _tiny_vit(**kwargs):
  return build_backbone('vit_ti16', depth=2, **kwargs)


@pytest.fixture(scope='module')
def tiny_vit():
  """ViT-Ti/16 with 2 blocks and a class token, initialised on 32x32 images (2x2 patches)."""
  module = _tiny_vit()
  x = _images((2, 32, 32, 3))
  return module, _init(module, x), x


@pytest.mark.parametrize('pool,tokens', [('token', 5), ('gap', 4)])
def test_vit_small_image_shapes(pool, tokens):
  module = _tiny_vit(pool=pool)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = _abstract_init(module, x.shape)
  assert variables['params']['pos_embedding'].shape == (1, tokens, 192)
  assert ('cls' in variables['params']) == (pool == 'token')
  out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
  assert out.shape == (2, 192) and out.dtype == jnp.float32


def test_vit_gap_pool_averages_final_tokens():
  module = build_backbone('vit_ti16', depth=1, pool='gap')
  x = _images((2, 32, 32, 3))
  out, state = module.apply(_init(module, x), x, train=False, mutable=['intermediates'],
                            capture_intermediates=lambda m, _: m.name == 'ln_final')
  tokens = state['intermediates']['ln_final']['__call__'][0]
  assert tokens.shape == (2, 4, 192)
  np.testing.assert_allclose(out, tokens.mean(axis=1), rtol=1e-6, atol=1e-6)


def test_vit_token_pool_reads_normalised_class_token(tiny_vit):
  module, variables, x = tiny_vit
  out, state = module.apply(variables, x, train=False, mutable=['intermediates'],
                            capture_intermediates=lambda m, _: m.name == 'ln_final')
  assert out.shape == (2, 192) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, state['intermediates']['ln_final']['__call__'][0][:, 0])
  # The final LN (scale 1, bias 0 at init) normalises the class token: mean 0, variance 1.
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(out.var(-1), 1.0, rtol=1e-3)
  # Position embeddings make the features depend on patch order.
  swapped = np.concatenate([x[:, :, 16:], x[:, :, :16]], axis=2)
  assert not np.allclose(module.apply(variables, swapped, train=False), out, atol=1e-4)
  # bf16 compute on the same float32 params stays close and returns float32.
  bf16 = _tiny_vit(dtype=jnp.bfloat16).apply(variables, x, train=False)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, out, atol=0.1)


def test_vit_dropout_uses_dropout_rng_only_when_training(tiny_vit):
  _, variables, x = tiny_vit
  module = _tiny_vit(dropout=0.5)
  apply = jax.jit(lambda k: module.apply(variables, x, train=True, rngs={'dropout': k}))
  eval_out = module.apply(variables, x, train=False)
  a, b = apply(_key(1)), apply(_key(2))
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)
  np.testing.assert_array_equal(a, apply(_key(1)))
  with pytest.raises(Exception, match='dropout'):
    module.apply(variables, x, train=True)
  # Rate 0 needs no rng even in train mode, and matches eval.
  np.testing.assert_allclose(_tiny_vit().apply(variables, x, train=True), eval_out,
                             rtol=1e-5, atol=1e-5)


def test_convnet_forward_on_digits_shape():
  module = build_backbone('convnet')
  x = _images((3, 8, 8, 1))
  variables = _init(module, x)
  out = module.apply(variables, x, train=False)
  assert out.shape == (3, 128) and out.dtype == jnp.float32
  assert np.all(out >= 0) and np.std(out) > 0
  np.testing.assert_array_equal(module.apply(variables, x, train=True), out)


@pytest.mark.parametrize('shape,features', [((2, 32, 32, 3), 128), ((2, 12, 12, 1), 16)])
def test_convnet_other_sizes(shape, features):
  module = build_backbone('convnet', features=features)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  out = jax.eval_shape(lambda v, x: module.apply(v, x, train=True),
                       _abstract_init(module, shape), x)
  assert out.shape == (2, features) and out.dtype == jnp.float32


@pytest.mark.parametrize('name,kwargs,size,dim', [
    ('convnet', {}, 8, 128),
    ('resnet18', {'width': 0.125}, 32, 64),
    ('resnet50', {'stem': 'cifar', 'width': 0.125}, 8, 256),
    ('vit_ti16', {'depth': 1}, 32, 192),
    ('vit_s32', {'depth': 1, 'pool': 'gap'}, 64, 384),
])
def test_bf16_compute_keeps_float32_params_and_features(name, kwargs, size, dim):
  module = build_backbone(name, dtype='bfloat16', **kwargs)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = _abstract_init(module, x.shape)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
  assert out.shape == (2, dim) and out.dtype == jnp.float32


def test_registry_names_and_kwargs():
  vit_names = {f'vit_{v}{p}' for v in ('ti', 's', 'b', 'l') for p in (16, 32)}
  for name in vit_names | {'resnet18', 'resnet34', 'resnet50', 'convnet'}:
    build_backbone(name)
  vit = build_backbone('vit_l32', dropout=0.1, dtype='bfloat16')
  dims = lambda m: (m.width, m.depth, m.num_heads, m.mlp_dim, m.patch_size)
  assert dims(vit) == (1024, 24, 16, 4096, 32)
  assert vit.dropout == 0.1 and vit.dtype == jnp.bfloat16
  assert dims(build_backbone('vit_s16')) == (384, 12, 6, 1536, 16)
  resnet = build_backbone('resnet50', stem='cifar', width=0.5)
  assert (resnet.depth, resnet.stem, resnet.width) == (50, 'cifar', 0.5)
  with pytest.raises(ValueError, match=r"unknown backbone 'resnet101'.*'vit_b16'"):
    build_backbone('resnet101')


def test_bad_options_raise():
  with pytest.raises(ValueError, match='stem'):
    _abstract_init(build_backbone('resnet18', stem='tiny'), (1, 32, 32, 3))
  with pytest.raises(ValueError, match='pool'):
    _abstract_init(build_backbone('vit_ti16', pool='max'), (1, 32, 32, 3))


def test_vit_scan_equals_unrolled_blocks_with_the_same_weights(tiny_vit):
  """`scan=True` stacks the per-block weights under `blocks`; with the unrolled model's weights
  stacked in block order it computes the same features, and its gradients are the stacked ones."""
  module, variables, x = tiny_vit
  params = dict(variables['params'])
  unrolled = [params.pop(f'block{i}') for i in range(2)]
  scanned = {'params': {**params, 'blocks': jax.tree.map(lambda *b: jnp.stack(b), *unrolled)}}
  scan_module = _tiny_vit(scan=True)
  assert (jax.tree.structure(_abstract_init(scan_module, x.shape))
          == jax.tree.structure(scanned))
  np.testing.assert_allclose(scan_module.apply(scanned, x, train=False),
                             module.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
  r = jax.random.normal(_key(3), (2, 192))  # a random readout (LN makes sum(out**2) constant)
  loss = lambda m, v: jnp.sum(m.apply(v, x, train=False) * r)
  g_unrolled = jax.jit(jax.grad(functools.partial(loss, module)))(variables)['params']
  g_scanned = jax.jit(jax.grad(functools.partial(loss, scan_module)))(scanned)['params']['blocks']
  for i in range(2):
    jax.tree.map(lambda s, u: np.testing.assert_allclose(s[i], u, rtol=1e-4, atol=1e-5),
                 g_scanned, g_unrolled[f'block{i}'])


@pytest.mark.parametrize('scan', [True, False])
def test_vit_remat_gives_the_same_gradients(scan):
  """`remat=True` recomputes each block in the backward pass: the same function and gradients."""
  from backbones.registry import build_backbone
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain = build_backbone('vit_ti16', scan=scan, depth=2)
  remat = build_backbone('vit_ti16', scan=scan, depth=2, remat=True)
  variables = plain.init(jax.random.key(0), x, train=False)
  grad = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x, train=True) ** 2)))(
      variables)
  expected, got = jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))
  scale = max(float(np.abs(a).max()) for a in expected)
  for a, b in zip(expected, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)
