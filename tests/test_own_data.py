"""Your own data and your own workdirs (issue 16): each numbered case of the issue, through the
command line. The data: a numeric-named grayscale folder no config knows (12 classes, 8 px,
class k has 3 + k images, only a train split; the test split is held out at preparation)."""
import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import records
from input_pipeline.sources import RecordSource
from training.resolve import ConfigError, resolve
from launch import prepare_data
from tests.helpers import last_json, override, run_main, run_module

K = 12


def _gray_folder(root, counts, size=8, seed=0, split='train'):
  rng = np.random.default_rng(seed)
  for k, n in enumerate(counts):
    d = root / split / str(k)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), 'L').save(d / f'{i}.png')


def _prepare(capsys, *args):
  prepare_data.main(list(args))
  return capsys.readouterr()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('own')
  _gray_folder(root / 'folder', [3 + k for k in range(K)])
  prepare_data.main(['--source=folder', f'--input_dir={root / "folder"}', f'--out={root / "data"}',
                     '--holdout_split=test', '--holdout_fraction=0.25', '--seed=0'])
  return root / 'data'


def _fails(*args, module='launch.main'):
  proc = run_module(module, *args, check=False, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  return proc.stderr.strip().splitlines()[-1]


# ----- case 6: preparation ----------------------------------------------------------------------

def test_numeric_class_folders_get_their_numbers_and_the_order_is_printed(data, tmp_path, capsys):
  meta = records.read_metadata(data)
  assert meta['class_names'] == [str(k) for k in range(K)]       # '10' is class 10, not 2
  counts = np.add(meta['splits']['train']['class_counts'], meta['splits']['test']['class_counts'])
  assert counts.tolist() == [3 + k for k in range(K)]            # folder k had 3 + k images
  # stratified hold-out: round(0.25 n), at least 1, of each class's n images
  assert meta['splits']['test']['class_counts'] == [max(1, round(0.25 * (3 + k)))
                                                    for k in range(K)]
  _gray_folder(tmp_path / 'f', [3, 3, 3])
  out = _prepare(capsys, '--source=folder', f'--input_dir={tmp_path / "f"}',
                 f'--out={tmp_path / "d"}').out
  assert 'class ids (numeric): 0: 0, 1: 1, 2: 2' in out


def test_holdout_is_seeded(tmp_path):
  _gray_folder(tmp_path / 'f', [10, 10])
  def test_sources(seed):
    prepare_data.main(['--source=folder', f'--input_dir={tmp_path / "f"}', '--holdout_split=test',
                       f'--out={tmp_path / str(seed)}', f'--seed={seed}', '--holdout_fraction=0.3'])
    src = RecordSource(records.split_paths(tmp_path / str(seed), 'test'), 2)
    return sorted(src[i]['image'] for i in range(len(src)))
  assert test_sources(0) == test_sources(0) != test_sources(1)
  assert len(test_sources(0)) == 6                                 # 3 of each class's 10


def test_tiny_and_missing_classes_are_warned_about(tmp_path, capsys):
  _gray_folder(tmp_path / 'f', [6, 1, 6])
  _gray_folder(tmp_path / 'f', [2, 0, 2], split='test', seed=1)
  err = _prepare(capsys, '--source=folder', f'--input_dir={tmp_path / "f"}',
                 f'--out={tmp_path / "d"}').err
  assert "warning: 1 class(es) have fewer than 5 images in split 'train': '1' (1)" in err
  assert "warning: split 'test' has no images of 1 class(es) that other splits have: '1'" in err


def test_empty_and_foreign_files_get_exact_messages(tmp_path, capsys):
  _gray_folder(tmp_path / 'f', [2, 2])
  (tmp_path / 'f' / 'train' / '0' / 'empty.png').write_bytes(b'')
  (tmp_path / 'f' / 'train' / '1' / 'notes.png').write_bytes(b'hello world')
  err = _prepare(capsys, '--source=folder', f'--input_dir={tmp_path / "f"}',
                 f'--out={tmp_path / "d"}').err
  assert 'empty.png: empty file (0 bytes)' in err
  assert "notes.png: not an image file Pillow can read (11 bytes starting with b'hello wo')" in err
  (tmp_path / 'x.npz').write_bytes(b'this is text, not numpy')
  with pytest.raises(SystemExit, match=r'x.npz is not an npz file \(a zip archive of .npy '
                     r"arrays\) but a file starting with b'this'") as e:
    prepare_data.main([f'--source=npz:{tmp_path / "x.npz"}', f'--out={tmp_path / "o"}'])
  assert 'pickle' not in str(e.value)
  (tmp_path / 'e.npz').write_bytes(b'')
  with pytest.raises(SystemExit, match=r'e.npz is empty \(0 bytes\), not an npz file'):
    prepare_data.main([f'--source=npz:{tmp_path / "e.npz"}', f'--out={tmp_path / "o"}'])


def _idx(path, array, gz):
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  data = header + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_source_roundtrip_and_pixel_statistics(tmp_path):
  rng = np.random.default_rng(3)
  x = {s: rng.integers(0, 256, (n, 7, 5), dtype=np.uint8) for s, n in (('train', 30), ('t10k', 9))}
  y = {s: rng.integers(0, 4, len(x[s])) for s in x}
  for s in x:
    _idx(tmp_path / f'{s}-images-idx3-ubyte.gz', x[s], gz=True)
    _idx(tmp_path / f'{s}-labels-idx1-ubyte', y[s], gz=False)
  meta = prepare_data.prepare('idx', str(tmp_path / 'd'), input_dir=str(tmp_path), verbose=False)
  assert sorted(meta['splits']) == ['test', 'train'] and meta['image_size'] == [7, 5, 1]
  assert meta['class_names'] == ['0', '1', '2', '3'] and meta['channels'] == [1]
  src = RecordSource(records.split_paths(tmp_path / 'd', 'test'), 2)
  from input_pipeline.image_ops import decode
  for i in range(len(src)):
    assert src[i]['label'] == y['t10k'][i]
    np.testing.assert_array_equal(decode(src[i]['image'], 1)[..., 0], x['t10k'][i])
  stats = meta['pixel_stats']
  assert stats['1']['mean'][0] == pytest.approx(x['train'].mean() / 255, abs=1e-6)
  assert stats['1']['std'][0] == pytest.approx(x['train'].std() / 255, abs=1e-6)
  assert stats['3']['mean'] == pytest.approx([x['train'].mean() / 255] * 3, abs=1e-6)
  (tmp_path / 'train-labels-idx1-ubyte').write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 99, 1, 2]))
  with pytest.raises(ValueError, match=r'the idx header says 1 dimensions \(99,\) of uint8, '
                     r'but the file holds 2 bytes'):
    prepare_data.prepare('idx', str(tmp_path / 'd2'), input_dir=str(tmp_path), verbose=False)


