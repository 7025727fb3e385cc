"""Baseline codebooks (random, SVD, CCA) and warm-start values for LLC phase 1."""
from typing import Optional

import numpy as np


def random_codebook(num_classes: int, bits: int, seed: int) -> np.ndarray:
  """Boolean [L, k] codebook: sign of N(0, 1) draws from a seeded generator."""
  return np.random.default_rng(seed).standard_normal((num_classes, bits)) > 0


def fix_column_signs(directions: np.ndarray) -> np.ndarray:
  """Flips each column so its largest-magnitude entry is positive (SVD signs are arbitrary)."""
  rows = np.argmax(np.abs(directions), axis=0)
  signs = np.sign(directions[rows, np.arange(directions.shape[1])])
  return directions * np.where(signs == 0, 1.0, signs)


def svd_directions(weight, bits: int) -> np.ndarray:
  """Top-k left singular vectors U[:, :k] [L, k] of a classifier weight W [L, D] = U S V^T."""
  weight = np.asarray(weight, np.float64)
  if bits > min(weight.shape):
    raise ValueError(f'bits={bits} exceeds rank bound {min(weight.shape)}')
  u, _, _ = np.linalg.svd(weight, full_matrices=False)
  return fix_column_signs(u[:, :bits])


def svd_codebook(weight, bits: int) -> np.ndarray:
  """Boolean [L, k] codebook sign(U[:, :k]) of W = U S V^T (column signs fixed by
  `fix_column_signs`)."""
  return svd_directions(weight, bits) > 0


def inverse_sqrt(cov: np.ndarray, ridge: float) -> np.ndarray:
  """(C + ridge * mean(diag C) * I)^(-1/2) of a symmetric PSD matrix."""
  cov = cov + ridge * np.mean(np.diag(cov)) * np.eye(cov.shape[0])
  vals, vecs = np.linalg.eigh(cov)
  return (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T


def cca_directions(features, labels, num_classes: int, bits: int,
                   ridge: float = 1e-3) -> np.ndarray:
  """Top-k label-side canonical directions [L, k] between features [N, D] and one-hot labels.

  Both sides are centred and whitened with a relative ridge; the directions are
  Cyy^(-1/2) Q[:, :k] where P S Q^T is the SVD of Cxx^(-1/2) Cxy Cyy^(-1/2).
  """
  x = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  n = x.shape[0]
  x = x - x.mean(axis=0)
  freq = np.bincount(labels, minlength=num_classes) / n
  cov_xx = x.T @ x / n
  cov_yy = np.diag(freq) - np.outer(freq, freq)
  class_sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(class_sums, labels, x)
  cov_xy = class_sums.T / n                       # X^T (Y - mean Y) / n with X centred
  white_x, white_y = inverse_sqrt(cov_xx, ridge), inverse_sqrt(cov_yy, ridge)
  _, _, qt = np.linalg.svd(white_x @ cov_xy @ white_y, full_matrices=False)
  if bits > qt.shape[0]:
    raise ValueError(f'bits={bits} exceeds {qt.shape[0]} canonical directions')
  return fix_column_signs(white_y @ qt[:bits].T)


def cca_codebook(features, labels, num_classes: int, bits: int,
                 ridge: float = 1e-3) -> np.ndarray:
  """Boolean [L, k] codebook: sign of the top-k label-side CCA directions."""
  return cca_directions(features, labels, num_classes, bits, ridge) > 0


def warm_start_values(bits_or_real, bits: int, seed: Optional[int] = 0) -> np.ndarray:
  """Real [L, k] phase-1 codebook init from a baseline, with std sqrt(2/k) and signs kept.

  Real input (e.g. `svd_directions`) keeps its relative magnitudes and is rescaled; boolean input
  gets magnitudes |N(0, 1)| from a seeded generator, then the same rescaling.
  """
  values = np.asarray(bits_or_real)
  if values.ndim != 2 or values.shape[1] != bits:
    raise ValueError(f'expected [L, {bits}], got {values.shape}')
  if values.dtype == np.bool_:
    magnitude = np.abs(np.random.default_rng(seed).standard_normal(values.shape))
    values = np.where(values, magnitude, -magnitude)
  values = values.astype(np.float64)
  std = values.std()
  if std == 0:
    raise ValueError('cannot rescale an all-zero codebook')
  return (values * (np.sqrt(2.0 / bits) / std)).astype(np.float32)
