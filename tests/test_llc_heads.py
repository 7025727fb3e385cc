"""LLC heads: phase-1 codebook head, phase-2 instance-code head, configs, export and evaluation."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import llc_phases as phases
from heads.softmax import SoftmaxHead
from llc import baselines, codebook_io, codes
from llc.heads import CodebookHead, InstanceCodeHead
from training.resolve import resolve
from tests.helpers import load_config, resolved_config

LLC_CONFIGS = ('llc_cifar10.py', 'llc_caltech101.py', 'llc_imagenet.py')


def save(path, values) -> str:
  np.save(path, values)
  return str(path)


def init(head, *args):
  """head.init with the sharding boxes removed."""
  return nn.meta.unbox(head.init(jax.random.key(0), *args))


def bce_reference(o: np.ndarray, targets: np.ndarray) -> np.ndarray:
  o = o.astype(np.float64)
  return np.mean(np.maximum(o, 0) - o * targets + np.log1p(np.exp(-np.abs(o))), axis=1)


# --- phase 1 head ------------------------------------------------------------------------------

def test_codebook_head_forward_is_z_times_sign_codebook_and_grad_reaches_codebook():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
  labels = jnp.array([0, 3, 1, 6, 2])
  head = CodebookHead(num_classes=7, bits=9)
  params = init(head, x)['params']
  assert set(params) == {'projection', 'codebook'} and 'bias' not in params['projection']
  c = np.asarray(params['codebook'])
  assert c.shape == (7, 9) and 0.3 < c.std() < 0.65            # N(0, 2/9): std 0.47
  out = head.apply({'params': params}, x)
  z = np.asarray(x) @ np.asarray(params['projection']['kernel'])
  np.testing.assert_allclose(out.logits, z @ np.where(c > 0, 1.0, -1.0).T, rtol=1e-5, atol=1e-5)
  assert out.loss is None

  def loss(p):
    return head.apply({'params': p}, x, labels).loss.mean()
  grad_c = jax.grad(loss)(params)['codebook']

  def loss_of_b(b):  # the same loss with B as a free variable
    logits = jnp.asarray(z) @ b.T
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 7), 0.1)
    return optax.softmax_cross_entropy(logits, targets).mean()
  grad_b = jax.grad(loss_of_b)(jnp.where(c > 0, 1.0, -1.0))
  assert float(jnp.abs(grad_c).max()) > 0
  np.testing.assert_allclose(grad_c, grad_b, rtol=1e-5, atol=1e-6)


def test_codebook_init_from_file_real_bool_and_mismatch(tmp_path):
  x = jnp.ones((2, 4))
  real = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
  head = CodebookHead(num_classes=6, bits=5, codebook_init=save(tmp_path / 'real.npy', real))
  np.testing.assert_array_equal(init(head, x)['params']['codebook'], real)
  book = baselines.random_codebook(6, 5, seed=3)
  head = CodebookHead(num_classes=6, bits=5, codebook_init=save(tmp_path / 'bool.npy', book))
  values = np.asarray(init(head, x)['params']['codebook'])
  np.testing.assert_array_equal(values > 0, book)
  np.testing.assert_allclose(values, baselines.warm_start_values(book, 5, 0))
  head = CodebookHead(num_classes=7, bits=5, codebook_init=str(tmp_path / 'real.npy'))
  with pytest.raises(ValueError, match=r'shape \(6, 5\).*\[7, 5\]'):
    head.init(jax.random.key(0), x)


# --- phase 2 head ------------------------------------------------------------------------------

def test_instance_head_loss_equals_numpy_bce(tmp_path):
  rng = np.random.default_rng(2)
  book = rng.standard_normal((8, 6)).astype(np.float32)
  head = InstanceCodeHead(num_classes=8, bits=6, codebook=save(tmp_path / 'c.npy', book))
  x = jnp.asarray(3 * rng.standard_normal((10, 6)), jnp.float32)
  labels = rng.integers(0, 8, 10)
  variables = init(head, x)
  assert set(variables['params']) == {'projection'}
  np.testing.assert_array_equal(variables['batch_stats']['class_codes'],
                                np.where(book > 0, 1.0, -1.0))
  out = head.apply(variables, x, jnp.asarray(labels))
  o = np.asarray(x) @ np.asarray(variables['params']['projection']['kernel'])
  targets = (book > 0).astype(np.float64)
  assert out.loss.shape == (10,)
  np.testing.assert_allclose(out.loss, bce_reference(o, targets[labels]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.logits, o @ targets.T, rtol=1e-5, atol=1e-5)
  # softmax(logits) is the normalised product of per-bit Bernoulli likelihoods of each class code
  loglik = (targets[None] * np.log(jax.nn.sigmoid(o))[:, None]
            + (1 - targets[None]) * np.log(jax.nn.sigmoid(-o))[:, None]).sum(-1)
  np.testing.assert_allclose(jax.nn.softmax(out.logits), jax.nn.softmax(loglik), atol=1e-5)


def test_instance_logits_argmax_equals_mhd_when_bits_are_confident(tmp_path):
  rng = np.random.default_rng(3)
  book = rng.standard_normal((50, 7)).astype(np.float32)     # 50 codes of 7 bits: collisions
  head = InstanceCodeHead(num_classes=50, bits=7, codebook=save(tmp_path / 'c.npy', book))
  signs = np.where(rng.standard_normal((400, 7)) > 0, 1.0, -1.0).astype(np.float32)
  variables = init(head, jnp.zeros((1, 7)))
  variables['params']['projection']['kernel'] = jnp.eye(7) * 12.0   # |o_j| = 12 for all bits
  logits = np.asarray(head.apply(variables, jnp.asarray(signs)).logits)
  mhd, tied = codes.min_hamming_decode(signs > 0, book > 0, return_ties=True)
  assert tied.mean() > 0.1                                       # ties are exercised
  np.testing.assert_array_equal(logits.argmax(-1), mhd)


def test_instance_head_without_or_with_a_wrong_codebook_fails_clearly(tmp_path):
  x = jnp.ones((1, 4))
  with pytest.raises(ValueError, match='no codebook file'):
    InstanceCodeHead(num_classes=3, bits=2).init(jax.random.key(0), x)
  with pytest.raises(FileNotFoundError, match='llc.evaluate'):
    InstanceCodeHead(num_classes=3, bits=2, codebook=str(tmp_path / 'none.npy')).init(
        jax.random.key(0), x)
  wrong = save(tmp_path / 'w.npy', np.ones((3, 5)))
  with pytest.raises(ValueError, match=r'\[3, 2\]'):
    InstanceCodeHead(num_classes=3, bits=2, codebook=wrong).init(jax.random.key(0), x)


# --- both phases on separable synthetic features -----------------------------------------------

def _clusters(rng, num_classes=16, dims=32, per_class=40, spread=0.5):
  means = rng.standard_normal((num_classes, dims))
  def draw():
    labels = np.repeat(np.arange(num_classes), per_class)
    x = means[labels] + spread * rng.standard_normal((labels.size, dims))
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)
  return draw(), draw()


def _fit(head, variables, x, labels, steps=300, lr=1e-2):
  """Full-batch Adam on the head's mean loss; returns the trained variables."""
  tx = optax.adam(lr)
  params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: head.apply({'params': p, **rest}, x, labels).loss.mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return {'params': params, **rest}