def test_idx_source_takes_class_names(tmp_path):
  """Issue 28 point 7: MNIST-format data can be given class names (--class_names_file was
  refused for --source=idx); too few names for its labels is one clear error."""
  x = np.zeros((6, 4, 4), np.uint8)
  _idx(tmp_path / 'train-images-idx3-ubyte', x, gz=False)
  _idx(tmp_path / 'train-labels-idx1-ubyte', np.array([0, 1, 2, 0, 1, 2]), gz=False)
  (tmp_path / 'names.txt').write_text('T-shirt/top\nTrouser\nPullover\n')
  meta = prepare_data.prepare('idx', str(tmp_path / 'd'), input_dir=str(tmp_path),
                              class_names_file=str(tmp_path / 'names.txt'), verbose=False)
  assert meta['class_names'] == ['T-shirt/top', 'Trouser', 'Pullover']
  (tmp_path / 'two.txt').write_text('T-shirt/top\nTrouser\n')
  with pytest.raises(prepare_data.LabelsFileError, match=r'two.txt: 2 class names, but the idx '
                     r'labels go up to 2'):
    prepare_data.prepare('idx', str(tmp_path / 'd2'), input_dir=str(tmp_path),
                         class_names_file=str(tmp_path / 'two.txt'), verbose=False)
  with pytest.raises(ValueError, match='--class_names_file goes with --source=folder'):
    prepare_data.make_source('npz:a.npz', class_names_file=str(tmp_path / 'names.txt'))


# ----- cases 1-5: a run on the data, its eval, LLC phase 2, a changed resume -------------------

