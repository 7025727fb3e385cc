"""LLC out-of-distribution detection: threshold tuning, the comparison, held-out classes, and a
digits run end to end."""
import json
import os

import numpy as np
import pytest

from configs import base
from configs import llc_phases as phases
from llc import ood
from tests.helpers import load_config, resolved_config


def brute_force_accuracy(scores, is_ood):
  candidates = [-np.inf, np.inf, *(np.unique(scores) + 1e-9), *(np.unique(scores) - 1e-9)]
  return max(np.mean((scores < t) == is_ood) for t in candidates)


@pytest.mark.parametrize('seed', range(5))
def test_best_threshold_reaches_the_brute_force_optimum(seed):
  rng = np.random.default_rng(seed)
  for _ in range(40):
    n = int(rng.integers(1, 15))
    scores = rng.integers(0, 6, n).astype(np.float64)       # many ties
    is_ood = rng.random(n) < 0.4
    t = ood.best_threshold(scores, is_ood)
    assert np.mean((scores < t) == is_ood) == pytest.approx(brute_force_accuracy(scores, is_ood))


def test_best_threshold_on_separable_scores_and_extremes():
  scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
  assert ood.best_threshold(scores, np.array([1, 1, 1, 0, 0], bool)) == pytest.approx(0.5)
  assert ood.best_threshold(scores, np.zeros(5, bool)) == -np.inf      # nothing is OOD
  assert ood.best_threshold(scores, np.ones(5, bool)) == np.inf        # everything is OOD


def test_compare_scores_on_the_untuned_rest():
  rng = np.random.default_rng(0)
  is_ood = rng.random(2000) < 0.3
  separable = np.where(is_ood, rng.uniform(0, 0.4, 2000), rng.uniform(0.6, 1, 2000))
  noise = rng.random(2000)
  rows = ood.compare(llc_flags=np.zeros(2000, bool), msp={'sep': separable, 'noise': noise},
                     is_ood=is_ood, sizes=(10, 1000, 5000), repeats=5)
  assert [r['n'] for r in rows] == [10, 1000]                  # n >= pool is skipped
  big = rows[1]
  assert big['sep'][0] == 1.0                                   # separable: perfect once tuned
  # flagging nothing scores the in-distribution share of the rest; so does a useless score
  assert big['llc'][0] == pytest.approx(1 - is_ood.mean(), abs=0.02)
  assert big['noise'][0] == pytest.approx(1 - is_ood.mean(), abs=0.03)
  assert rows[0]['sep'][0] > 0.8                                # 10 samples: already close


def test_markdown_states_the_trivial_baselines_and_flags_an_llc_that_never_matches():
  """Issue 28 point 4: LLC says 'no match' for 99.9% of in-distribution images, so its
  detection accuracy is the pool's OOD share, which the table now states beside 'nothing
  OOD'; a note names the no-match rate, and another each column (LLC, a noise score) that
  never beats a constant answer by a point; a separable score gets no note."""
  rng = np.random.default_rng(0)
  is_ood = rng.random(2000) < 0.3
  flags = is_ood | (rng.random(2000) < 0.999)
  separable = np.where(is_ood, rng.uniform(0, 0.4, 2000), rng.uniform(0.6, 1, 2000))
  rows = ood.compare(flags, {'msp_det': separable, 'msp_llc': rng.random(2000)}, is_ood,
                     sizes=(100, 1000), repeats=3)
  share = is_ood.mean()
  assert rows[-1]['llc'][0] == pytest.approx(share, abs=0.01)   # the everything-OOD answer
  record = {'pool': {'in_distribution': int((~is_ood).sum()), 'ood': int(is_ood.sum())},
            'llc_no_match_rate': {'in_distribution': float(flags[~is_ood].mean()),
                                  'ood': 1.0}, 'rows': rows}
  text = ood.markdown(record)
  assert (f'trivial baselines: everything OOD {100 * share:.2f}, nothing OOD '
          f'{100 * (1 - share):.2f}') in text
  assert f'note: LLC finds no matching class code for {100 * flags[~is_ood].mean():.1f}%' in text
  assert 'note: llc never beats a constant answer' in text
  assert 'note: msp_llc never beats a constant answer' in text
  assert 'msp_det never' not in text


