"""Nothing silently wrong, no bare tracebacks (issue 27): data that selects nothing, damaged
checkpoints and shards, a full disk, class lists that changed under a workdir, small command-line
mistakes. Each test is one of the issue's failing inputs, or another input of the same kind."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from evaluation.from_checkpoint import evaluate_checkpoint
from launch import prepare_data
from launch.train import train_and_evaluate
from input_pipeline.sources import EmptySplitError, RecordSource, ShardReadError
from tests.helpers import load_config, run_main
from training.checkpointing import (Checkpointer, DamagedCheckpointError, DiskFullError,
                                    complete_steps, fingerprints)
from training.cli import set_kwargs_overrides, take_kwargs_overrides, user_errors
from training.experiment import Experiment
from training.resolve import ConfigError, resolve
from training.workdir import ClassListError


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


def test_a_class_selection_with_a_class_without_examples_is_warned_about(abc_data, caplog):
  from input_pipeline.sources import build_source
  c = _config(abc_data, **{'dataset.classes': (0, 2)})
  resolve(c, verbose=False)
  with caplog.at_level(logging.WARNING):
    source, _ = build_source(c.dataset, 'train', 0, train=True)
  assert len(source) == 4                            # the 4 training images of 'a'
  assert "has no examples of 1 of the classes in dataset.classes: 2 ('c')" in caplog.text


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


# ----- case 4: a damaged checkpoint ---------------------------------------------------------------

def _quickstart(steps, checkpoint_every=2):
  c = load_config('quickstart.py', 'runlocal')
  c.train.num_steps = steps
  c.train.checkpoint_every = checkpoint_every
  c.train.async_checkpointing = False
  return c


def _data_files(step_dir):
  """The OCDBT data files of a step's train state, the process's and the merged root's
  (`state/d`, whose b-tree nodes can hold small arrays inline): each holds some of its arrays
  (which ones varies from save to save), so the tests damage them all, as eval and resume
  read different arrays."""
  state = os.path.join(step_dir, 'state')
  dirs = [os.path.join(state, 'd'), os.path.join(state, 'ocdbt.process_0', 'd')]
  return [os.path.join(d, n) for d in dirs if os.path.isdir(d) for n in sorted(os.listdir(d))]


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete(path):   # a copy that left files out
  os.remove(path)


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
  """A quickstart workdir with checkpoints 2 and 4, and the eval record of step 2."""
  work = str(tmp_path_factory.mktemp('two_steps'))
  train_and_evaluate(_quickstart(4), work)
  return work, evaluate_checkpoint(_quickstart(4), work, step=2)


def _overwrite(path, count=64):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b'\xa5' * count)


@pytest.mark.parametrize('damage', [_truncate, _delete, _overwrite])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_step(two_steps, tmp_path, damage,
                                                                  caplog, capsys):
  """Issue 27, case 4 (truncated: the issue's input; missing: the same kind): eval and resume
  used to die with OUT_OF_RANGE although step 2 is intact. Overwritten (64 bytes inside the
  arrays): silent before, as orbax checksums only its index; caught by the fingerprint saved
  with each array."""
  work = str(tmp_path / 'w')
  shutil.copytree(two_steps[0], work)
  step4 = os.path.join(work, 'checkpoints', '4')
  for path in _data_files(step4):
    damage(path)
  with caplog.at_level(logging.WARNING):
    record = evaluate_checkpoint(_quickstart(4), work)
  assert record['step'] == 2 and record['nll'] == pytest.approx(two_steps[1]['nll'], rel=1e-6)
  assert f'checkpoint step directory {step4} does not restore' in caplog.text
  assert os.path.isdir(step4)                      # eval is a reader: it moves nothing
  caplog.clear()
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    assert train_and_evaluate(_quickstart(6), work)['step'] == 6
  assert 'Resumed from checkpoint at step 2.' in capsys.readouterr().out
  assert f'renamed to {step4}.damaged' in caplog.text
  assert complete_steps(work) == [2, 4, 6]         # 4 trained again; the damaged one kept aside
  assert os.path.isdir(step4 + '.damaged')




def test_fingerprints_match_a_numpy_reference_and_see_one_changed_element():
  rng = np.random.default_rng(0)
  tree = {'w': rng.normal(size=(3, 5)).astype(np.float32),
          'h': rng.normal(size=7).astype(np.float16), 'n': np.arange(4, dtype=np.int32)}

  def reference(x):   # sum of the words times 2i + 1, mod 2^32
    words = x.ravel().view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize]).astype(np.uint64)
    return int(np.sum(words * (2 * np.arange(words.size, dtype=np.uint64) + 1)) % 2**32)

  assert fingerprints(tree) == {k: reference(v) for k, v in tree.items()}   # on host
  assert fingerprints(jax.tree.map(jnp.asarray, tree)) == fingerprints(tree)  # on device
  changed = dict(tree, w=tree['w'].copy())
  changed['w'][1, 2] = np.nextafter(changed['w'][1, 2], np.float32(9))   # one ulp
  assert fingerprints(changed)['w'] != fingerprints(tree)['w']
  swapped = dict(tree, n=tree['n'][::-1].copy())                        # same values, reordered
  assert fingerprints(swapped)['n'] != fingerprints(tree)['n']


def test_a_damaged_only_checkpoint_is_one_line_naming_it(two_steps, tmp_path):
  work = str(tmp_path / 'w')
  shutil.copytree(two_steps[0], work)
  shutil.rmtree(os.path.join(work, 'checkpoints', '2'))
  step4 = os.path.join(work, 'checkpoints', '4')
  for path in _data_files(step4):
    _truncate(path)
  for run in (lambda: evaluate_checkpoint(_quickstart(4), work),
              lambda: train_and_evaluate(_quickstart(6), work)):
    with pytest.raises(DamagedCheckpointError) as err:
      run()
    message = str(err.value)
    assert message.startswith(f'checkpoint step directory {step4} does not restore (OUT_OF_RANGE')
    assert '\n' not in message and isinstance(err.value, user_errors())
  assert complete_steps(work) == [4]               # nothing moved when nothing restores


# ----- case 6: class ids that changed under a workdir ---------------------------------------------

def _cat_dog(root, names=('cat', 'dog')):
  """Folders of two easily told classes: 'cat' images dark, 'dog' images bright (8 each)."""
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name, value in zip(names, (40, 215)):
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i in range(8):
        image = np.clip(rng.normal(value, 12, (8, 8)), 0, 255).astype(np.uint8)
        Image.fromarray(image, 'L').save(d / f'{i}.png')
  return root


def _npz_of(data, split, order):
  """The prepared split `split` of `data` as a packed npz (prepare_data's npz: source) whose
  class list is `order` (the same images, their labels renumbered to it)."""
  from input_pipeline import records
  meta = json.load(open(data / 'metadata.json'))
  source, names = RecordSource(records.split_paths(str(data), split), meta['format_version']), \
      meta['class_names']
  blobs, labels = [], []
  for i in range(len(source)):
    example = source[i]
    blobs.append(np.frombuffer(example['image'], np.uint8))   # the PNG bytes, as stored
    labels.append(order.index(names[example['label']]))
  offsets = np.cumsum([0] + [len(b) for b in blobs])
  return dict(blob=np.concatenate(blobs), offsets=offsets, labels=np.array(labels),
              class_names=np.array(order))


@pytest.fixture(scope='module')
def cat_dog_run(tmp_path_factory):
  """A workdir trained on {cat, dog} (ids 0, 1), its data and its eval record."""
  root = tmp_path_factory.mktemp('cat_dog')
  data = _prepare(_cat_dog(root / 'f'), root / 'd')
  work = str(root / 'w')
  c = _config(data, steps=4, **{'train.checkpoint_every': 2})
  return root, data, work, train_and_evaluate(c, work)


def test_renamed_class_folder_stops_eval_resume_and_warm_start(cat_dog_run, tmp_path):
  """Issue 27, case 6: 'cat' renamed 'zebra' and re-prepared into the same --out swaps the ids
  (dog 0, zebra 1); eval used to report accuracy 0.0 instead of 1.0 with no warning and a
  resume trained on swapped labels."""
  root, data, work, _ = cat_dog_run
  assert json.load(open(os.path.join(work, 'classes.json'))) == {'class_names': ['cat', 'dog']}
  renamed = _prepare(_cat_dog(tmp_path / 'f', ('zebra', 'dog')), tmp_path / 'd')
  checks = [lambda: evaluate_checkpoint(_config(renamed, steps=4), work),
            lambda: train_and_evaluate(_config(renamed, steps=6), work)]
  warm = _config(renamed, steps=2, **{'train.init_from': work})
  warm.train.init_prefixes = ('backbone', 'head')
  checks.append(lambda: train_and_evaluate(warm, str(tmp_path / 'warm')))
  for check in checks:
    with pytest.raises(ClassListError) as err:
      check()
    message = str(err.value)
    assert "only the model has 'cat'" in message and "has 'zebra'" in message, message
    assert '\n' not in message and isinstance(err.value, user_errors())
  assert complete_steps(work) == [2, 4]


def test_the_same_classes_in_another_order_are_remapped(cat_dog_run, tmp_path, capsys):
  """The same kind, another input: the same images packed as an npz whose class list is
  (dog, cat). Eval remaps the labels and gives the workdir's own numbers; a resume trains on
  the model's ids; a warm start that takes the head stops (its rows are per class)."""
  root, data, work, trained = cat_dog_run
  files = {}
  for split in ('train', 'test'):
    files[split] = str(tmp_path / f'{split}.npz')
    np.savez(files[split], **_npz_of(data, split, ['dog', 'cat']))
  prepare_data.main([f'--source=npz:train={files["train"]},test={files["test"]}',
                     f'--out={tmp_path / "d"}'])
  swapped = tmp_path / 'd'
  capsys.readouterr()
  record = evaluate_checkpoint(_config(swapped, steps=4), work)
  assert 'labels remapped' in capsys.readouterr().out
  assert record['accuracy'] == trained['accuracy']
  assert record['nll'] == pytest.approx(trained['nll'], rel=1e-5)
  copy = str(tmp_path / 'w')
  shutil.copytree(work, copy)
  assert train_and_evaluate(_config(swapped, steps=6), copy)['step'] == 6
  assert json.load(open(os.path.join(copy, 'classes.json'))) == {'class_names': ['cat', 'dog']}
  warm = _config(swapped, steps=2, **{'train.init_from': work})
  warm.train.init_prefixes = ('backbone', 'head')
  with pytest.raises(ClassListError, match='in another order'):
    train_and_evaluate(warm, str(tmp_path / 'warm'))


# ----- case 3: a full disk ---------------------------------------------------------------------------

ENOSPC_FROM_ORBAX = ValueError(   # what orbax raises at the save after the one that hit it
    'RESOURCE_EXHAUSTED: Error writing "params.head.kernel/0.0" in OCDBT database at local '
    'file "W/checkpoints/3.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/": Failed to write '
    "71567 bytes to file 8: No space left on device [os_error_code='28']")


def test_a_full_disk_at_a_save_is_one_line_naming_the_last_complete_step(tmp_path, monkeypatch):
  """Issue 27, case 3: a bare orbax RESOURCE_EXHAUSTED at the save of step 3."""
  original = Checkpointer.save

  def save(self, step, *args, **kwargs):
    if step == 3:
      raise ENOSPC_FROM_ORBAX
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(Checkpointer, 'save', save)
  with pytest.raises(DiskFullError) as err:
    train_and_evaluate(_quickstart(4, checkpoint_every=1), str(tmp_path))
  message = str(err.value)
  assert message.startswith(f'no space left on the disk of {tmp_path} (')
  assert 'the last complete checkpoint, step 2, is intact' in message
  size = sum(os.path.getsize(os.path.join(r, n))
             for r, _, names in os.walk(tmp_path / 'checkpoints' / '2') for n in names)
  need = float(message.split('a checkpoint needs about ')[1].split(' MiB')[0]) * 2**20
  assert size - 2**20 / 20 <= need <= 1.2 * size   # step 2's size on disk, or the state's
  assert '\n' not in message and isinstance(err.value, user_errors())
  assert complete_steps(str(tmp_path)) == [1, 2]


def test_a_disk_full_at_start_is_one_line(tmp_path, monkeypatch):
  """The same kind, another input: the disk is full before anything is written (LOCK)."""
  import errno
  from training import workdir

  def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', path)

  monkeypatch.setattr(workdir, 'write_json', full)
  with pytest.raises(DiskFullError, match=r'no space left on the disk of .*: no checkpoint was '
                                          r'complete yet\. .* re-run the same command to start'):
    train_and_evaluate(_quickstart(2), str(tmp_path))


def test_a_disk_full_writing_the_eval_report_is_one_line(two_steps, monkeypatch):
  """The same kind in --mode=eval: the report (eval_results.json) does not fit."""
  import errno
  from evaluation import from_checkpoint

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(from_checkpoint, 'write_eval_report', full)
  with pytest.raises(DiskFullError, match='the last complete checkpoint, step 4, is intact'):
    evaluate_checkpoint(_quickstart(4), two_steps[0])


def test_a_real_full_filesystem(tmp_path):
  """The same on a 3 MiB tmpfs (root only, else skipped): step 1 fits, step 2 does not."""
  import subprocess
  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3M', 'tmpfs', str(disk)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    with pytest.raises(DiskFullError, match='the last complete checkpoint, step 1, is intact'):
      train_and_evaluate(_quickstart(4, checkpoint_every=1), str(disk / 'w'))
    assert complete_steps(str(disk / 'w')) == [1]
  finally:
    subprocess.run(['umount', str(disk)], check=True)


# ----- case 5: a damaged ArrayRecord shard ----------------------------------------------------------

@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('shards')
  return _prepare(_folder(root / 'f', {'train': 'ab', 'test': 'ab'}, n=20), root / 'd')


@pytest.mark.parametrize('damage, split, reader', [
    (_truncate, 'train', 'global'),    # the issue's inputs: RuntimeError with no message,
    (_overwrite, 'train', 'global'),   # "block header hash mismatch", neither naming the file
    (_truncate, 'train', 'sharded'),   # the same kind: the other train reader, the eval split
    (_overwrite, 'test', 'global'),
])
def test_a_damaged_shard_is_one_line_naming_the_file_and_how_to_prepare_it(shards, tmp_path,
                                                                          damage, split, reader):
  data = tmp_path / 'd'
  shutil.copytree(shards, data)
  shard = str(next(data.glob(f'{split}.array_record*')))
  damage(shard)
  c = _config(data, **{'input.reader': reader})
  with pytest.raises(ShardReadError) as err:
    train_and_evaluate(c, str(tmp_path / 'w'))
  message = str(err.value)
  assert message.startswith(f'cannot read shard {shard}')
  assert f'python -m launch.prepare_data --out={data}' in message
  assert '\n' not in message and isinstance(err.value, user_errors())


# ----- case 8: small ones -----------------------------------------------------------------------------

@pytest.mark.parametrize('shape, says', [
    ((3, 1), r'mesh.shape \(3, 1\) needs 3 devices, have 8'),   # the issue's input
    ((-1, -1), r'at most one -1 in mesh.shape'),                # the same kind
])
def test_a_mesh_the_devices_do_not_fill_is_a_config_error(shape, says):
  c = load_config('quickstart.py', 'runlocal')
  c.mesh.shape = shape
  with pytest.raises(ConfigError, match=says + '.*set --config.mesh.shape') as err:
    Experiment.build(c)
  assert '\n' not in str(err.value) and isinstance(err.value, user_errors())


def test_kwargs_overrides_add_keys_a_recipe_lacks_and_are_checked_against_the_backbone():
  """`--config.model.backbone_kwargs.KEY=V` on the convnet, whose recipe sets no kwargs: the
  key is added after parsing (the locked config rejected it with an AttributeError) and
  resolve checks it against the backbone's fields."""
  argv = ['main.py', '--config=configs/quickstart.py:runlocal', '--workdir=/w',
          '--config.model.backbone_kwargs.features=16', '--config.train.num_steps=2',
          '--config.model.head_kwargs.label_smoothing', '0.1']
  kept, taken = take_kwargs_overrides(argv, ['config'])
  assert kept == argv[:3] + ['--config.train.num_steps=2']
  assert taken == [('config', 'model.backbone_kwargs', 'features', '16'),
                   ('config', 'model.head_kwargs', 'label_smoothing', '0.1')]
  c = load_config('quickstart.py', 'runlocal')
  c.lock()                                           # as ml_collections' config flag is
  set_kwargs_overrides(taken, {'config': c})
  resolve(c, verbose=False)
  assert c.model.backbone_kwargs.features == 16 and c.model.head_kwargs.label_smoothing == 0.1
  assert Experiment.build(c).abstract_state.params['backbone']['fc']['kernel'].shape[-1] == 16
  set_kwargs_overrides([('config', 'model.backbone_kwargs', 'width', '16')], {'config': c})
  with pytest.raises(ConfigError, match=r"model.backbone_kwargs do not fit "
                                        r"model.backbone='convnet' .*'width'; it takes dtype, "
                                        r'features'):
    resolve(c, verbose=False)


def test_the_issue_s_kwargs_command_line_is_one_error_line(tmp_path):
  proc = run_main('--config=configs/quickstart.py:runlocal', f'--workdir={tmp_path}',
                  '--config.model.backbone_kwargs.width=16', check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: model.backbone_kwargs do not fit model.backbone='convnet'")
