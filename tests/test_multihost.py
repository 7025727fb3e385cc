"""Two real JAX processes on this machine (jax.distributed over CPU, 2 devices each).

Checks that global batches assemble from each process's own shard (the per-step losses equal a
one-process run over the same 4 devices), that a 2-process checkpoint (model + both iterator
states) resumes with the same batches, and that eval counts every example once.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_main

ARGS = ['--config=configs/quickstart.py:runlocal', '--config.optimizer.schedule=constant',
        '--config.train.async_checkpointing=False', '--config.train.checkpoint_every=2']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, *args):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS='--xla_force_host_platform_device_count=2',
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'launch.main', *ARGS, f'--workdir={workdir}', *args], cwd=ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def test_two_processes_match_one_and_resume(tmp_path):
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  reference = json.loads(run_main(*ARGS, f'--workdir={single}', '--config.train.num_steps=4',
                                  devices=4).stdout.strip().splitlines()[-1])

  first = _run_two_processes(multi, '--config.train.num_steps=2')
  assert first[0] == first[1]  # both processes agree on the global eval
  data_states = os.listdir(multi / 'checkpoints' / '2' / 'data')
  assert sum('process_' in name for name in data_states) == 2, data_states

  resumed = _run_two_processes(multi, '--config.train.num_steps=4')
  assert resumed[0]['num_examples'] == reference['num_examples'] == 64
  assert resumed[0]['nll'] == pytest.approx(reference['nll'], rel=1e-4)
  want, got = _losses(single), _losses(multi)
  assert sorted(got) == [1, 2, 3, 4]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-4), step
