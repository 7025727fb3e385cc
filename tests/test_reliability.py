"""Nothing silently wrong, no bare tracebacks (issue 27): data that selects nothing, damaged
checkpoints and shards, a full disk, class lists that changed under a workdir, small command-line
mistakes. Each test is one of the issue's failing inputs, or another input of the same kind."""
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from launch import prepare_data
from launch.train import train_and_evaluate
from input_pipeline.sources import EmptySplitError
from tests.helpers import load_config
from training.cli import user_errors


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags


def _folder(root, classes_per_split, n=4, seed=0):
  """root/<split>/<class>/<i>.png: n random 8x8 gray images per class."""
  rng = np.random.default_rng(seed)
  for split, classes in classes_per_split.items():
    for c in classes:
      d = root / split / c
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), 'L').save(d / f'{i}.png')
  return root


def _prepare(folder, out):
  prepare_data.main(['--source=folder', f'--input_dir={folder}', f'--out={out}'])
  return out


def _config(data, steps=2, **fields):
  c = load_config('quickstart.py', f'data={data},runlocal')
  c.train.num_steps = steps
  c.train.async_checkpointing = False
  for key, value in fields.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


# ----- case 2: a selection with no examples -----------------------------------------------------

@pytest.fixture(scope='module')
def abc_data(tmp_path_factory):
  """Classes a, b, c (ids 0, 1, 2); 'c' has test images only, 'b' train images only."""
  root = tmp_path_factory.mktemp('abc')
  _folder(root / 'f', {'train': 'ab', 'test': 'ac'})
  return _prepare(root / 'f', root / 'd')


@pytest.mark.parametrize('classes, field, names', [
    ((2,), 'dataset.train_split', "'c'"),     # the issue's input: 'c' has no training images
    ((1,), 'dataset.eval_split', "'b'"),      # the same kind: 'b' has no test images
])
def test_a_class_selection_without_examples_stops_at_start_naming_the_split(abc_data, tmp_path,
                                                                            classes, field,
                                                                            names):
  c = _config(abc_data, **{'dataset.classes': classes})
  with pytest.raises(EmptySplitError) as err:
    train_and_evaluate(c, str(tmp_path))
  message = str(err.value)
  assert f'({field}) is empty' in message and f'dataset.classes={classes} ({names})' in message
  assert '\n' not in message and isinstance(err.value, user_errors())   # one `error:` line
  assert os.listdir(tmp_path) == []                  # stopped before writing anything


def test_a_split_of_skipped_records_stops_at_start(tmp_path):
  """The same kind without a class subset: every test image is unreadable, so prepare_data
  skips them all and writes an empty split."""
  _folder(tmp_path / 'f', {'train': 'ab', 'test': 'ab'})
  for image in (tmp_path / 'f' / 'test').glob('*/*.png'):
    image.write_bytes(b'not an image')
  data = _prepare(tmp_path / 'f', tmp_path / 'd')
  with pytest.raises(EmptySplitError, match=r"split 'test' .*\(dataset.eval_split\) is empty as "
                                            r'selected: it holds no examples'):
    train_and_evaluate(_config(data), str(tmp_path / 'w'))
