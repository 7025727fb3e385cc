"""Scalars to TensorBoard event files and `metrics.jsonl` in the workdir (process 0 only)."""
import json
import os
import time
from typing import Mapping

import jax


class MetricWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), step)
    record = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()
