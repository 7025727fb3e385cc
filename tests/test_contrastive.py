"""Contrastive image-text head (hetxl.contrastive): loss and MC estimate against numpy, the
zero-noise limit, zero-shot logits of a hand-built case, the global-batch similarity matrix,
the locked-text preparation step, and 2 processes == 1 process."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetxl.contrastive import ContrastiveHead, contrastive_loss
from input_pipeline import captions
from tests.helpers import ROOT, run_main
from tests.test_multihost import _losses, _run_two_processes


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _numpy_loss(samples, mask):
  """samples [S, B, B] (image i, text j) -> per-example bidirectional loss of the MC-mean
  softmax over the real examples only (padding removed, not masked)."""
  keep = np.flatnonzero(mask)
  u = samples[:, keep][:, :, keep]
  p_i2t = np.exp(_log_softmax(u, 2)).mean(0)       # [B', B'] mean over samples
  p_t2i = np.exp(_log_softmax(u, 1)).mean(0)
  out = np.zeros(len(mask))
  out[keep] = -0.5 * (np.log(np.diag(p_i2t)) + np.log(np.diag(p_t2i)))
  return out


def _numpy_sigmoid_loss(samples, mask):
  keep = np.flatnonzero(mask)
  u = samples[:, keep][:, :, keep]
  sign = 2 * np.eye(len(keep)) - 1
  p = (1 / (1 + np.exp(-sign * u))).mean(0)
  out = np.zeros(len(mask))
  out[keep] = -np.log(p).sum(1)
  return out


MASK = np.array([1, 1, 0, 1, 1, 0], np.float32)


def test_deterministic_loss_matches_numpy_both_directions_padding_masked():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 6)).astype(np.float32)   # not symmetric: directions differ
  got = contrastive_loss(lambda idx: jnp.asarray(logits)[:, None, :], 1, jnp.asarray(MASK))
  np.testing.assert_allclose(got, _numpy_loss(logits[None], MASK), rtol=1e-5, atol=1e-6)
  # Padding rows/columns carry no weight: changing their logits changes nothing.
  moved = logits.copy()
  moved[2, :] += 50.0
  moved[:, 5] -= 50.0
  again = contrastive_loss(lambda idx: jnp.asarray(moved)[:, None, :], 1, jnp.asarray(MASK))
  np.testing.assert_allclose(again, got, rtol=1e-6)
  # One direction alone would differ from the mean of both.
  i2t_only = -np.diag(_log_softmax(logits[np.ix_([0, 1, 3, 4], [0, 1, 3, 4])], 1))
  assert np.abs(np.asarray(got)[[0, 1, 3, 4]] - i2t_only).max() > 1e-2


@pytest.mark.parametrize('chunk', [None, 3])
def test_mc_estimate_matches_numpy(chunk):
  rng = np.random.default_rng(1)
  samples = rng.normal(0, 2, (7, 6, 6)).astype(np.float32)              # [S, B, B]
  sample_fn = lambda idx: jnp.take(jnp.asarray(samples), idx, axis=0, mode='clip'
                                   ).transpose(1, 0, 2)                   # [B, C, B]
  got = contrastive_loss(sample_fn, 7, jnp.asarray(MASK), chunk_size=chunk)
  np.testing.assert_allclose(got, _numpy_loss(samples, MASK), rtol=1e-5, atol=1e-6)
  # log of the MC mean, not the mean of the logs (which is what S=1 losses averaged give).
  assert not np.allclose(got, np.mean([_numpy_loss(s[None], MASK) for s in samples], 0),
                         rtol=1e-3)
  got = contrastive_loss(sample_fn, 7, jnp.asarray(MASK), loss='sigmoid', chunk_size=chunk)
  np.testing.assert_allclose(got, _numpy_sigmoid_loss(samples, MASK), rtol=1e-5, atol=1e-5)


def _head(noise, table, **kw):
  return ContrastiveHead(num_classes=table.shape[0], captions=table, embed_dim=4,
                         text_tower='locked', noise=noise, num_factors=2,
                         temperature='bounded', train_mc_samples=16, **kw)


def _rngs(seed=0):
  k = jax.random.key(seed)
  return {n: jax.random.fold_in(k, i) for i, n in enumerate(
      ('params', 'captions', 'diag_noise_samples', 'standard_norm_noise_samples'))}


def test_zero_noise_hetxl_equals_deterministic_and_noise_changes_it():
  rng = np.random.default_rng(2)
  table = rng.normal(size=(3, 2, 5)).astype(np.float32)                  # K=3, T=2, E_text=5
  feats = jnp.asarray(rng.normal(0, 3, (6, 8)), jnp.float32)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  mask = jnp.asarray(MASK)
  het = _head('hetxl', table)
  params = het.init(_rngs(), feats, labels, train=True, mask=mask)['params']
  zero = jax.tree.map(lambda x: x, params)
  zero['diag_layer'] = {'kernel': jnp.zeros_like(params['diag_layer']['kernel']),
                        'bias': jnp.full_like(params['diag_layer']['bias'], -30.0)}
  zero['scale_layer'] = jax.tree.map(jnp.zeros_like, params['scale_layer'])
  det_params = {k: v for k, v in zero.items() if k not in ('diag_layer', 'scale_layer')}
  det = _head('none', table)
  det_out = det.apply({'params': det_params}, feats, labels, train=True, mask=mask,
                      rngs=_rngs(1))
  het_out = het.apply({'params': zero}, feats, labels, train=True, mask=mask, rngs=_rngs(1))
  np.testing.assert_allclose(het_out.loss, det_out.loss, rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(het_out.logits, det_out.logits, rtol=1e-6)  # eval: deterministic
  assert float(jnp.abs(det_out.loss).sum()) > 0 and np.all(np.asarray(det_out.loss)[MASK == 0] == 0)
  noisy = het.apply({'params': params}, feats, labels, train=True, mask=mask, rngs=_rngs(1))
  assert np.abs(np.asarray(noisy.loss) - np.asarray(det_out.loss)).max() > 1e-2


def test_zero_shot_logits_of_a_hand_built_two_class_case():
  """Locked text, no projection, identity image projection: logits = s * cos(x, c_k) with c_k
  the renormalised mean of the class's normalised template embeddings."""
  s2 = np.sqrt(2)
  table = np.array([[[1, 1, 0], [1, -1, 0]],                 # class 0: mean direction (1, 0, 0)
                    [[0, 0, 2], [0, 0.6, 0.8]]], np.float32)  # class 1: (0, .6, 1.8) / |.|
  images = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.9], [0.1, -0.9, 0.2], [-0.2, 0.7, 0.6]],
                    np.float32)
  head = ContrastiveHead(num_classes=2, captions=table, embed_dim=3, text_tower='locked',
                         text_kwargs={'project': False})
  params = head.init(_rngs(), jnp.asarray(images))['params']
  params['image_projection'] = {'kernel': jnp.eye(3), 'bias': jnp.zeros(3)}
  logits = np.asarray(head.apply({'params': params}, jnp.asarray(images)).logits)
  c0 = np.array([1, 0, 0])
  c1 = np.array([0, 0.6, 1.8]) / np.linalg.norm([0, 0.6, 1.8])
  x = images / np.linalg.norm(images, axis=1, keepdims=True)
  np.testing.assert_allclose(logits, 10.0 * x @ np.stack([c0, c1]).T, rtol=1e-5, atol=1e-6)
  # Image 2 is class 0 only thanks to template averaging (template 0 alone says class 1).
  assert (x[2] @ np.array([1, 1, 0]) / s2) < x[2] @ np.array([0, 0, 1])
  labels = np.array([0, 1, 0, 1])
  assert np.array_equal(logits.argmax(1), labels)                        # zero-shot accuracy 1
  assert np.mean(logits.argmax(1) == np.array([0, 1, 1, 1])) == 0.75


