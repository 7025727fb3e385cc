"""Expected calibration error from binned confidences, and the reliability diagram."""
import numpy as np


def bin_statistics(confidence: np.ndarray, correct: np.ndarray, num_bins: int,
                   weights: np.ndarray | None = None) -> dict:
  """Per-bin count, summed confidence and summed correctness; bins are [i/n, (i+1)/n)."""
  weights = np.ones_like(confidence) if weights is None else weights
  idx = np.clip((confidence * num_bins).astype(int), 0, num_bins - 1)
  return {'count': np.bincount(idx, weights, num_bins),
          'confidence': np.bincount(idx, weights * confidence, num_bins),
          'correct': np.bincount(idx, weights * correct, num_bins)}


def expected_calibration_error(bins: dict) -> float:
  """sum_b (n_b / N) |acc_b - conf_b| (Guo et al. 2017)."""
  total = bins['count'].sum()
  if total == 0:
    return 0.0
  return float(np.abs(bins['correct'] - bins['confidence']).sum() / total)


def save_reliability_diagram(bins: dict, path: str, title: str = '') -> None:
  """Accuracy vs confidence per bin, with the diagonal and the bin counts."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n = len(bins['count'])
  edges = np.linspace(0, 1, n + 1)
  count = np.maximum(bins['count'], 1e-12)
  acc, conf = bins['correct'] / count, bins['confidence'] / count
  has = bins['count'] > 0
  fig, (ax, ax2) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                gridspec_kw={'height_ratios': [3, 1]})
  ax.bar(edges[:-1][has], acc[has], width=1 / n, align='edge', edgecolor='k', label='accuracy')
  ax.bar(edges[:-1][has], (conf - acc)[has], bottom=acc[has], width=1 / n, align='edge',
         color='tab:red', alpha=0.3, label='gap to confidence')
  ax.plot([0, 1], [0, 1], 'k--', lw=1)
  ax.set_ylabel('accuracy')
  ax.set_title(title or f'ECE {expected_calibration_error(bins):.4f}')
  ax.legend(loc='upper left')
  ax2.bar(edges[:-1], bins['count'], width=1 / n, align='edge', edgecolor='k')
  ax2.set_xlabel('confidence')
  ax2.set_ylabel('examples')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
