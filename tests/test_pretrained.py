"""Public big_vision checkpoints: files written here in big_vision's format (names, shapes) load
into the ViT / BiT backbones, and the forward pass equals a numpy implementation of big_vision's
models run on the same file; a file that does not fit fails with every difference listed."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from flax import traverse_util

from backbones import pretrained
from backbones.bit import BiT
from backbones.registry import build_backbone
from backbones.vit import ViT
from heads.softmax import SoftmaxHead
from training.mesh import build_mesh
from training.model import Classifier
from training.state import create_state, state_shardings
from training.warm_start import warm_start

W, DEPTH, HEADS, MLP, P = 16, 2, 2, 24, 4


# ----- numpy references of big_vision's models, reading the file's names directly.
def _ln(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _np_vit(f, images, *, pool='tok', old=False):
  """big_vision vit.py (`old`: the original ViT layout, posemb added after the class token;
  pre-Linen module numbering)."""
  ln0, att, ln1, mlp = (('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
                         'MlpBlock_3') if old else
                        ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                         'MlpBlock_0'))
  g = lambda name: {k.rsplit('/', 1)[1]: v for k, v in f.items()
                    if k.rsplit('/', 1)[0] == name}
  b, h, w, c = images.shape
  patches = images.reshape(b, h // P, P, w // P, P, c).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(b, (h // P) * (w // P), P * P * c) @ f['embedding/kernel'].reshape(-1, W)
  x = x + f['embedding/bias']
  if old:
    x = np.concatenate([np.broadcast_to(f['cls'], (b, 1, W)), x], 1)
    x = x + f['Transformer/posembed_input/pos_embedding']
  else:
    x = x + f['pos_embedding']
    if pool == 'tok':
      x = np.concatenate([np.broadcast_to(f['cls'], (b, 1, W)), x], 1)
  for i in range(DEPTH):
    blk = f'Transformer/encoderblock_{i}'
    y = _ln(x, g(f'{blk}/{ln0}'))
    q, k, v = (np.einsum('bld,dhk->blhk', y, f[f'{blk}/{att}/{n}/kernel']) +
               f[f'{blk}/{att}/{n}/bias'] for n in ('query', 'key', 'value'))
    a = scipy.special.softmax(np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1]), -1)
    o = np.einsum('bhqs,bshk->bqhk', a, v)
    x = x + np.einsum('bqhk,hkd->bqd', o, f[f'{blk}/{att}/out/kernel']) + f[f'{blk}/{att}/out/bias']
    y = _ln(x, g(f'{blk}/{ln1}'))
    y = y @ f[f'{blk}/{mlp}/Dense_0/kernel'] + f[f'{blk}/{mlp}/Dense_0/bias']
    y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    x = x + y @ f[f'{blk}/{mlp}/Dense_1/kernel'] + f[f'{blk}/{mlp}/Dense_1/bias']
  x = _ln(x, g('Transformer/encoder_norm'))
  return x[:, 0] if pool == 'tok' else x.mean(1)


def _vit_file(rng, grid, *, old=False, extra=True):
  """A random ViT checkpoint with big_vision's names (`old`: the original ViT release's)."""
  ln0, att, ln1, mlp = (('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
                         'MlpBlock_3') if old else
                        ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                         'MlpBlock_0'))
  r = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3
  f = {'embedding/kernel': r(P, P, 3, W), 'embedding/bias': r(W), 'cls': r(1, 1, W),
       'Transformer/encoder_norm/scale': 1 + r(W), 'Transformer/encoder_norm/bias': r(W)}
  if old:
    f['Transformer/posembed_input/pos_embedding'] = r(1, 1 + grid * grid, W)
  else:
    f['pos_embedding'] = r(1, grid * grid, W)
  for i in range(DEPTH):
    blk = f'Transformer/encoderblock_{i}'
    for ln in (ln0, ln1):
      f[f'{blk}/{ln}/scale'], f[f'{blk}/{ln}/bias'] = 1 + r(W), r(W)
    for n in ('query', 'key', 'value'):
      f[f'{blk}/{att}/{n}/kernel'], f[f'{blk}/{att}/{n}/bias'] = r(W, HEADS, W // HEADS), r(
          HEADS, W // HEADS)
    f[f'{blk}/{att}/out/kernel'], f[f'{blk}/{att}/out/bias'] = r(HEADS, W // HEADS, W), r(W)
    f[f'{blk}/{mlp}/Dense_0/kernel'], f[f'{blk}/{mlp}/Dense_0/bias'] = r(W, MLP), r(MLP)
    f[f'{blk}/{mlp}/Dense_1/kernel'], f[f'{blk}/{mlp}/Dense_1/bias'] = r(MLP, W), r(W)
  if extra:   # what a published file also holds: never loaded
    f['head/kernel'], f['head/bias'], f['pre_logits/kernel'] = r(W, 7), r(7), r(W, W)
  return f


# One compiled forward per backbone configuration, shared by the tests.
_apply = jax.jit(lambda p, x, m: m.apply({'params': p}, x, train=False), static_argnums=2)


def _vit(pool='token'):
  return ViT(width=W, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, patch_size=P, pool=pool)


def _load(tmp_path, f, module, image):
  path = str(tmp_path / 'ckpt.npz')
  np.savez(path, **f)
  target = traverse_util.flatten_dict(jax.eval_shape(
      lambda: module.init(jax.random.key(0), image, train=False))['params'], sep='/')
  loaded, unused = pretrained.load_backbone(path, module, target)
  return traverse_util.unflatten_dict(loaded, sep='/'), unused


@pytest.mark.parametrize('pool, old', [('token', False), ('gap', False), ('token', True)])
def test_vit_forward_equals_numpy_big_vision(tmp_path, pool, old):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  f = _vit_file(rng, 2, old=old)
  if pool == 'gap':
    del f['cls']
  module = _vit(pool)
  params, unused = _load(tmp_path, f, module, images)
  got = _apply(params, images, module)
  want = _np_vit(f, images.astype(np.float64), pool='tok' if pool == 'token' else 'gap', old=old)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert unused == ['head/bias', 'head/kernel', 'pre_logits/kernel']


def test_vit_posemb_resampled_bilinearly(tmp_path):
  """A 2x2 grid of position embeddings that is affine in the patch coordinates becomes the same
  affine function on the model's 4x4 grid (corners aligned); the class token's row is zero."""
  rng = np.random.default_rng(1)
  f = _vit_file(rng, 2)
  a, bi, bj = rng.normal(size=(3, W))
  coords = lambda g: np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing='ij'), -1) / (g - 1)
  affine = lambda g: (a + coords(g)[..., :1] * bi + coords(g)[..., 1:] * bj).reshape(1, g * g, W)
  f['pos_embedding'] = affine(2).astype(np.float32)
  params, _ = _load(tmp_path, f, _vit(), np.zeros((1, 16, 16, 3), np.float32))
  pos = params['pos_embedding']
  assert pos.shape == (1, 17, W)
  np.testing.assert_allclose(pos[:, 0], 0.0)
  np.testing.assert_allclose(pos[:, 1:], affine(4), rtol=1e-5, atol=1e-5)


def _np_conv(x, k, stride, pad):
  kh, kw = k.shape[:2]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, k.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + stride * oh:stride, j:j + stride * ow:stride] @ k[i, j]
  return out


def _np_bit(f, images, blocks):
  """big_vision bit_paper.py (ResNet-v2, weight-standardised convs, GroupNorm 32)."""
  def std_conv(x, name, stride=1, pad=0):
    k = f[f'{name}/kernel']
    k = (k - k.mean((0, 1, 2))) / np.sqrt(k.var((0, 1, 2)) + 1e-10)
    return _np_conv(x, k, stride, pad)

  def gn(x, name):
    b, h, w, c = x.shape
    y = x.reshape(b, h, w, 32, c // 32)
    y = (y - y.mean((1, 2, 4), keepdims=True)) / np.sqrt(y.var((1, 2, 4), keepdims=True) + 1e-5)
    return y.reshape(x.shape) * f[f'{name}/scale'].reshape(-1) + f[f'{name}/bias'].reshape(-1)

  relu = lambda x: np.maximum(x, 0)
  x = std_conv(images, 'root_block/conv_root', 2, 3)
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  oh = (x.shape[1] - 3) // 2 + 1
  x = np.max([x[:, i:i + 2 * oh:2, j:j + 2 * oh:2] for i in range(3) for j in range(3)], 0)
  for s, units in enumerate(blocks, 1):
    for u in range(1, units + 1):
      n = f'block{s}/unit{u:02d}'
      stride = 2 if s > 1 and u == 1 else 1
      y = relu(gn(x, f'{n}/gn1'))
      res = std_conv(y, f'{n}/conv_proj', stride) if f'{n}/conv_proj/kernel' in f else x
      y = relu(gn(std_conv(y, f'{n}/conv1'), f'{n}/gn2'))
      y = relu(gn(std_conv(y, f'{n}/conv2', stride, 1), f'{n}/gn3'))
      x = std_conv(y, f'{n}/conv3') + res
  return relu(gn(x, 'norm-pre-head')).mean((1, 2))


_BIT_TF = {'conv1': 'a/standardized_conv2d', 'conv2': 'b/standardized_conv2d',
           'conv3': 'c/standardized_conv2d', 'conv_proj': 'a/proj/standardized_conv2d',
           'gn1': 'a/group_norm', 'gn2': 'b/group_norm', 'gn3': 'c/group_norm'}


def _tf_name(name):
  """big_vision's bit_paper name -> the BiT release's TensorFlow name."""
  parts = name.split('/')
  leaf = {'scale': 'gamma', 'bias': 'beta'}.get(parts[-1], parts[-1])
  if parts[0] == 'root_block':
    return 'resnet/root_block/standardized_conv2d/kernel'
  if parts[0] == 'norm-pre-head':
    return f'resnet/group_norm/{leaf}'
  return f'resnet/{parts[0]}/{parts[1]}/{_BIT_TF[parts[2]]}/{leaf}'


@pytest.mark.parametrize('tf_names', [False, True])
def test_bit_forward_equals_numpy_big_vision(tmp_path, tf_names):
  blocks = (1, 2, 1, 1)
  module = BiT(depth=blocks, width=0.5)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))['params']
  f = {k: (rng.normal(size=v.shape) * (0.3 if 'gn' in k or 'norm' in k else 1) +
           (1 if k.endswith('scale') else 0)).astype(np.float32)
       for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}
  want = _np_bit({k: v.astype(np.float64) for k, v in f.items()}, images.astype(np.float64),
                 blocks)
  if tf_names:   # GroupNorm parameters stored as [C] there
    f = {_tf_name(k): (v.reshape(-1) if v.ndim == 4 and v.shape[:3] == (1, 1, 1) else v)
         for k, v in f.items()}
  f['resnet/head/conv2d/kernel' if tf_names else 'head/kernel'] = np.zeros((1024, 5), np.float32)
  params, unused = _load(tmp_path, f, module, images)
  got = _apply(params, images, module)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
  assert unused == ['resnet/head/conv2d/kernel' if tf_names else 'head/kernel']


def test_mismatch_lists_every_difference(tmp_path):
  rng = np.random.default_rng(3)
  f = _vit_file(rng, 2)
  del f['Transformer/encoderblock_1/LayerNorm_1/scale']
  f['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'] = np.zeros((W, MLP + 1), np.float32)
  f['Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias'] = np.zeros(MLP + 1, np.float32)
  with pytest.raises(pretrained.CheckpointMismatchError) as e:
    _load(tmp_path, f, _vit(), np.zeros((1, 8, 8, 3), np.float32))
  msg = str(e.value)
  assert '1 missing from the file: Transformer/encoderblock_1/LayerNorm_1/scale (for block1/ln2/scale)' in msg
  assert '2 of another shape' in msg
  assert f'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: ({W}, {MLP + 1}) in the file, ({W}, {MLP}) in the model' in msg


def test_resnet_v15_refuses_bit_weights(tmp_path):
  path = str(tmp_path / 'bit.npz')
  np.savez(path, x=np.zeros(1))
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match='ResNet v1.5 with BatchNorm.*bit_r50x1'):
    pretrained.load_backbone(path, build_backbone('resnet18'), {})


def test_warm_start_loads_backbone_and_keeps_head(tmp_path):
  """train.init_from=<file>.npz through the trainer's warm start: backbone features equal the
  numpy reference, the head keeps its fresh initialisation, and init_prefixes narrows what
  loads."""
  rng = np.random.default_rng(4)
  f = _vit_file(rng, 2)
  path = str(tmp_path / 'vit.npz')
  np.savez(path, **f)
  model = Classifier(_vit(), SoftmaxHead(num_classes=5), mean=(0.0,), std=(1.0,))
  tx = optax.sgd(0.1)
  mesh = build_mesh(('data', 'model'), (-1, 1))
  _, shardings = state_shardings(model, tx, (8, 8, 3), mesh)
  fresh = create_state(model, tx, (8, 8, 3), shardings, jax.random.key(7))
  state, taken = warm_start(fresh, path, ('backbone',), model.backbone)
  assert len(taken) == len(jax.tree.leaves(fresh.params['backbone']))
  images = rng.integers(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)
  got = jax.jit(lambda p, x: model.apply({'params': p}, x, method=Classifier.features))(
      state.params, images)
  np.testing.assert_allclose(got, _np_vit(f, images.astype(np.float64) / 255.0), rtol=2e-4,
                             atol=2e-4)
  jax.tree.map(np.testing.assert_array_equal, state.params['head'], fresh.params['head'])

  partial, taken = warm_start(fresh, path, ('backbone/block1',), model.backbone)
  assert taken and all(t.startswith('backbone/block1/') for t in taken)
  np.testing.assert_array_equal(partial.params['backbone']['block0']['ln1']['scale'],
                                fresh.params['backbone']['block0']['ln1']['scale'])
  np.testing.assert_array_equal(partial.params['backbone']['block1']['ln1']['scale'],
                                f['Transformer/encoderblock_1/LayerNorm_0/scale'])
  with pytest.raises(ValueError, match="init_prefixes=\\('head',\\) selects none"):
    warm_start(fresh, path, ('head',), model.backbone)


def test_bit_r50x1_parameter_count():
  """BiT-R50x1 without its head: 23,500,352 parameters (timm's resnetv2_50x1_bit, 25,549,352
  with a 1000-class head, minus 2048 * 1000 + 1000)."""
  shapes = jax.eval_shape(lambda: build_backbone('bit_r50x1').init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 25_549_352 - 2_049_000


def test_scanned_vit_loads_stacked_blocks(tmp_path):
  """ViT(scan=True) keeps the blocks stacked [depth, ...]: the file's per-block arrays are
  stacked, and the forward pass equals the numpy reference."""
  rng = np.random.default_rng(5)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  f = _vit_file(rng, 2)
  module = ViT(width=W, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, patch_size=P, scan=True)
  params, unused = _load(tmp_path, f, module, images)
  np.testing.assert_allclose(_apply(params, images, module), _np_vit(f, images.astype(np.float64)),
                             rtol=2e-4, atol=2e-4)
  assert unused == ['head/bias', 'head/kernel', 'pre_logits/kernel']
