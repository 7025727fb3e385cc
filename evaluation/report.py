"""Writes an evaluation's results (`eval_results.json` and a reliability diagram PNG) and
puts several runs' results side by side."""
import math
import os
from typing import Mapping, Sequence

import jax

from evaluation.calibration import save_reliability_diagram
from training.json_file import write_json


def write_eval_report(workdir: str, step: int, metrics: dict, bins: dict) -> dict:
  """Writes `<workdir>/eval_results.json` and the reliability diagram PNG (process 0; its
  title names the run, the workdir's last component) and returns the record written:
  {'step', **metrics, 'reliability_diagram'} (no 'reliability_diagram' on other processes)."""
  record = {'step': int(step), **metrics}
  if jax.process_index() == 0:
    png = os.path.join(workdir, f'reliability_step{step}.png')
    top1 = ('prec@1', metrics['prec@1']) if 'prec@1' in metrics else ('accuracy',
                                                                         metrics['accuracy'])
    run = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    save_reliability_diagram(bins, png, f'{run}, step {step}: {top1[0]} {top1[1]:.4f}, '
                                        f'ECE {metrics["ece"]:.4f}')
    record['reliability_diagram'] = png
    write_json(os.path.join(workdir, 'eval_results.json'), record)
  return record


def side_by_side(results: Mapping[str, Mapping],
                 keys: Sequence[str] = ('accuracy', 'nll', 'ece'), num_classes: int = 0) -> str:
  """A markdown table, one row per run in `results` ({name: eval record}, as
  `write_eval_report` returns and writes it): the run's name, step, number of examples and
  its `keys` to 4 decimals ('-' where a record lacks one). With `num_classes` K (single-label
  runs), a last row is the trivial baseline, the uniform prediction 1/K (accuracy 1/K in
  expectation, NLL log K, ECE 0), and a note names the runs whose accuracy is below 2/K (near
  chance: a small ECE alone is then no sign of a useful model)."""
  cell = lambda record, key: f'{record[key]:.4f}' if key in record else '-'
  rows = [['run', 'step', 'examples', *keys]]
  rows += [[name, str(r.get('step', '-')), str(r.get('num_examples', '-')),
            *(cell(r, k) for k in keys)] for name, r in results.items()]
  single_label = num_classes > 1 and all('accuracy' in r for r in results.values())
  if single_label:
    chance = {'accuracy': 1 / num_classes, 'nll': math.log(num_classes), 'ece': 0.0}
    rows.append([f'chance (uniform 1/{num_classes})', '-', '-', *(cell(chance, k) for k in keys)])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  line = lambda row: '| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |'
  near = [name for name, r in results.items()
          if single_label and r['accuracy'] < 2 / num_classes]
  notes = [f'note: near chance (accuracy < 2/{num_classes}): {", ".join(near)}; compare their '
           'NLL and ECE with the uniform guess\'s, whose ECE is 0: a small ECE alone is no sign '
           'of a useful model'] if near else []
  return '\n'.join([line(rows[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, rows[1:]), *notes])
