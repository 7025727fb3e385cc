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


def test_table_states_chance_and_flags_backwards_and_coinciding_scores():
  """Issue 28 point 4: the chance baselines the legend states are what a random score gets
  (brute force on 30k random scores); a score with AUROC < 0.5 is marked reversed and named
  in a note; two scores that rank the examples the same way (max_logit = log of msp here)
  are named as coinciding; the chance AUPR is the OOD share of the pool."""
  rng = np.random.default_rng(0)
  random = ood.detection_metrics(rng.random(20_000), rng.random(10_000))
  assert random['auroc'] == pytest.approx(0.5, abs=0.01)
  assert random['aupr'] == pytest.approx(1 / 3, abs=0.01)
  assert random['fpr95'] == pytest.approx(0.95, abs=0.01)
  p_in, p_out = np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.6, 0.3, 0.1])
  scores = {'msp': (-p_in, -p_out), 'max_logit': (-np.log(p_in), -np.log(p_out)),
            'entropy': (p_in, -p_out)}   # runs backwards: in-distribution scores higher
  rows = [{'head': 'hetxl', 'ood': 'heldout', 'score': k, 'num_in': 4, 'num_out': 3,
           **ood.detection_metrics(*v)} for k, v in scores.items()]
  text = ood.table(rows)
  assert 'AUROC 0.500, FPR95 0.950' in text
  line = next(l for l in text.splitlines() if l.startswith('| hetxl'))
  cells = [c.strip() for c in line.split('|')[1:-1]]
  assert cells[3] == f'{3 / 7:.3f}'                       # chance AUPR
  msp, entropy, max_logit = cells[4:7]                   # ood.SHARED's order
  assert msp == max_logit == '0.833 / 0.806 / 0.250'      # 10 of 12 (in, out) pairs ordered
  auroc_entropy = rows[2]['auroc']
  assert auroc_entropy < 0.5 and entropy.startswith(f'{auroc_entropy:.3f} (reversed)')
  assert 'note: hetxl on heldout: AUROC < 0.5 for entropy (0.000): the score runs backwards' in text
  assert 'note: hetxl on heldout: msp = max_logit, identical cells' in text
  assert ood.notes([r for r in rows if r['score'] == 'msp']) == []
