r"""LLC evaluation of a trained workdir: export phase 1's codebook, decode phase 2's codes.

  python -m llc.evaluate --config=configs/llc_caltech101.py:phase=1,bits=10 --workdir=P1
  python -m llc.evaluate --config=configs/llc_caltech101.py:phase=2,bits=10,phase1=P1 \
      --workdir=P2 [--phase1_workdir=P1] [--step=N] [--retrieval_topk=R]

Restores the checkpoint (params + batch_stats only) and runs the eval split once.
Phase 1 (head `llc_codebook`): writes the real codebook C [L, k] to `P1/codebook.npy` (what
phase 2 reads; B = sign of it) and reports unique codes, the minimum Hamming distance between
class codes and the class-code accuracy (argmax of z @ B^T, z real); codes of two classes at
most 1 bit apart add a one-line `warning` (`llc.codes.close_codes_warning`), in phase 2 too.
Phase 2 (head `llc_instance`): instance code = (o >= 0); decodes against the codebook saved in
the checkpoint, or `--phase1_workdir`'s codebook.npy, and reports `llc.codes.llc_metrics`
(strict ED accuracy, lenient ED accuracy = the reference's rule, ambiguous / no-match rates, MHD
accuracy and tie rate, bits right, unique codes) plus `logit_accuracy` (argmax of the code
log-likelihood logits, what the shared evaluator's accuracy is). With `--retrieval_topk=R`
(phase 2), also MAP@R of Hamming ranking: eval-split codes as queries against the training
split's codes (un-augmented, clean labels) as the database (`llc.retrieval`), under both
protocols, labelled: `map@R` (strict: every query, AP 0 when its top R holds nothing relevant)
and `map@R_hashnet` (such queries dropped from the mean, as HashNet's evaluation code and the
LLC paper's comparison do), with `retrieval_queries_without_relevant`.
Without --config, the workdir's saved config.json is used (`configs.workdir`).
Prints one JSON line and writes it to `<workdir>/llc_eval.json`. On a cluster every process runs
the same command (as `launch.main`); each reads its share of the split, and process 0 writes.
"""
import json
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from evaluation.collect import collect
from evaluation.from_checkpoint import restore_checkpoint
from heads.base import INTERMEDIATES
from input_pipeline.sources import build_source
from training.distributed import initialize_distributed
from llc import codebook_io, codes, retrieval
from llc.heads import CLASS_CODES, CODES
from training.experiment import Experiment
from training.json_file import write_json

EVAL_FILE = 'llc_eval.json'
PHASES = {'llc_codebook': 1, 'llc_instance': 2}


def collect_codes(exp: Experiment, variables: dict, source: Any = None) -> dict:
  """One pass over the eval split (or `source`; `evaluation.collect.collect`): real codes
  [N, k] (z or o; absent for heads that sow none), argmax [N] and max softmax probability [N]
  of the logits, and labels [N], padding removed, in the source's order on any number of
  processes."""
  def per_batch(m, images):
    logits = m(images, train=False).logits
    sown = m.variables.get(INTERMEDIATES, {}).get('head', {}).get(CODES)
    return {'codes': None if sown is None else sown[0], 'prediction': logits.argmax(-1),
            'msp': jax.nn.softmax(logits.astype(jnp.float32)).max(-1)}
  return collect(exp, variables, per_batch, source)


def phase2_class_bits(config: ml_collections.ConfigDict, variables: dict,
                      phase1_workdir: Optional[str] = None) -> tuple[np.ndarray, str]:
  """(class codes [L, k] bool, where they came from) that a phase-2 model decodes against:
  `phase1_workdir`'s codebook.npy if given, else the checkpoint's fixed class codes."""
  if phase1_workdir:
    source = codebook_io.codebook_path(phase1_workdir)
    return (codebook_io.class_codes(source, config.dataset.num_classes,
                                    config.model.head_kwargs.bits) > 0, source)
  codes_pm1 = jax.device_get(variables['batch_stats']['head'][CLASS_CODES])
  return np.asarray(codes_pm1) > 0, 'checkpoint (batch_stats/head/class_codes)'