def test_similarity_matrix_spans_the_global_batch():
  """Under jit with the batch sharded over 'data' on 8 devices the loss equals the unsharded
  one: each example's negatives are the whole global batch, not its device's shard (a
  per-shard loss differs, checked on shard 0)."""
  from training.mesh import batch_sharding, build_mesh
  rng = np.random.default_rng(3)
  table = rng.normal(size=(3, 2, 5)).astype(np.float32)
  feats = jnp.asarray(rng.normal(0, 3, (16, 8)), jnp.float32)
  labels, mask = jnp.arange(16) % 3, jnp.ones(16, jnp.float32)
  het = _head('hetxl', table)
  params = het.init(_rngs(), feats, labels, train=True, mask=mask)['params']
  loss = lambda f, y, m: het.apply({'params': params}, f, y, train=True, mask=m,
                                   rngs=_rngs(1)).loss
  sharding = batch_sharding(build_mesh(('data', 'model'), (8, 1), jax.devices()[:8]))
  sharded = jax.jit(loss)(*(jax.device_put(x, sharding) for x in (feats, labels, mask)))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, loss(feats, labels, mask), rtol=1e-5)
  shard0 = loss(feats[:2], labels[:2], mask[:2])
  assert np.abs(np.asarray(shard0) - np.asarray(sharded)[:2]).max() > 1e-2


