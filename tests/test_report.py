"""The eval report and the run tables (evaluation/report.py, benchmarks/own_data.py): the
reliability diagram names its run; the side-by-side table states the uniform guess and flags
near-chance runs; the own-data table names LLC's decodings."""
import math

import numpy as np
import pytest

from evaluation import report
from evaluation.calibration import bin_statistics, expected_calibration_error


def test_side_by_side_states_the_uniform_guess_and_flags_a_near_chance_run():
  """Issue 28 point 4: a 10-class run at accuracy 0.12 with ECE 0.01 looks calibrated; the
  table's last row is the uniform guess (accuracy 0.1, NLL log 10, ECE 0: checked against
  the calibration code on a uniform predictor), and a note names the near-chance run."""
  k, n = 10, 1000
  rng = np.random.default_rng(0)
  labels = rng.integers(0, k, n)
  prediction = rng.integers(0, k, n)   # a uniform guess, confidence 1/K
  bins = bin_statistics(np.full(n, 1 / k), (prediction == labels).astype(float), 15)
  assert expected_calibration_error(bins) == pytest.approx(abs(np.mean(prediction == labels)
                                                               - 1 / k))
  results = {'det': {'step': 5, 'num_examples': n, 'accuracy': 0.9, 'nll': 0.3, 'ece': 0.05},
             'hetxl': {'step': 5, 'num_examples': n, 'accuracy': 0.12, 'nll': 2.29,
                       'ece': 0.01}}
  lines = report.side_by_side(results, num_classes=k).splitlines()
  chance = [c.strip() for c in lines[4].split('|')[1:-1]]
  assert chance == ['chance (uniform 1/10)', '-', '-', '0.1000', f'{math.log(k):.4f}', '0.0000']
  assert lines[5].startswith('note: near chance (accuracy < 2/10): hetxl; compare their NLL '
                             'and ECE with the uniform guess')
  assert len(lines) == 6   # det is not flagged
  assert len(report.side_by_side(results).splitlines()) == 4   # K unknown: no baseline


def test_reliability_diagram_title_names_the_run(tmp_path, monkeypatch):
  titles = []
  monkeypatch.setattr(report, 'save_reliability_diagram',
                      lambda bins, path, title: titles.append(title))
  (tmp_path / 'mine' / 'hetxl').mkdir(parents=True)
  report.write_eval_report(str(tmp_path / 'mine' / 'hetxl') + '/', 7,
                           {'accuracy': 0.5, 'nll': 1.0, 'ece': 0.25}, {})
  assert titles == ['hetxl, step 7: accuracy 0.5000, ECE 0.2500']


def test_own_data_benchmark_table_names_llc_decodings():
  """Issue 28 point 4: the own-data run table showed LLC phase 2's logit accuracy as its
  accuracy; it now names phase 2's exact and min-Hamming decodings and phase 1's class-code
  accuracy."""
  from tests.helpers import load_benchmark
  own_data = load_benchmark('own_data')
  rows = [{'command': 'train det', 'step': 4, 'accuracy': 0.5, 'nll': 1.25, 'seconds': 3.0},
          {'command': 'llc.evaluate phase 1', 'class_code_accuracy': 0.25, 'seconds': 1.0},
          {'command': 'llc.evaluate phase 2', 'ed_strict_accuracy': 0.125, 'mhd_accuracy': 0.375,
           'logit_accuracy': 0.5, 'seconds': 2.0}]
  assert own_data.table(rows).splitlines()[2:] == [
      '| train det | 4 | 0.500 | 1.250 | 3.0 |',
      '| llc.evaluate phase 1 |  | class codes 0.250 |  | 1.0 |',
      '| llc.evaluate phase 2 |  | ED 0.125 / MHD 0.375 (logits 0.500) |  | 2.0 |']