def test_synthetic_clusters_unique_codes_and_mhd_near_real_head(tmp_path):
  (x, y), (x_test, y_test) = _clusters(np.random.default_rng(4))
  accuracy = lambda logits: float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(y_test)))

  real = SoftmaxHead(num_classes=16)
  real_vars = _fit(real, init(real, x), x, y)
  real_acc = accuracy(real.apply(real_vars, x_test).logits)

  phase1 = CodebookHead(num_classes=16, bits=8)
  p1 = _fit(phase1, init(phase1, x), x, y)
  codebook = np.asarray(p1['params']['codebook'])
  assert codes.unique_codes(codebook > 0) == 16
  class_code_acc = accuracy(phase1.apply(p1, x_test).logits)

  phase2 = InstanceCodeHead(num_classes=16, bits=8, codebook=save(tmp_path / 'c.npy', codebook))
  p2 = init(phase2, x)
  p2['params']['projection'] = p1['params']['projection']         # the warm start
  p2 = _fit(phase2, p2, x, y)
  o = np.asarray(x_test) @ np.asarray(p2['params']['projection']['kernel'])
  metrics = codes.llc_metrics(o >= 0, np.asarray(y_test), codebook > 0)
  assert real_acc >= 0.99
  assert class_code_acc >= real_acc - 0.03
  assert metrics['mhd_accuracy'] >= real_acc - 0.05
  assert metrics['ed_strict_accuracy'] <= metrics['mhd_accuracy']
  assert metrics['bits_right'] > 7.5


