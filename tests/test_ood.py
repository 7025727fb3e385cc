"""OOD detection: AUROC / AUPR / FPR95 against scikit-learn and brute force on the same scores,
and every head's OOD scores on a tiny case against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import linen as nn
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from evaluation import ood
from heads.registry import build_head

B, D, K = 6, 5, 4


def test_detection_metrics_against_sklearn_and_brute_force():
  rng = np.random.default_rng(0)
  ins = np.round(rng.normal(0.0, 1.0, 300), 1)     # rounded: many ties, within and across
  outs = np.round(rng.normal(1.0, 1.0, 200), 1)
  got = ood.detection_metrics(ins, outs)
  y, s = np.r_[np.zeros(300), np.ones(200)], np.r_[ins, outs]
  # AUROC = P(out > in) + P(tie) / 2 over all pairs (Mann-Whitney)
  pairs = outs[:, None] - ins[None, :]
  assert got['auroc'] == pytest.approx(np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0), abs=1e-12)
  assert got['auroc'] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
  assert got['aupr'] == pytest.approx(average_precision_score(y, s), abs=1e-12)
  fpr, tpr, _ = roc_curve(y, s)
  assert got['fpr95'] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
  # brute force: the largest threshold among the scores flagging >= 95% of the OOD examples
  t = max(v for v in s if np.mean(outs >= v) >= 0.95)
  assert got['fpr95'] == pytest.approx(np.mean(ins >= t), abs=1e-12)


def test_perfect_and_inverted_separation():
  assert ood.detection_metrics(np.zeros(5), np.ones(7)) == {'auroc': 1.0, 'aupr': 1.0,
                                                            'fpr95': 0.0}
  inverted = ood.detection_metrics(np.ones(5), np.zeros(7))
  assert inverted['auroc'] == 0.0 and inverted['fpr95'] == 1.0


def _np_entropy(p):
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)


def test_logit_scores_against_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(B, K)).astype(np.float32) * 3
  for link, p in (('softmax', scipy.special.softmax(logits, -1)),
                  ('sigmoid', scipy.special.expit(logits))):
    p = p / p.sum(-1, keepdims=True)
    got = jax.tree.map(np.asarray, ood.logit_scores(link, jnp.asarray(logits)))
    np.testing.assert_allclose(got['msp'], -p.max(-1), rtol=1e-5)
    np.testing.assert_allclose(got['entropy'], _np_entropy(p), rtol=1e-5)
    np.testing.assert_allclose(got['max_logit'], -logits.max(-1), rtol=1e-6)


def _head_scores(head, x):
  variables = jax.jit(lambda x: nn.meta.unbox(head.init(jax.random.key(0), x)))(x)  # as the
  logits = jax.jit(lambda v, x: head.apply(v, x).logits)(variables, x)       # train state holds
  scores = jax.jit(lambda v, x, l: head.apply(v, x, l, method='ood_scores'))(variables, x, logits)
  return variables, np.asarray(logits), jax.tree.map(np.asarray, scores)


@pytest.mark.parametrize('kind, link', [('het', 'softmax'), ('hetxl', 'softmax'),
                                        ('hetxl', 'sigmoid')])
def test_het_mc_entropy_is_entropy_of_mc_mean(kind, link):
  """mc_entropy = entropy of mean_s link(u_s / tau) over the head's own S samples."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(B, D)), jnp.float32)
  head = build_head(kind, K, num_factors=2, link=link, temperature=1.5, eval_mc_samples=16,
                    mc_chunk_size=4, train_mc_samples=16)
  variables, _, scores = _head_scores(head, x)
  u = np.asarray(jax.jit(lambda v, x: head.apply(v, x, method='sample_logits'))(variables, x),
                 np.float64) / 1.5
  if link == 'softmax':
    want = _np_entropy(scipy.special.softmax(u, -1).mean(1))
  else:
    p = scipy.special.expit(u).mean(1)
    want = -np.sum(p * np.log(p) + (1 - p) * np.log(1 - p), -1)
  np.testing.assert_allclose(scores['mc_entropy'], want, rtol=1e-4)


def test_soc_max_log_density():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(B, D)), jnp.float32)
  variables, _, scores = _head_scores(build_head('soc', K, dims=3), x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  z = np.asarray(x, np.float64) @ p['projection']['kernel'] + p['projection']['bias']
  log_n = (-0.5 * ((z[:, None] - p['class_means'][None]) ** 2).sum(-1)
           - 1.5 * np.log(2 * np.pi))
  np.testing.assert_allclose(scores['max_log_density'], -log_n.max(-1), rtol=1e-5)


def _np_min_hamming(codes, class_bits):
  return np.array([min(np.sum(c != b) for b in class_bits) for c in codes], np.float64)


def test_llc_no_match_is_distance_to_nearest_class_code(tmp_path):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(32, D)), jnp.float32)
  bits = 6
  variables, _, scores = _head_scores(build_head('llc_codebook', K, bits=bits), x)
  kernel = np.asarray(variables['params']['projection']['kernel'])
  codebook = np.asarray(variables['params']['codebook'])
  want = _np_min_hamming(np.asarray(x) @ kernel >= 0, codebook > 0)
  np.testing.assert_array_equal(scores['llc_no_match'], want)
  assert (want == 0).any() and (want > 0).any()       # both matches and no-matches occur

  path = str(tmp_path / 'codebook.npy')
  np.save(path, rng.normal(size=(K, bits)).astype(np.float32))
  variables, _, scores = _head_scores(build_head('llc_instance', K, bits=bits, codebook=path), x)
  kernel = np.asarray(variables['params']['projection']['kernel'])
  want = _np_min_hamming(np.asarray(x) @ kernel >= 0, np.load(path) > 0)
  np.testing.assert_array_equal(scores['llc_no_match'], want)


def test_det_has_no_own_score():
  x = jnp.ones((2, D))
  _, _, scores = _head_scores(build_head('softmax', K), x)
  assert scores == {}


@pytest.mark.parametrize('spec, message', [
    ('heldout', 'holds out no classes'), ('caltech101', "use 'heldout' or NAME=DIR")])
def test_bad_ood_spec_is_one_clear_error(spec, message):
  from configs import schema
  config = schema.base_config()
  with pytest.raises(ValueError, match=message):
    ood.ood_dataset(config, spec)
