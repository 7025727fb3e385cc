"""Two real JAX processes on this machine (jax.distributed over CPU, 2 devices each).

Checks that global batches assemble from each process's own shard (the per-step losses equal a
one-process run over the same 4 devices), that a 2-process checkpoint (model + both iterator
states) resumes with the same batches, that eval counts every example once, and that the LLC
tools (llc.evaluate, llc.ood) give the same records on 2 processes as on 1.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, last_json, run_main, run_module, xla_flags

ARGS = ['--config=configs/quickstart.py:runlocal', '--config.optimizer.schedule=constant',
        '--config.train.async_checkpointing=False', '--config.train.checkpoint_every=2']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two_processes(module, *args):
  """stdouts of `python -m MODULE ARGS` run as processes 0 and 1 of one JAX job."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS=xla_flags(2),
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def _train_two_processes(workdir, *args):
  outs = _run_two_processes('launch.main', *ARGS, f'--workdir={workdir}', *args)
  return [last_json(out) for out in outs]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def test_two_processes_match_one_and_resume(tmp_path):
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  reference = json.loads(run_main(*ARGS, f'--workdir={single}', '--config.train.num_steps=4',
                                  devices=4).stdout.strip().splitlines()[-1])

  first = _train_two_processes(multi, '--config.train.num_steps=2')
  assert first[0] == first[1]  # both processes agree on the global eval
  data_states = os.listdir(multi / 'checkpoints' / '2' / 'data')
  assert sum('process_' in name for name in data_states) == 2, data_states

  resumed = _train_two_processes(multi, '--config.train.num_steps=4')
  assert resumed[0]['num_examples'] == reference['num_examples'] == 64
  assert resumed[0]['nll'] == pytest.approx(reference['nll'], rel=1e-4)
  want, got = _losses(single), _losses(multi)
  assert sorted(got) == [1, 2, 3, 4]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-4), step


LLC_CONFIG = """
import ml_collections
from configs import base, quickstart
from configs import llc_phases as phases

def get_config(arg=None):
  c = quickstart.get_config('runlocal')
  c.model.head_kwargs = ml_collections.ConfigDict()
  c.train.num_steps = c.train.checkpoint_every = 30
  c.train.async_checkpointing = False
  c.eval.max_examples = 0
  return phases.configure(c, base.parse_arg(arg, **phases.ARGS), default_bits=6)
"""


def test_llc_evaluate_and_ood_on_two_processes_equal_one(tmp_path):
  """llc.evaluate (phase 2, retrieval included) and llc.ood give the same records on 2 processes
  x 2 devices as on 1 process x 4 devices: each process reads its share, nothing is counted
  twice or lost."""
  config = tmp_path / 'llc_digits.py'
  config.write_text(LLC_CONFIG)
  p1, p2 = tmp_path / 'p1', tmp_path / 'p2'
  a1, a2 = 'phase=1,bits=6,ood=0.3', f'phase=2,bits=6,ood=0.3,phase1={p1}'
  c2 = f'--config={config}:{a2}'
  # The two workdirs are made in this process (the comparison below is what runs twice).
  from launch.train import train_and_evaluate
  from llc.evaluate import evaluate_llc
  namespace = {}
  exec(LLC_CONFIG, namespace)
  phase1 = namespace['get_config'](a1)
  train_and_evaluate(phase1, str(p1))
  evaluate_llc(phase1, str(p1))                      # exports p1/codebook.npy
  train_and_evaluate(namespace['get_config'](a2), str(p2))

  from configs.base import hold_out_classes
  from configs.quickstart import get_config
  from input_pipeline.sources import _digits
  (_, train_labels), (_, test_labels), _ = _digits()
  kept = hold_out_classes(get_config(), 0.3).dataset.classes
  evaluate = ('llc.evaluate', c2, f'--workdir={p2}', '--retrieval_topk=20')
  one = last_json(run_module(*evaluate, devices=4).stdout)
  two = [last_json(out) for out in _run_two_processes(*evaluate)]
  assert one['num_examples'] == np.isin(test_labels, kept).sum()
  assert one['retrieval_database'] == np.isin(train_labels, kept).sum()
  assert two[0] == two[1] == one

  ood = ('llc.ood', c2, f'--workdir={p2}', '--repeats=3')
  run_module(*ood, f'--out={tmp_path / "one"}', devices=4)
  outs = _run_two_processes(*ood, f'--out={tmp_path / "two"}')
  assert ['| n tuning samples |' in out for out in outs] == [True, False]  # process 0 reports
  records = [json.loads((tmp_path / d / 'ood.json').read_text()) for d in ('one', 'two')]
  assert records[0] == records[1]
  held_out = (~np.isin(train_labels, kept)).sum() + (~np.isin(test_labels, kept)).sum()
  assert records[0]['pool'] == {'in_distribution': one['num_examples'], 'ood': held_out}