def _fake_encoder(texts):
  """A deterministic bag-of-words stand-in for a sentence encoder: [N, 12], normalised."""
  out = np.zeros((len(texts), 12), np.float32)
  for i, t in enumerate(texts):
    for w in t.lower().strip('.').split():
      out[i] += np.random.default_rng(list(w.encode())).normal(size=12)
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_locked_text_trains_the_same_on_two_processes_as_on_one(tmp_path):
  """DET with one template: the loss is then a function of the batch's set of examples (a
  2-process global batch holds the same examples in another order; per-position draws, the
  template and HET-XL's noise, would differ), so 2 x 2 devices must equal 1 x 4."""
  from launch.prepare_text import write_embeddings
  path = str(tmp_path / 'emb.npz')
  names = [f'class_{k}' for k in range(5)]              # the synthetic stand-in's classes
  templates = ('a photo of a {}.',)
  emb = write_embeddings(path, names, templates, _fake_encoder, 'fake')
  assert emb.shape == (5, 1, 12)
  np.testing.assert_allclose(captions.load_embeddings(path, names[::-1], templates), emb[::-1])
  with pytest.raises(ValueError, match='templates'):
    captions.load_embeddings(path, names, captions.TEMPLATES)
  args = ['--config=configs/contrastive_caltech.py:runlocal,text=locked',
          f'--config.model.head_kwargs.text_embeddings={path}',
          f'--config.model.head_kwargs.templates={templates!r}',
          '--config.optimizer.schedule=constant', '--config.train.async_checkpointing=False',
          '--config.train.num_steps=2', '--config.train.checkpoint_every=2']
  one = json.loads(run_main(*args, f'--workdir={tmp_path / "one"}', devices=4
                            ).stdout.strip().splitlines()[-1])
  two = [json.loads(o.strip().splitlines()[-1])
         for o in _run_two_processes('launch.main', *args, f'--workdir={tmp_path / "two"}')]
  assert two[0] == two[1]
  assert two[0]['accuracy'] == pytest.approx(one['accuracy'])
  assert two[0]['nll'] == pytest.approx(one['nll'], rel=1e-4)
  want, got = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert sorted(got) == sorted(want) == [1, 2]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-4), step


def test_missing_locked_embeddings_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m launch.prepare_text'):
    captions.load_embeddings(str(tmp_path / 'none.npz'), ['a'], captions.TEMPLATES)


def test_minilm_preparation_matches_sentence_transformers():
  """The numpy all-MiniLM-L6-v2 forward pass against the similarity sentence-transformers'
  documentation prints for this pair (0.7553). Runs only with the optional extra."""
  pytest.importorskip('all_minilm_l6_v2')
  pytest.importorskip('tokenizers')
  from launch.prepare_text import minilm_encoder
  e = minilm_encoder()(['A man is eating food.', 'A man is eating a piece of bread.'])
  assert e.shape == (2, 384)
  assert float(e[0] @ e[1]) == pytest.approx(0.7553, abs=5e-4)
