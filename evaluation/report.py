"""Writes an evaluation's results (`eval_results.json` and a reliability diagram PNG) and
puts several runs' results side by side."""
import os
from typing import Mapping, Sequence

import jax

from evaluation.calibration import save_reliability_diagram
from training.json_file import write_json


def write_eval_report(workdir: str, step: int, metrics: dict, bins: dict) -> dict:
  """Writes `<workdir>/eval_results.json` and the reliability diagram PNG (process 0) and
  returns the record written: {'step', **metrics, 'reliability_diagram'} (no
  'reliability_diagram' on other processes)."""
  record = {'step': int(step), **metrics}
  if jax.process_index() == 0:
    png = os.path.join(workdir, f'reliability_step{step}.png')
    top1 = ('prec@1', metrics['prec@1']) if 'prec@1' in metrics else ('accuracy',
                                                                         metrics['accuracy'])
    save_reliability_diagram(bins, png, f'step {step}: {top1[0]} {top1[1]:.4f}, '
                                        f'ECE {metrics["ece"]:.4f}')
    record['reliability_diagram'] = png
    write_json(os.path.join(workdir, 'eval_results.json'), record)
  return record


def side_by_side(results: Mapping[str, Mapping],
                 keys: Sequence[str] = ('accuracy', 'nll', 'ece')) -> str:
  """A markdown table, one row per run in `results` ({name: eval record}, as
  `write_eval_report` returns and writes it): the run's name, step, number of examples and
  its `keys` to 4 decimals ('-' where a record lacks one)."""
  cell = lambda record, key: f'{record[key]:.4f}' if key in record else '-'
  rows = [['run', 'step', 'examples', *keys]]
  rows += [[name, str(r.get('step', '-')), str(r.get('num_examples', '-')),
            *(cell(r, k) for k in keys)] for name, r in results.items()]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  line = lambda row: '| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |'
  return '\n'.join([line(rows[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, rows[1:])])