def test_hold_out_classes_partitions_seeded_and_checks_fraction():
  c = base.hold_out_classes(resolved_config('llc_caltech101.py', 'phase=1'), 0.25)
  assert c.dataset.num_classes == 76 and len(c.dataset.ood_classes) == 25
  assert sorted(c.dataset.classes + c.dataset.ood_classes) == list(range(101))
  again = resolved_config('llc_caltech101.py', 'det,ood=0.25')   # after the data's K = 101
  assert again.dataset.classes == c.dataset.classes and again.model.head == 'softmax'
  with pytest.raises(ValueError, match='at least one class'):
    base.hold_out_classes(resolved_config('llc_cifar10.py', 'phase=1'), 0.99)
  with pytest.raises(ValueError, match='ood=F'):
    ood.heldout_config(resolved_config('llc_cifar10.py', 'phase=1'))


def test_digits_end_to_end_against_the_workdirs_own_evaluations(tmp_path):
  from input_pipeline.sources import _digits
  from llc.evaluate import evaluate_llc
  from launch.train import train_and_evaluate
  from tests.test_llc_heads import _digits_config

  def config(head, **kwargs):
    c = base.hold_out_classes(_digits_config(head, **kwargs), 0.3)
    c.eval.max_examples = 0
    return c

  p1, p2, det = (str(tmp_path / d) for d in ('p1', 'p2', 'det'))
  p1_config = config('llc_codebook', bits=6, label_smoothing=0.1)
  train_and_evaluate(p1_config, p1)
  evaluate_llc(p1_config, p1)
  p2_config = config('llc_instance')
  phases.configure(p2_config, {'phase': 2, 'bits': 6, 'phase1': p1}, default_bits=6)
  train_and_evaluate(p2_config, p2)
  det_config = config('softmax')
  train_and_evaluate(det_config, det)

  with pytest.raises(ValueError, match='needs --det_config'):
    ood.evaluate_ood(p2_config, p2, None, det)
  with pytest.raises(ValueError, match='different dataset.classes'):
    other = base.hold_out_classes(_digits_config('softmax'), 0.3, seed=1)
    ood.evaluate_ood(p2_config, p2, other, det)

  record = ood.evaluate_ood(p2_config, p2, det_config, det, repeats=3)
  (_, train_labels), (_, test_labels), _ = _digits()
  held = list(p2_config.dataset.ood_classes)
  assert len(held) == 3 and record['num_classes'] == 7
  assert record['pool'] == {
      'in_distribution': int(np.isin(test_labels, p2_config.dataset.classes).sum()),
      'ood': int(np.isin(train_labels, held).sum() + np.isin(test_labels, held).sum())}
  # the in-distribution part is the workdirs' own eval split, evaluated by other code paths
  own = evaluate_llc(p2_config, p2)
  assert record['llc_no_match_rate']['in_distribution'] == pytest.approx(own['ed_no_match_rate'])
  assert record['in_distribution_accuracy']['llc_logits'] == pytest.approx(own['logit_accuracy'])
  with open(os.path.join(det, 'eval_results.json')) as f:
    det_accuracy = json.load(f)['accuracy']
  assert record['in_distribution_accuracy']['det'] == pytest.approx(det_accuracy, abs=1e-6)
  assert [r['n'] for r in record['rows']] == [n for n in ood.SIZES if n < sum(
      record['pool'].values())]
  for row in record['rows']:
    for name in ('llc', 'msp_llc', 'msp_det'):
      assert 0 <= row[name][0] <= 1
  ood.plot(record, str(tmp_path / 'ood.png'))
  assert os.path.getsize(tmp_path / 'ood.png') > 1000
  lines = ood.markdown(record).splitlines()   # header, rule, a line per n, the baselines
  assert sum(line.startswith('| ') for line in lines) == len(record['rows']) + 1
  assert lines[len(record['rows']) + 2].startswith('trivial baselines: everything OOD')