# The LLC configs' arguments and optimizer (configs.llc_phases) on quickstart's small convnet, so a run
# compiles in seconds; `data=DIR` as in llc_cifar10.py.
LLC_CONFIG = """
import ml_collections
from configs import base, quickstart
from configs import llc_phases as phases

def get_config(arg=None):
  args = base.parse_arg(arg, data='', **phases.ARGS)
  c = quickstart.get_config('runlocal,data=' + args.data)
  c.model.head_kwargs = ml_collections.ConfigDict()
  c.train.async_checkpointing = False
  phases.paper_optimizer(c)
  return phases.configure(c, args)
"""


@pytest.fixture(scope='module')
def llc_config(tmp_path_factory):
  path = tmp_path_factory.mktemp('cfg') / 'llc_small.py'
  path.write_text(LLC_CONFIG)
  return path


@pytest.fixture(scope='module')
def llc_run(data, llc_config, tmp_path_factory):
  """LLC phase 1 on the 12-class gray data, batch 16, 2 epochs, bits left to K."""
  work = tmp_path_factory.mktemp('llc') / 'p1'
  proc = run_main(f'--config={llc_config}:data={data},phase=1', f'--workdir={work}',
                  '--config.input.batch_size=16', '--config.train.num_steps=0',
                  '--config.train.epochs=2')
  return work, proc


