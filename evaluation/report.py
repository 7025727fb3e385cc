"""Writes an evaluation's results: `eval_results.json` and a reliability diagram PNG."""
import json
import os

import jax

from evaluation.calibration import save_reliability_diagram


def write_eval_report(workdir: str, step: int, metrics: dict, bins: dict) -> dict:
  """Returns the record written: {'step', **metrics, 'reliability_diagram'}."""
  record = {'step': int(step), **metrics}
  if jax.process_index() == 0:
    png = os.path.join(workdir, f'reliability_step{step}.png')
    top1 = ('prec@1', metrics['prec@1']) if 'prec@1' in metrics else ('accuracy',
                                                                         metrics['accuracy'])
    save_reliability_diagram(bins, png, f'step {step}: {top1[0]} {top1[1]:.4f}, '
                                        f'ECE {metrics["ece"]:.4f}')
    record['reliability_diagram'] = png
    with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
      json.dump(record, f, indent=1)
  return record
