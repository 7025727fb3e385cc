r"""Taxonomy of a codebook: average-linkage clustering of the class codes by Hamming distance.

  python -m llc.taxonomy --codebook=P1/codebook.npy --config=configs/llc_cifar10.py:phase=1,bits=7 \
      --out=tax.png [--superclasses=cifar10]

Draws the dendrogram (class names as leaves) to `--out` as a PNG. With `--superclasses`, cuts the
tree into as many clusters as there are superclasses and reports how well the cut agrees with
them (adjusted Rand index, purity). The codebook is a phase-1 `codebook.npy` (real [L, k], codes
= its signs, > 0; boolean files too); `--config` only supplies the class names of its dataset.
Prints one JSON line: classes, bits, unique codes, the image path and the agreement.
"""
import json
import os
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.cluster import hierarchy

from llc.codes import as_bool, unique_codes

# Superclass of each class name, per dataset.
SUPERCLASSES = {
    'cifar10': {
        'airplane': 'vehicle', 'automobile': 'vehicle', 'ship': 'vehicle', 'truck': 'vehicle',
        'bird': 'animal', 'cat': 'animal', 'deer': 'animal', 'dog': 'animal', 'frog': 'animal',
        'horse': 'animal',
    },
}
INCHES_PER_CLASS = 0.16   # leaf spacing of the drawn tree: ~101 classes fit a 17-inch page
LEAF_FONT_SIZE = 7


def codebook_linkage(class_bits) -> np.ndarray:
  """scipy linkage matrix [L - 1, 4] of the class codes [L, k]: average linkage, Hamming metric.

  Merge heights (column 2) are average Hamming distances between clusters divided by k (scipy's
  'hamming' is the fraction of differing bits).
  """
  class_bits = as_bool(class_bits)
  if class_bits.shape[0] < 2:
    raise ValueError(f'clustering needs at least 2 classes, got {class_bits.shape[0]}')
  return hierarchy.linkage(class_bits, method='average', metric='hamming')


def draw_dendrogram(class_bits, names: Sequence[str], path: str, title: str = '') -> list[str]:
  """Draws the codebook's dendrogram (leaves = `names`, heights in bits) as a PNG at `path`.

  Horizontal tree, figure height proportional to the class count. Returns the leaf names from
  top to bottom as drawn.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  class_bits = as_bool(class_bits)
  num_classes, k = class_bits.shape
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} names for {num_classes} class codes')
  link = codebook_linkage(class_bits).copy()
  link[:, 2] *= k
  fig, ax = plt.subplots(figsize=(8, max(3.0, 1.0 + INCHES_PER_CLASS * num_classes)))
  tree = hierarchy.dendrogram(link, labels=list(names), orientation='left', ax=ax,
                              leaf_font_size=LEAF_FONT_SIZE, color_threshold=0)
  ax.set_xlabel(f'average Hamming distance between clusters (bits, of k = {k})')
  ax.set_title(title or f'{num_classes} classes, {k}-bit codes, '
               f'{unique_codes(class_bits)} unique', fontsize=9)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)
  return list(reversed(tree['ivl']))   # ivl runs bottom to top for a horizontal tree


def cut_agreement(class_bits, groups: Sequence) -> dict:
  """Agreement between known groups (one label per class) and the tree cut into as many clusters.

  The cut is scipy's fcluster(criterion='maxclust'), which can give fewer clusters on tied
  heights ('clusters' reports how many). Purity = fraction of classes in their cluster's most
  frequent group.
  """
  from sklearn.metrics import adjusted_rand_score
  groups = np.asarray(groups)
  if groups.shape != (as_bool(class_bits).shape[0],):
    raise ValueError(f'need one group per class: {groups.shape[0]} groups for '
                     f'{as_bool(class_bits).shape[0]} classes')
  _, group_ids = np.unique(groups, return_inverse=True)
  num_groups = int(group_ids.max()) + 1
  clusters = hierarchy.fcluster(codebook_linkage(class_bits), t=num_groups, criterion='maxclust')
  _, cluster_ids = np.unique(clusters, return_inverse=True)
  counts = np.zeros((cluster_ids.max() + 1, num_groups), np.int64)
  np.add.at(counts, (cluster_ids, group_ids), 1)
  return {'groups': num_groups, 'clusters': int(counts.shape[0]),
          'adjusted_rand_index': float(adjusted_rand_score(group_ids, cluster_ids)),
          'purity': float(counts.max(axis=1).sum() / len(group_ids))}


def superclass_labels(names: Sequence[str], superclasses: Mapping[str, str]) -> list[str]:
  """The superclass of each class name; fails on a name the map does not cover."""
  missing = [n for n in names if n not in superclasses]
  if missing:
    raise ValueError(f'the superclass map does not cover the classes {missing}')
  return [superclasses[n] for n in names]


def report(class_bits, names: Sequence[str], out: str,
           superclasses: Optional[Mapping[str, str]] = None) -> dict:
  """Draws the dendrogram to `out` and returns the summary (plus the agreement with
  `superclasses`, a {class name: superclass} map, when given)."""
  class_bits = as_bool(class_bits)
  if class_bits.ndim != 2:
    raise ValueError(f'a codebook is [classes, bits], got shape {class_bits.shape}')
  if class_bits.shape[0] != len(names):
    raise ValueError(f'the codebook has {class_bits.shape[0]} classes but the dataset has '
                     f'{len(names)} class names')
  groups = superclass_labels(names, superclasses) if superclasses is not None else None
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  record = {'classes': int(class_bits.shape[0]), 'bits': int(class_bits.shape[1]),
            'unique_codes': unique_codes(class_bits), 'path': os.path.abspath(out)}
  draw_dendrogram(class_bits, names, out)
  if groups is not None:
    record['agreement'] = cut_agreement(class_bits, groups)
  return record


def main(argv) -> None:
  del argv
  from input_pipeline.sources import build_source
  if not os.path.isfile(_CODEBOOK.value):
    sys.exit(f'error: codebook file {_CODEBOOK.value} does not exist')
  from training.resolve import resolve
  config = resolve(_CONFIG.value)
  names = build_source(config.dataset, config.dataset.eval_split, config.seed,
                       train=False)[1].class_names
  superclasses = SUPERCLASSES[_SUPER.value] if _SUPER.value else None
  try:
    record = report(np.load(_CODEBOOK.value) > 0, names, _OUT.value, superclasses)
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(json.dumps(record), flush=True)


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  _CODEBOOK = flags.DEFINE_string('codebook', None, 'codebook .npy [L, k] (e.g. P1/codebook.npy)')
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config whose dataset names the '
                                            'classes', lock_config=True)
  _OUT = flags.DEFINE_string('out', None, 'dendrogram PNG to write')
  _SUPER = flags.DEFINE_enum('superclasses', '', ['', *SUPERCLASSES],
                             'report the agreement of a cut with these known superclasses')
  flags.mark_flags_as_required(['codebook', 'config', 'out'])
  from training import cli
  cli.run(main, {})
