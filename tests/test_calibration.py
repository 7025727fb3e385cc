"""ECE against a direct numpy computation and known limits; the reliability diagram is drawn."""
import numpy as np

from evaluation.calibration import (bin_statistics, expected_calibration_error,
                                    save_reliability_diagram)


def _ece_reference(conf, correct, n_bins):
  ece = 0.0
  for b in range(n_bins):
    lo, hi = b / n_bins, (b + 1) / n_bins
    sel = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
    if sel.any():
      ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
  return ece


def test_ece_matches_reference():
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.1, 1.0, 1000)
  correct = (rng.uniform(size=1000) < conf ** 2).astype(float)
  got = expected_calibration_error(bin_statistics(conf, correct, 15))
  assert np.isclose(got, _ece_reference(conf, correct, 15))


def test_ece_limits_and_mask_weights():
  conf = np.full(100, 0.9)
  assert np.isclose(expected_calibration_error(bin_statistics(conf, np.ones(100), 10)), 0.1)
  correct = np.r_[np.ones(90), np.zeros(10)]
  assert np.isclose(expected_calibration_error(bin_statistics(conf, correct, 10)), 0.0)
  # Masked-out (padding) examples change nothing.
  conf2 = np.r_[conf, np.full(7, 0.2)]
  correct2 = np.r_[correct, np.ones(7)]
  weights = np.r_[np.ones(100), np.zeros(7)]
  assert np.isclose(expected_calibration_error(bin_statistics(conf2, correct2, 10, weights)), 0.0)


def test_reliability_diagram_png(tmp_path):
  rng = np.random.default_rng(1)
  bins = bin_statistics(rng.uniform(size=200), rng.integers(0, 2, 200).astype(float), 10)
  path = tmp_path / 'r.png'
  save_reliability_diagram(bins, str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