# --- configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', LLC_CONFIGS)
def test_llc_config_variants(name, tmp_path):
  p1 = resolved_config(name, 'phase=1,bits=9')
  assert p1.model.head == 'llc_codebook' and p1.model.head_kwargs.bits == 9
  assert p1.model.head_kwargs.label_smoothing == 0.1
  book = save(tmp_path / 'b.npy', np.ones((p1.dataset.num_classes, 9), np.float32))
  assert resolved_config(name, f'codebook_init={book},bits=9').model.head_kwargs.codebook_init == book
  p2 = resolved_config(name, f'phase=2,bits=9,codebook={book},backbone_from={tmp_path}')
  assert p2.model.head == 'llc_instance' and p2.model.head_kwargs.codebook == book
  assert p2.train.init_from == str(tmp_path) and tuple(p2.train.init_prefixes) == ('backbone',)
  assert p2.optimizer.learning_rate == pytest.approx(p1.optimizer.learning_rate / 10)
  assert abs(p2.train.num_steps - p1.train.num_steps / 4) <= 1
  assert load_config(name, 'det').model.head == 'softmax'
  assert load_config(name, 'runlocal,phase=2').model.head_kwargs.codebook == ''


def test_llc_bits_lr_and_steps_follow_the_final_config():
  """Derived after overrides (issue 16 cases 1 and 3): bits from the final K, the lr linear in
  the final batch (0.05 per 64 images), steps from the epochs of the data's examples."""
  c = resolved_config('llc_cifar10.py', 'phase=1', **{
      'dataset.num_classes': 242, 'dataset.train_examples': 1000, 'input.batch_size': 100,
      'train.epochs': 3.0})
  assert c.model.head_kwargs.bits == 16                # ceil(2 log2 242) = ceil(15.84)
  assert c.optimizer.learning_rate == pytest.approx(0.05 * 100 / 64)
  assert c.train.num_steps == 30 and c.optimizer.warmup_steps == 10   # min(200, 1 epoch)
  assert c.train.checkpoint_every == 10 and c.train.eval_every == 30   # 1 / min(5, 3) epochs
  p2 = resolved_config('llc_cifar10.py', 'phase=2,codebook=x.npy', **{
      'dataset.num_classes': 4, 'dataset.train_examples': 1000, 'input.batch_size': 100,
      'model.head_kwargs.codebook': ''})
  assert p2.model.head_kwargs.bits == 4 and p2.train.num_steps == round(30 * 10 / 4)
  assert p2.optimizer.learning_rate == pytest.approx(0.05 * 100 / 64 / 10)
  assert resolve(p2, with_data=False).train.num_steps == 75   # resolving again changes nothing


def test_phase2_config_without_a_phase1_codebook_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match='phase1=<phase-1 workdir>'):
    load_config('llc_cifar10.py', 'phase=2,bits=5')
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='does not exist: train phase 1 first'):
    load_config('llc_cifar10.py', f'phase=2,bits=5,phase1={missing}')
  os.makedirs(tmp_path / 'p1' / 'checkpoints' / '4')  # a step orbax never finalised
  with pytest.raises(FileNotFoundError, match='has no complete checkpoint: train phase 1'):
    load_config('llc_cifar10.py', f'phase=2,bits=5,phase1={tmp_path / "p1"}')
  (tmp_path / 'p1' / 'checkpoints' / '4' / 'commit_success.txt').write_text('')  # finalised
  with pytest.raises(FileNotFoundError, match='(?s)no codebook.npy.*llc.evaluate'):
    load_config('llc_cifar10.py', f'phase=2,bits=5,phase1={tmp_path / "p1"}')
  save(tmp_path / 'p1' / 'codebook.npy', np.ones((10, 7), np.float32))
  with pytest.raises(ValueError, match=r'shape \(10, 7\).*\[10, 5\]'):
    resolved_config('llc_cifar10.py', f'phase=2,bits=5,phase1={tmp_path / "p1"}')
  c = resolved_config('llc_cifar10.py', f'phase=2,phase1={tmp_path / "p1"}')   # bits 7 = default
  assert c.model.head_kwargs.codebook == str(tmp_path / 'p1' / 'codebook.npy')
  assert tuple(c.train.init_prefixes) == ('backbone', 'head/projection')
  # The shape is checked against the final num_classes: 242 classes need a (242, 16) codebook.
  save(tmp_path / 'p1' / 'codebook.npy', np.ones((242, 16), np.float32))
  c = resolved_config('llc_cifar10.py', f'phase=2,phase1={tmp_path / "p1"}',
                      **{'dataset.num_classes': 242})
  assert c.model.head_kwargs.bits == 16
  with pytest.raises(ValueError, match='do not apply'):
    load_config('llc_cifar10.py', f'phase=1,phase1={tmp_path / "p1"}')


@pytest.mark.parametrize('k', (5, 20, 70))
def test_min_class_distance_matches_reference(k):
  from llc.codes import min_class_distance
  book = np.random.default_rng(k).integers(0, 2, (30, k)).astype(bool)
  dist = (book[:, None] != book[None]).sum(-1) + k * np.eye(30, dtype=int)
  assert min_class_distance(book) == dist.min()


# --- end to end through the trainer ------------------------------------------------------------

