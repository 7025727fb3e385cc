"""Real sources through the trainer (tfds on disk, prepared Caltech-101), and preemption."""
import io
import json
import os
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.helpers import FAST_COMPILE, ROOT, load_config
from training.checkpointing import Checkpointer
from launch.train import train_and_evaluate

REAL_DATA = os.path.join(ROOT, '..', 'shared', 'data')


def _png(rng):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def test_tfds_data_source_trains(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  rng = np.random.default_rng(0)
  examples = {split: [_png(rng) for _ in range(16)] for split in ('train', 'test')}

  class TrainerFakeTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in examples}

    def _generate_examples(self, split):
      for i, data in enumerate(examples[split]):
        yield i, {'image': io.BytesIO(data), 'label': i % 3}

  TrainerFakeTfds(data_dir=str(tmp_path / 'tfds'), file_format='array_record'
                  ).download_and_prepare()
  c = load_config('quickstart.py', 'runlocal')
  c.dataset.name, c.dataset.tfds_name = 'tfds', 'trainer_fake_tfds'
  c.dataset.data_dir, c.dataset.num_classes, c.dataset.channels = str(tmp_path / 'tfds'), 3, 3
  c.train.num_steps = 1
  c.input.batch_size = c.input.eval_batch_size = 8
  result = train_and_evaluate(c, str(tmp_path / 'work'))
  assert result['num_examples'] == 16 and result['step'] == 1


def test_prepared_caltech101_trains(tmp_path):
  """The real Caltech-101 files, prepared by the project's own command, train the recipe's head
  (a small backbone: the backbones have their own tests)."""
  if not os.path.isdir(REAL_DATA):
    pytest.skip(f'real data folder {os.path.normpath(REAL_DATA)} is absent')
  subprocess.run([sys.executable, '-m', 'launch.prepare_data', '--source=caltech101_npz',
                  f'--input_dir={REAL_DATA}', f'--out={tmp_path / "caltech"}'], cwd=ROOT,
                 check=True, capture_output=True)
  c = load_config('compare_heads.py', 'dataset=caltech101,head=hetxl,runlocal')
  c.dataset.data_dir = str(tmp_path / 'caltech')
  c.model.backbone, c.model.backbone_kwargs = 'convnet', ml_collections.ConfigDict()
  result = train_and_evaluate(c, str(tmp_path / 'work'))
  assert result['step'] == 4 and result['num_examples'] == 64
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:   # HET-XL's learnt tau, every step
    taus = [r['head/temperature/temperature'] for r in map(json.loads, f) if 'loss' in r]
  assert len(taus) == 4 and all(0.05 < t < 5 for t in taus)


def test_sigterm_saves_and_the_rerun_resumes(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS=FAST_COMPILE)
  cmd = [sys.executable, '-m', 'launch.main', '--config=configs/quickstart.py',
         f'--workdir={tmp_path}', '--config.train.checkpoint_every=100000',
         '--config.train.log_every=1', '--config.train.num_steps=100000']
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('step 20/'):
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stdout.readlines()
  assert proc.wait(timeout=120) == 0
  saved = [l for l in lines if l.startswith('Preempted: saved step')]
  assert saved, lines[-5:]
  step = int(saved[0].split('saved step ')[1].split(';')[0])
  assert step >= 20
  assert Checkpointer(str(tmp_path), save_every=1, keep=1, read_only=True).latest_step() == step
  c = load_config('quickstart.py')
  c.train.num_steps = step + 1
  c.train.eval_every = 0
  assert train_and_evaluate(c, str(tmp_path))['step'] == step + 1
