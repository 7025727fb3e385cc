r"""Out-of-distribution detection for every head: scores, AUROC, AUPR, FPR at 95% TPR.

  python -m evaluation.ood --workdir=det=/tmp/w/det,hetxl=/tmp/w/hetxl,soc=/tmp/w/soc \
      --ood=heldout --ood=caltech101=.data/caltech101 [--max_examples=N] [--out=/tmp/ood.json]

Each workdir is restored with its saved config (`training.workdir.load_config`).
In-distribution data: its eval split. Out-of-distribution data, per `--ood`: `heldout` = the
eval split of the classes the config held out of training (`dataset.ood_classes`, config
argument `ood=F`); `NAME=DIR` = the eval split of the prepared dataset at DIR, every class,
resized to the model's input size.

Scores (higher = more likely OOD), every head: `msp` (minus the max softmax probability;
sigmoid heads' probabilities normalised to sum to 1, as the evaluator does), `entropy` of that
distribution (nats), `max_logit` (minus the largest logit; Hendrycks et al. 2022); plus the
head's own (`head.ood_scores`, heads/base.py): HET / HET-XL `mc_entropy`, SOC
`max_log_density`, LLC `llc_no_match`. Metrics, OOD as the positive class, as
uncertainty-baselines reports them: AUROC (sklearn `roc_auc_score`), AUPR
(`average_precision_score`, OOD positive) and FPR95 (the fraction of in-distribution examples
flagged at the highest threshold that flags >= 95% of the OOD examples). Prints one markdown
table (a line per head and OOD set, a column per score) and writes the rows as JSON to `--out`.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from evaluation.collect import collect, prepared_dataset
from heads.base import probabilities
from training.json_file import write_json


SHARED = ('msp', 'entropy', 'max_logit')   # the scores every head has (`logit_scores`)


def logit_scores(link: str, logits: jax.Array) -> dict:
  """The OOD scores every head shares, [B] each, higher = more likely OOD: 'msp', 'entropy',
  'max_logit' (module docstring)."""
  logits = logits.astype(jnp.float32)
  p = probabilities(link, logits)
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return {'msp': -p.max(-1), 'entropy': entropy, 'max_logit': -logits.max(-1)}


def all_scores(module, images: jax.Array) -> dict:
  """Every OOD score of the bound Classifier `module` on uint8 images (for `collect`)."""
  features = module.features(images, train=False)
  logits = module.head(features, train=False).logits
  return {**logit_scores(module.head.link, logits),
          **module.head.ood_scores(features, logits)}


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
  """Fraction of in-distribution scores >= t, for the largest t with at least `tpr` of the OOD
  scores >= t (OOD positive, higher score = more OOD)."""
  out_sorted = np.sort(np.asarray(out_scores, np.float64))[::-1]
  t = out_sorted[int(np.ceil(tpr * len(out_sorted))) - 1]
  return float(np.mean(np.asarray(in_scores, np.float64) >= t))


def detection_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict:
  """{'auroc', 'aupr', 'fpr95'} of telling `out_scores` (positive) from `in_scores`."""
  from sklearn.metrics import average_precision_score, roc_auc_score
  y = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
  s = np.concatenate([in_scores, out_scores]).astype(np.float64)
  return {'auroc': float(roc_auc_score(y, s)), 'aupr': float(average_precision_score(y, s)),
          'fpr95': fpr_at_tpr(in_scores, out_scores)}


def ood_dataset(config: ml_collections.ConfigDict, spec: str) -> tuple:
  """(name, dataset config, whether to resize to the model's input) of one `--ood` value
  (module docstring). Raises ValueError for a malformed value or nothing held out."""
  ds = ml_collections.ConfigDict(config.dataset.to_dict())
  ds.label_noise, ds.ood_classes = 0.0, ()
  if spec == 'heldout':
    if not config.dataset.ood_classes:
      raise ValueError('--ood=heldout: the config holds out no classes; train with the config '
                       'argument ood=F (e.g. ood=0.2), or give --ood=NAME=DIR')
    ds.classes, ds.num_classes = tuple(config.dataset.ood_classes), len(config.dataset.ood_classes)
    return 'heldout', ds, False
  name, sep, path = spec.partition('=')
  if not sep or not name or not path:
    raise ValueError(f"--ood={spec!r}: use 'heldout' or NAME=DIR (a prepared dataset)")
  return name, prepared_dataset(config, path), True


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, specs: Sequence[str],
                     max_examples: int = 0) -> list[dict]:
  """Rows {'ood', 'score', 'auroc', 'aupr', 'fpr95', 'num_in', 'num_out'} for one workdir."""
  from evaluation.from_checkpoint import restore_checkpoint
  from input_pipeline.sources import Subset, build_source
  datasets = [ood_dataset(config, spec) for spec in specs]   # fail before restoring
  exp, variables, step = restore_checkpoint(config, workdir)
  if not hasattr(exp.model.head, 'ood_scores'):
    raise ValueError(f'head {config.model.head!r} has no ood_scores method (the head contract, '
                     'heads/base.py): it cannot be scored for OOD detection')
  scores_in = collect(exp, variables, all_scores)
  rows = []
  for name, ds, resize in datasets:
    source, _ = build_source(ds, ds.eval_split, config.seed, train=False)
    if max_examples:
      source = Subset(source, max_examples)
    scores_out = collect(exp, variables, all_scores, source,
                         image_size=exp.image_shape[0] if resize else None)
    own = sorted(k for k in scores_in if k not in SHARED + ('label',))
    for score in SHARED + tuple(own):
      rows.append({'ood': name, 'score': score, 'step': int(step),
                   'num_in': len(scores_in[score]), 'num_out': len(scores_out[score]),
                   **detection_metrics(scores_in[score], scores_out[score])})
  return rows


def table(rows: list[dict]) -> str:
  """Markdown, one line per (head, OOD data): AUROC / AUPR / FPR95 of each shared score and
  of the head's own; then what a cell means and its trivial baseline, and notes on what the
  numbers cannot say by themselves (`notes`)."""
  groups = {}
  for r in rows:
    groups.setdefault((r['head'], r['ood']), {})[r['score']] = r
  cell = lambda r: (f"{r['auroc']:.3f}{' (reversed)' if r['auroc'] < 0.5 else ''} / "
                    f"{r['aupr']:.3f} / {r['fpr95']:.3f}")
  lines = ['| head | OOD data | in / out | chance AUPR | ' + ' | '.join(SHARED) +
           ' | own score |', '|---|---|---|---|' + '---|' * (len(SHARED) + 1)]
  for (head, data), scores in groups.items():
    own = [f'{k}: {cell(r)}' for k, r in scores.items() if k not in SHARED]
    first = next(iter(scores.values()))
    lines.append(f"| {head} | {data} | {first['num_in']} / {first['num_out']} | "
                 f"{chance_aupr(first):.3f} | " +
                 ' | '.join(cell(scores[k]) for k in SHARED) + f" | {'; '.join(own) or '-'} |")
  legend = ('cells: AUROC / AUPR / FPR95, OOD positive. A random score (chance) '
            'has AUROC 0.500, FPR95 0.950 and AUPR the OOD share of the pool ("chance AUPR").')
  return '\n'.join([legend, *lines, *(f'note: {n}' for n in notes(rows))])


def chance_aupr(row: dict) -> float:
  """The AUPR of a random score (its expectation): the OOD share of the pool."""
  return row['num_out'] / (row['num_in'] + row['num_out'])


def notes(rows: list[dict]) -> list[str]:
  """What `table`'s cells cannot say by themselves: scores that run backwards (AUROC < 0.5:
  the in-distribution images score as more OOD; the flipped score's AUROC is 1 - AUROC) and
  scores whose cells coincide (they order the examples the same way)."""
  out, groups = [], {}
  for r in rows:
    groups.setdefault((r['head'], r['ood']), []).append(r)
  for (head, data), group in groups.items():
    backwards = [f"{r['score']} ({r['auroc']:.3f})" for r in group if r['auroc'] < 0.5]
    if backwards:
      out.append(f'{head} on {data}: AUROC < 0.5 for {", ".join(backwards)}: the score runs '
                 'backwards, these in-distribution images look more OOD than the OOD ones '
                 '(flipped, it would reach 1 - AUROC; 0.000 is a full separation the other way '
                 'round)')
    same = {}
    for r in group:
      same.setdefault((r['auroc'], r['aupr'], r['fpr95']), []).append(r['score'])
    for names in same.values():
      if len(names) > 1:
        out.append(f'{head} on {data}: {" = ".join(names)}, identical cells: the scores order '
                   'the examples the same way (e.g. HET / HET-XL logits are log MC-mean '
                   'probabilities, so max_logit ranks as msp and entropy is mc_entropy)')
  return out


def main(argv) -> None:
  del argv
  from training.workdir import load_config
  rows = []
  for entry in _WORKDIRS.value:
    head, sep, workdir = entry.partition('=')
    if not sep:
      head, workdir = entry.rstrip('/').rsplit('/', 1)[-1], entry
    config = load_config(workdir)
    if _MAX.value:
      config.eval.max_examples = _MAX.value
    rows += [{'head': head, **r} for r in evaluate_workdir(config, workdir, _OOD.value,
                                                            _MAX.value)]
  if jax.process_index() == 0:
    print(table(rows), flush=True)
    if _OUT.value:
      write_json(_OUT.value, rows)


if __name__ == '__main__':
  from absl import flags
  _WORKDIRS = flags.DEFINE_list('workdir', None, 'trained workdirs, NAME=DIR or DIR')
  _OOD = flags.DEFINE_multi_string('ood', ['heldout'], "'heldout' or NAME=DIR (prepared data)")
  _MAX = flags.DEFINE_integer('max_examples', 0, 'examples per split at most (0: all)')
  _OUT = flags.DEFINE_string('out', '', 'write the rows as JSON here')
  flags.mark_flags_as_required(['workdir'])

  from training import cli   # quiet library logs; a ValueError here is a user's mistake: one line
  cli.run(main, {}, user_errors_too=(ValueError,))