def _digits_config(head: str, **head_kwargs) -> ml_collections.ConfigDict:
  c = load_config('quickstart.py', 'runlocal')
  c.model.head = head
  c.model.head_kwargs = ml_collections.ConfigDict(head_kwargs)
  c.train.num_steps = 30
  c.train.checkpoint_every = 30
  c.train.log_every = 30
  c.train.async_checkpointing = False
  return c


def test_end_to_end_phase1_export_phase2_evaluate(tmp_path, capsys):
  from llc import baseline_codebooks
  from llc.evaluate import EVAL_FILE, evaluate_llc
  from launch.train import train_and_evaluate
  p1_dir, p2_dir, det_dir = (str(tmp_path / d) for d in ('p1', 'p2', 'det'))

  p1_config = _digits_config('llc_codebook', bits=6, label_smoothing=0.1)
  train_and_evaluate(p1_config, p1_dir)
  r1 = evaluate_llc(p1_config, p1_dir)
  assert {'unique_codes', 'class_code_accuracy', 'min_class_distance'} <= set(r1)
  assert r1['phase'] == 1 and r1['num_examples'] == 64
  codebook = np.load(os.path.join(p1_dir, 'codebook.npy'))
  assert codebook.shape == (10, 6) and codebook.dtype == np.float32
  assert r1['unique_codes'] == codes.unique_codes(codebook > 0)

  p2_config = _digits_config('llc_instance')
  phases.configure(p2_config, {'phase': 2, 'bits': 6, 'phase1': p1_dir}, default_bits=6)
  p2_config.mesh.shape = (4, 2)                       # class codes sharded over 'model'
  capsys.readouterr()
  train_and_evaluate(p2_config, p2_dir)
  assert 'Initialised' in capsys.readouterr().out
  r2 = evaluate_llc(p2_config, p2_dir)
  for key in ('ed_strict_accuracy', 'ed_lenient_accuracy', 'ed_ambiguous_rate',
              'ed_no_match_rate', 'mhd_accuracy', 'mhd_tie_rate', 'bits_right', 'unique_codes',
              'logit_accuracy', 'codebook'):
    assert key in r2, key
  assert r2['phase'] == 2 and 0 <= r2['bits_right'] <= 6
  with open(os.path.join(p2_dir, EVAL_FILE)) as f:
    assert json.load(f) == r2
  p2_config.mesh.shape = (-1, 1)                      # restores onto another mesh
  again = evaluate_llc(p2_config, p2_dir, phase1_workdir=p1_dir, retrieval_topk=50)
  assert again['mhd_accuracy'] == r2['mhd_accuracy'] and again['codebook'].endswith('codebook.npy')
  # retrieval: eval queries against the training split, checked with a full stable argsort
  from evaluation.from_checkpoint import restore_checkpoint
  from input_pipeline.sources import build_source
  from llc.evaluate import collect_codes
  exp, variables, _ = restore_checkpoint(p2_config, p2_dir)
  queries = collect_codes(exp, variables)
  database = collect_codes(exp, variables, build_source(p2_config.dataset, 'train', 0, False)[0])
  assert again['retrieval_database'] == len(database['label']) == 1437
  q_bits, d_bits = queries['codes'] >= 0, database['codes'] >= 0
  aps = []
  for bits, label in zip(q_bits, queries['label']):
    order = np.argsort((bits != d_bits).sum(1), kind='stable')[:50]
    hits = database['label'][order] == label
    precision = np.cumsum(hits) / np.arange(1, 51)
    aps.append((precision * hits).sum() / hits.sum() if hits.any() else 0.0)
  assert again['map@50'] == pytest.approx(np.mean(aps), abs=1e-9)
  found = np.array([a > 0 for a in aps])   # AP > 0 iff something relevant is in the top 50
  assert again['map@50_hashnet'] == pytest.approx(np.mean(np.array(aps)[found]), abs=1e-9)
  assert again['retrieval_queries_without_relevant'] == int(np.sum(~found))
  with pytest.raises(ValueError, match='phase-2 workdirs only'):
    evaluate_llc(p1_config, p1_dir, retrieval_topk=50)

  det_config = _digits_config('softmax')
  train_and_evaluate(det_config, det_dir)
  for kind in ('random', 'svd', 'cca'):
    values = baseline_codebooks.build(kind, 6, num_classes=10, det_workdir=det_dir,
                                      config=det_config, max_examples=200)
    assert values.shape == (10, 6) and values.std() == pytest.approx(np.sqrt(2 / 6), rel=1e-4)
  summary = baseline_codebooks.write(values, str(tmp_path / 'cca.npy'))
  assert summary['unique_codes'] == codes.unique_codes(values > 0)
  codebook_io.load_codebook(summary['out'], 10, 6)