def test_facts_bits_steps_and_lr_come_from_the_data_and_the_final_config(data, llc_run):
  work, proc = llc_run
  c = json.loads((work / 'config.json').read_text())
  meta = records.read_metadata(data)
  train = meta['splits']['train']['num_examples']
  assert (c['dataset']['num_classes'], c['dataset']['channels'], c['dataset']['image_size']) == (
      K, 1, 8)                                                       # case 4: not 10, 3, 32
  assert c['dataset']['train_examples'] == train
  assert c['model']['head_kwargs']['bits'] == 8                     # case 1: ceil(2 log2 12)
  assert c['train']['num_steps'] == 2 * (train // 16)               # case 3: the data's epochs
  assert c['optimizer']['learning_rate'] == pytest.approx(0.05 * 16 / 64)   # per 64 images
  assert c['input']['mean'] == meta['pixel_stats']['1']['mean']     # one channel, its own stats
  assert last_json(proc.stdout)['step'] == c['train']['num_steps']


def test_eval_and_llc_evaluate_default_to_the_workdir_config(llc_run):
  work, proc = llc_run
  trained = last_json(proc.stdout)
  again = last_json(run_main('--mode=eval', f'--workdir={work}').stdout)    # case 5
  for key in ('step', 'accuracy', 'nll', 'num_examples'):
    assert again[key] == pytest.approx(trained[key], abs=1e-6), key
  record = last_json(run_module('llc.evaluate', f'--workdir={work}').stdout)
  assert record['bits'] == 8 and np.load(work / 'codebook.npy').shape == (K, 8)


def test_phase2_checks_the_codebook_against_the_final_class_count(data, llc_config, llc_run,
                                                                 tmp_path):
  work, _ = llc_run
  if not (work / 'codebook.npy').exists():
    run_module('llc.evaluate', f'--workdir={work}')
  proc = run_main(f'--config={llc_config}:data={data},phase=2,phase1={work}',
                  f'--workdir={tmp_path / "p2"}')                         # case 2
  c = json.loads((tmp_path / 'p2' / 'config.json').read_text())
  assert c['model']['head_kwargs']['bits'] == 8 and last_json(proc.stdout)['step'] == 1
  with pytest.raises(ConfigError, match=r'has shape \(12, 8\), but this config needs '
                     r'\[num_classes, bits\] = \[12, 5\]'):
    resolve(_load(llc_config, f'data={data},phase=2,bits=5,phase1={work}'))


def test_resume_with_a_changed_config_says_what_changed_and_keeps_the_old_one(data, llc_config,
                                                                             llc_run):
  work, _ = llc_run
  before = json.loads((work / 'config.json').read_text())
  proc = run_main(f'--config={llc_config}:data={data},phase=1',
                  f'--workdir={work}', '--config.input.batch_size=8',
                  f'--config.train.num_steps={before["train"]["num_steps"] + 1}')
  step = before['train']['num_steps']
  assert f'Config changed since step {step}' in proc.stdout
  assert "input.batch_size: 16 -> 8" in proc.stdout
  assert json.loads((work / f'config.{step}.json').read_text()) == before
  assert json.loads((work / 'config.json').read_text())['input']['batch_size'] == 8


# ----- cases 4 and 7: mistakes end in one line naming the field ---------------------------------

def _load(path, arg, **overrides):
  """The config launch.main would build from --config=path:arg --config.a.b=v (unresolved)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('config_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config(arg), overrides)


def test_a_class_count_below_the_data_s_is_one_line(data, tmp_path):
  line = _fails(f'--config=configs/compare_heads.py:data={data},runlocal',
                f'--workdir={tmp_path}', '--config.dataset.num_classes=5')
  assert line == (f"error: dataset.num_classes = 5 but prepared dataset '{data}' has 12 classes: "
                  'set --config.dataset.num_classes=12 (or 0 to read it from the data)')
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('override, says', [
    ({'dataset.eval_split': 'validation'},
     "split 'validation' (dataset.eval_split) is not in prepared dataset '{data}', which has "
     "['test', 'train']: set --config.dataset.eval_split="),
    ({'model.backbone': 'convnet'}, "model.backbone_kwargs do not fit model.backbone='convnet'"),
    ({'model.head': 'softmax'}, "model.head_kwargs do not fit model.head='softmax' "
     '(SoftmaxHead takes no '),
    ({'input.mean': (0.4914, 0.4822, 0.4465)},
     'input.mean has 3 values but images have 1 channel(s) (dataset.channels)'),
])
def test_config_mistakes_are_config_errors_naming_the_field(data, override, says):
  """What launch.main prints as one line (test above), for the other mistakes of case 7."""
  c = _load('configs/compare_heads.py', f'data={data},head=hetxl,runlocal', **override)
  with pytest.raises(ConfigError) as e:
    resolve(c)
  assert says.format(data=data) in str(e.value) and '\n' not in str(e.value)


def test_mixed_sizes_need_an_image_size(tmp_path, capsys):
  _gray_folder(tmp_path / 'f', [3, 3], size=28)
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'f' / 'train' / '1' / 'big.png')
  _prepare(capsys, '--source=folder', f'--input_dir={tmp_path / "f"}', f'--out={tmp_path / "d"}',
           '--holdout_split=test')
  line = _fails(f'--config=configs/compare_heads.py:data={tmp_path / "d"},runlocal',
                f'--workdir={tmp_path / "w"}')
  assert 'holds images of several sizes and input.image_size = 0' in line
  assert '--config.input.image_size=N' in line


def test_a_missing_own_data_dir_gets_the_generic_hint_once(tmp_path):
  c = _load('configs/compare_heads.py', 'runlocal', **{'dataset.data_dir': str(tmp_path / 'x')})
  with pytest.raises(FileNotFoundError) as e:
    resolve(c)
  message = str(e.value)
  assert 'cifar10_npz' not in message and message.count('--source=folder') == 1
  assert f"directory '{tmp_path / 'x'}' does not exist" in message
  c.dataset.setup_hint = f'Prepare it with:\n  prepare --source=cifar10_npz --out={tmp_path / "x"}'
  with pytest.raises(FileNotFoundError) as e:   # a recipe's hint, for the directory it names
    resolve(c)
  assert str(e.value).count('cifar10_npz') == 1 and '--source=folder' not in str(e.value)


def test_own_data_compare_trains_every_head_and_prints_one_table(data, tmp_path, capsys):
  """Issue 28 point 5: `compare_heads.py:data=DIR,compare` on a tiny prepared folder trains
  every head (runlocal-sized) into WORKDIR/<head> and prints one table whose rows are each
  run's own eval_results.json, ending with the uniform guess 1/K."""
  import json
  from configs.compare_heads import COMPARED
  from launch import runs
  from tests.helpers import load_config
  config = load_config('compare_heads.py', f'data={data},compare,runlocal,augment=none')
  results = runs.train(config, str(tmp_path))
  assert sorted(results) == sorted(COMPARED)
  table = capsys.readouterr().out.split('| run ', 1)[1]
  for head in COMPARED:
    with open(tmp_path / head / 'eval_results.json') as f:
      own = json.load(f)
    row = next(line for line in table.splitlines() if line.startswith(f'| {head} '))
    assert f"{own['accuracy']:.4f}" in row and f"{own['nll']:.4f}" in row, (head, row)
  assert f'{1 / K:.4f}' in table   # the chance row: accuracy 1/K