def _save_codebook(path: str, values: np.ndarray) -> None:
  if jax.process_index() == 0:
    tmp = path + '.tmp.npy'
    np.save(tmp, values)
    os.replace(tmp, path)


def evaluate_llc(config: ml_collections.ConfigDict, workdir: str,
                 phase1_workdir: Optional[str] = None, step: Optional[int] = None,
                 retrieval_topk: int = 0) -> dict:
  """Evaluates an LLC workdir (phase from the config's head); returns the record written."""
  phase = PHASES.get(config.model.head)
  if phase is None:
    raise ValueError(f'{config.model.head!r} is not an LLC head; llc.evaluate takes a config '
                     f'with model.head in {sorted(PHASES)}')
  if phase == 1 and (phase1_workdir or retrieval_topk):
    raise ValueError('--phase1_workdir and --retrieval_topk apply to phase-2 workdirs only')
  exp, variables, step = restore_checkpoint(config, workdir, step)
  num_classes, bits = config.dataset.num_classes, config.model.head_kwargs.bits
  out = collect_codes(exp, variables)
  record: dict[str, Any] = {'phase': phase, 'step': int(step), 'bits': bits,
                            'num_classes': num_classes, 'num_examples': int(len(out['label']))}
  if phase == 1:
    codebook = np.asarray(jax.device_get(variables['params']['head']['codebook']), np.float32)
    path = codebook_io.codebook_path(workdir)
    _save_codebook(path, codebook)
    class_bits = codebook > 0
    record.update(unique_codes=codes.unique_codes(class_bits),
                  min_class_distance=codes.min_class_distance(class_bits),
                  class_code_accuracy=float(np.mean(out['prediction'] == out['label'])),
                  codebook=path)
  else:
    class_bits, source = phase2_class_bits(config, variables, phase1_workdir)
    record.update(codes.llc_metrics(out['codes'] >= 0, out['label'], class_bits))
    record.update(min_class_distance=codes.min_class_distance(class_bits),
                  logit_accuracy=float(np.mean(out['prediction'] == out['label'])),
                  codebook=source)
    if retrieval_topk:
      database, _ = build_source(config.dataset, config.dataset.train_split, config.seed,
                                 train=False)
      db = collect_codes(exp, variables, database)
      aps, found = retrieval.average_precisions(out['codes'] >= 0, out['label'],
                                                db['codes'] >= 0, db['label'], retrieval_topk)
      # map@R: every query (AP 0 when nothing relevant is retrieved); map@R_hashnet: those
      # queries dropped from the mean, the HashNet protocol the LLC paper compares with.
      record[f'map@{retrieval_topk}'] = retrieval.map_from_aps(aps, found, 'strict')
      record[f'map@{retrieval_topk}_hashnet'] = retrieval.map_from_aps(aps, found, 'hashnet')
      record['retrieval_queries_without_relevant'] = int(np.sum(~found))
      record['retrieval_database'] = int(len(db['label']))
  warning = codes.close_codes_warning(class_bits)
  if warning:
    record['warning'] = warning
  write_json(os.path.join(workdir, EVAL_FILE), record)
  return record


def main(argv) -> None:
  del argv
  initialize_distributed()
  record = evaluate_llc(_CONFIG.value, _WORKDIR.value, _PHASE1.value or None, _STEP.value,
                        _TOPK.value)
  print(json.dumps(record), flush=True)
  if 'warning' in record and jax.process_index() == 0:
    print(f'warning: {record["warning"]}', file=sys.stderr, flush=True)


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'LLC experiment config file[:args]',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'the trained workdir to evaluate')
  _PHASE1 = flags.DEFINE_string('phase1_workdir', None,
                                'phase 2: decode against this phase-1 workdir\'s codebook.npy')
  _STEP = flags.DEFINE_integer('step', None, 'checkpoint step (default: latest)')
  _TOPK = flags.DEFINE_integer('retrieval_topk', 0, 'phase 2: MAP@R of test queries against '
                               'the training split (0: skip)')
  flags.mark_flags_as_required(['config', 'workdir'])
  from training import cli   # --config defaults to the workdir's config.json
  cli.run(main)
