"""Multi-label preparation (`launch.prepare_data`): image folder + labels file (CSV, JSONL),
tfds Sequence(ClassLabel), seeded mosaics; every bad labels input stops with file:line and
writes nothing; an end-to-end train + eval on a prepared multi-label folder."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import records
from launch import prepare_data
from launch.prepare_data import LabelsFileError

REAL_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         '..', 'shared', 'data')


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  return buf.getvalue()


def _jpeg(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='JPEG', quality=90)
  return buf.getvalue()


def _rgb(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert('RGB'))


def _read_split(data_dir, split) -> list[tuple[list[int], bytes]]:
  """(class ids, image bytes) of every record of `split`, decoded by hand from the byte layout
  of input_pipeline/records.py: uint16 count, count x int32 ids, then the image."""
  from array_record.python.array_record_module import ArrayRecordReader
  out = []
  for path in records.split_paths(str(data_dir), split):
    reader = ArrayRecordReader(path)
    for r in reader.read_all():
      n = int.from_bytes(r[:2], 'little')
      ids = [int.from_bytes(r[2 + 4 * j:6 + 4 * j], 'little', signed=True) for j in range(n)]
      out.append((ids, bytes(r[2 + 4 * n:])))
    reader.close()
  return out


def _image_files(root, names, seed=0, size=(6, 5)) -> dict[str, bytes]:
  """Writes one small random image per relative path under `root`; returns path -> bytes."""
  rng = np.random.default_rng(seed)
  files = {}
  for i, name in enumerate(names):
    img = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    data = _jpeg(img) if name.endswith('.jpg') else _png(img)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    files[name] = data
  return files


def _check_written(out, meta, expected: dict[str, list[tuple[list[int], bytes]]], num_classes):
  """Records equal `expected` (ids and bytes, in order); metadata counts recomputed from it."""
  assert meta == records.read_metadata(str(out))
  assert meta['multi_label'] is True and meta['record_format'] == records.RECORD_FORMAT
  longest = 0
  for split, want in expected.items():
    assert _read_split(out, split) == want
    m = meta['splits'][split]
    counts = np.zeros(num_classes, int)
    for ids, _ in want:
      counts[ids] += 1
    assert m['class_counts'] == counts.tolist()
    assert m['num_examples'] == len(want)
    assert m['num_unlabelled'] == sum(not ids for ids, _ in want)
    assert m['num_labels'] == sum(len(ids) for ids, _ in want)
    longest = max([longest] + [len(ids) for ids, _ in want])
  assert meta['max_labels_per_image'] == longest


# ------------------------------------------------------------------------ folder + labels file


def test_folder_csv_and_jsonl_roundtrip(tmp_path, capsys):
  root = tmp_path / 'images'
  files = _image_files(root, ['a/1.png', 'a/2.jpg', 'b/3.png', 'b/4.png', 'c/5.jpg', 'c/6.png',
                              'unlisted.png'])
  good = _jpeg(np.zeros((4, 4, 3), np.uint8))
  (root / 'c' / 'broken.jpg').write_bytes(good[:len(good) // 2])
  (tmp_path / 'train.csv').write_text(
      'path,labels\n'
      'a/1.png,cat|dog\n'
      '\n'
      'a/2.jpg,"traffic light"\n'
      'b/3.png,\n'                         # unlabelled: kept
      'c/broken.jpg,cat\n'                 # corrupt: reported and skipped
      './b/4.png, dog | cat |dog\n'        # repeated label counts once; spaces stripped
      'c/missing.png,dog\n')               # missing: reported and skipped
  (tmp_path / 'test.jsonl').write_text(
      json.dumps({'path': 'c/5.jpg', 'labels': ['dog'], 'source': 'ignored'}) + '\n' +
      json.dumps({'path': 'c/6.png', 'labels': []}) + '\n\n')
  out = tmp_path / 'out'
  meta = prepare_data.prepare(
      'folder', str(out), input_dir=str(root), num_shards=2, verbose=False,
      labels_file=f'train={tmp_path}/train.csv,test={tmp_path}/test.jsonl')
  names = ['cat', 'dog', 'traffic light']  # sorted union of the names, both files
  assert meta['class_names'] == names and meta['num_classes'] == 3
  expected = {'train': [([0, 1], files['a/1.png']), ([2], files['a/2.jpg']),
                        ([], files['b/3.png']), ([0, 1], files['b/4.png'])],
              'test': [([1], files['c/5.jpg']), ([], files['c/6.png'])]}
  _check_written(out, meta, expected, 3)
  skipped = {s['source'].split()[0]: s['error'] for s in meta['skipped']}
  assert set(skipped) == {f'{tmp_path}/train.csv:6', f'{tmp_path}/train.csv:8'}
  assert 'FileNotFoundError' in skipped[f'{tmp_path}/train.csv:8']
  assert meta['splits']['train']['num_skipped'] == 2 and meta['num_skipped'] == 2
  err = capsys.readouterr().err
  assert 'broken.jpg' in err and 'missing.png' in err


def test_class_names_file_ids_and_space_separator(tmp_path):
  root = tmp_path / 'images'
  files = _image_files(root, ['x.png', 'y.png', 'z.png'])
  (tmp_path / 'classes.txt').write_text('zebra\nant\nmoth\n\n')  # order kept, not sorted
  (tmp_path / 'l.csv').write_text('x.png,moth   zebra\ny.png,ant\n')
  (tmp_path / 'l.jsonl').write_text('{"path": "z.png", "labels": [2, "ant", 0]}\n')
  meta = prepare_data.prepare(
      'folder', str(tmp_path / 'out'), input_dir=str(root), verbose=False, label_sep=' ',
      labels_file=f'{tmp_path}/l.csv,{tmp_path}/l.jsonl',  # unnamed: train, then test
      class_names_file=str(tmp_path / 'classes.txt'))
  assert meta['class_names'] == ['zebra', 'ant', 'moth']
  _check_written(tmp_path / 'out', meta, {'train': [([0, 2], files['x.png']),
                                                    ([1], files['y.png'])],
                                          'test': [([0, 1, 2], files['z.png'])]}, 3)


def test_single_label_sources_still_write_multi_label_false(tmp_path):
  (tmp_path / 'in' / 'a').mkdir(parents=True)
  (tmp_path / 'in' / 'a' / 'x.png').write_bytes(_png(np.zeros((3, 3, 3), np.uint8)))
  meta = prepare_data.prepare('folder', str(tmp_path / 'out'), input_dir=str(tmp_path / 'in'),
                              verbose=False)
  assert meta['multi_label'] is False and meta['max_labels_per_image'] == 1
  assert meta['splits']['train']['num_unlabelled'] == 0


# Each case: files to write ({name: text}), prepare() keyword arguments (file names in
# tmp_path), and the fragments the error must hold, {d} standing for tmp_path.
_IMAGES = ['a.png', 'b.png', 'c.png']
_BAD = {
    'class not in the class list': (
        {'l.csv': 'a.png,cat\nb.png,cat|zebra\n', 'names.txt': 'cat\ndog\n'},
        dict(labels_file='l.csv', class_names_file='names.txt'),
        ["{d}/l.csv:2: class 'zebra' is not in {d}/names.txt"]),
    'image listed twice': (
        {'l.csv': 'path,labels\na.png,cat\nb.png,dog\n./a.png,dog\n'},
        dict(labels_file='l.csv'),
        ["{d}/l.csv:4: image 'a.png' already listed at {d}/l.csv:2"]),
    'image listed in two splits': (
        {'tr.csv': 'a.png,cat\nb.png,dog\n', 'te.jsonl': '{"path": "b.png", "labels": []}\n'},
        dict(labels_file='train=tr.csv,test=te.jsonl'),
        ["{d}/te.jsonl:1: image 'b.png' already listed at {d}/tr.csv:2"]),
    'csv row with three fields': (
        {'l.csv': 'a.png,cat\nb.png,cat,dog\n'},
        dict(labels_file='l.csv'), ['{d}/l.csv:2: expected 2 fields (path,labels), got 3']),
    'csv row without a labels field': (
        {'l.csv': 'a.png\tcat\n'},
        dict(labels_file='l.csv'), ['{d}/l.csv:1: expected 2 fields (path,labels), got 1']),
    'empty class name': (
        {'l.csv': 'a.png,cat||dog\n'},
        dict(labels_file='l.csv'), ['{d}/l.csv:1: labels must be non-empty class names']),
    'invalid json': (
        {'l.jsonl': '{"path": "a.png", "labels": ["cat"]}\n{"path": "b.png", "labels": [}\n'},
        dict(labels_file='l.jsonl'), ['{d}/l.jsonl:2: invalid JSON']),
    'json without labels': (
        {'l.jsonl': '{"path": "a.png"}\n'},
        dict(labels_file='l.jsonl'), ['{d}/l.jsonl:1: expected an object with "path"']),
    'class id >= K': (
        {'l.jsonl': '{"path": "a.png", "labels": [0, 1]}\n{"path": "b.png", "labels": [2]}\n',
         'names.txt': 'cat\ndog\n'},
        dict(labels_file='l.jsonl', class_names_file='names.txt'),
        ['{d}/l.jsonl:2: class id 2 outside [0, 2)']),
    'class id without a class list': (
        {'l.jsonl': '{"path": "a.png", "labels": [1]}\n'},
        dict(labels_file='l.jsonl'), ['{d}/l.jsonl:1: integer label 1 needs --class_names_file']),
    'path leaving the root': (
        {'l.csv': 'a.png,cat\n../secret.png,cat\n'},
        dict(labels_file='l.csv'), ["{d}/l.csv:2: image path '../secret.png' must be"]),
    'absolute path': (
        {'l.jsonl': '{"path": "/etc/a.png", "labels": ["cat"]}\n'},
        dict(labels_file='l.jsonl'), ["{d}/l.jsonl:1: image path '/etc/a.png' must be"]),
    'duplicate class name': (
        {'l.csv': 'a.png,cat\n', 'names.txt': 'cat\ndog\ncat\n'},
        dict(labels_file='l.csv', class_names_file='names.txt'),
        ["{d}/names.txt:3: class name 'cat' repeats line 1"]),
    'unknown extension': (
        {'l.txt': 'a.png cat\n'},
        dict(labels_file='l.txt'), ["{d}/l.txt: unknown labels-file extension '.txt'"]),
}


def _in_dir(d, spec: str) -> str:
  """'train=a.csv,b.csv' -> 'train=D/a.csv,D/b.csv'."""
  entries = [e.rpartition('=') for e in spec.split(',')]
  return ','.join(f'{split}{eq}{d}/{name}' for split, eq, name in entries)


@pytest.mark.parametrize('case', sorted(_BAD))
def test_bad_labels_input_names_file_and_line_and_writes_nothing(tmp_path, case):
  files, kwargs, fragments = _BAD[case]
  root = tmp_path / 'images'
  _image_files(root, _IMAGES)
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  out = tmp_path / 'out'
  out.mkdir()
  with pytest.raises(LabelsFileError) as e:
    prepare_data.prepare('folder', str(out), input_dir=str(root), verbose=False,
                         **{k: _in_dir(tmp_path, v) for k, v in kwargs.items()})
  for fragment in fragments:
    assert fragment.replace('{d}', str(tmp_path)) in str(e.value), str(e.value)
  assert os.listdir(out) == []      # no metadata.json, no shards, no temp dir


def test_every_problem_listed_and_cli_exits_without_traceback(tmp_path, capsys):
  _image_files(tmp_path / 'images', _IMAGES)
  (tmp_path / 'names.txt').write_text('cat\n')
  (tmp_path / 'l.csv').write_text('a.png,cat|dog\nb.png,x,y\na.png,cat\n')
  with pytest.raises(SystemExit) as e:
    prepare_data.main(['--source=folder', f'--input_dir={tmp_path}/images',
                       f'--labels_file={tmp_path}/l.csv',
                       f'--class_names_file={tmp_path}/names.txt', f'--out={tmp_path}/out'])
  message = str(e.value.code)
  assert message.startswith('error: 3 problem(s) in the labels input; nothing was written')
  for fragment in (f"l.csv:1: class 'dog' is not in {tmp_path}/names.txt",
                   'l.csv:2: expected 2 fields', f"l.csv:3: image 'a.png' already listed at "
                   f'{tmp_path}/l.csv:1'):
    assert fragment in message, message
  assert not (tmp_path / 'out').exists()
  assert 'Traceback' not in capsys.readouterr().err


def test_unreadable_labels_files_name_the_line(tmp_path):
  _image_files(tmp_path / 'images', _IMAGES)
  (tmp_path / 'latin1.csv').write_bytes('a.png,cat\nb.png,caf\xe9\n'.encode('latin-1'))
  (tmp_path / 'quote.csv').write_text('a.png,cat\nb.png,"dog\n')
  for name, fragment in (('latin1.csv', 'latin1.csv:2: not UTF-8 text'),
                         ('quote.csv', 'quote.csv:2: malformed CSV')):
    with pytest.raises(LabelsFileError, match=fragment):
      prepare_data.prepare('folder', str(tmp_path / 'out'), input_dir=str(tmp_path / 'images'),
                           labels_file=str(tmp_path / name), verbose=False)
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------ tfds


def test_tfds_sequence_of_class_labels(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  rng = np.random.default_rng(5)
  images = [_png(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)) for _ in range(5)]
  label_sets = [[], [1], [2, 0], [0, 2, 1], [2, 2]]

  class PrepareDataFakeMultiLabel(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'labels': tfds.features.Sequence(tfds.features.ClassLabel(names=['a', 'b', 'c']))}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, (data, labels) in enumerate(zip(images, label_sets)):
        yield i, {'image': io.BytesIO(data), 'labels': labels}

  PrepareDataFakeMultiLabel(data_dir=str(tmp_path / 'tfds'), file_format='array_record'
                            ).download_and_prepare()
  out = tmp_path / 'out'
  meta = prepare_data.prepare('tfds:prepare_data_fake_multi_label', str(out),
                              tfds_data_dir=str(tmp_path / 'tfds'), verbose=False)
  assert meta['class_names'] == ['a', 'b', 'c'] and meta['multi_label'] is True
  got = _read_split(out, 'train')  # TFDS shuffles on write: compare as sorted lists
  want = [(sorted(set(labels)), data) for labels, data in zip(label_sets, images)]
  assert sorted(got) == sorted(want)
  assert meta['splits']['train']['num_unlabelled'] == 1
  assert meta['splits']['train']['class_counts'] == [
      sum(k in labels for labels in label_sets) for k in range(3)]
  assert meta['max_labels_per_image'] == 3


# ------------------------------------------------------------------------ mosaics


def _write_npz(path, images: list[bytes], labels, class_names):
  blobs = [np.frombuffer(b, np.uint8) for b in images]
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  np.savez(path, blob=np.concatenate(blobs), offsets=offsets,
           labels=np.asarray(labels, np.int16), class_names=np.asarray(class_names))


def _tile_lookup(images: list[bytes]) -> dict[bytes, list[int]]:
  """Decoded RGB pixels of each source image -> the indices of the images with them."""
  table = {}
  for i, data in enumerate(images):
    table.setdefault(_rgb(data).tobytes(), []).append(i)
  return table


def _check_mosaics(got, images: list[bytes], labels: np.ndarray, tile: tuple[int, int]):
  """Each mosaic is a 2x2 grid of source images (found by exact pixel match, brute force), and
  its labels are exactly the classes of its four tiles. Returns the distinct-class counts."""
  lookup, (h, w) = _tile_lookup(images), tile
  distinct = []
  for ids, data in got:
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    grid = _rgb(data)
    assert grid.shape == (2 * h, 2 * w, 3)
    classes = set()
    for r in range(2):
      for c in range(2):
        matches = lookup[grid[r * h:(r + 1) * h, c * w:(c + 1) * w].tobytes()]
        tile_classes = {int(labels[i]) for i in matches}
        assert len(tile_classes) == 1  # identical pixels in two classes would be ambiguous
        classes |= tile_classes
    assert ids == sorted(classes)
    distinct.append(len(classes))
  return distinct


def _tiny_npz(tmp_path):
  """Train 4 classes x 3 images (PNG, with one grey image), test 3 classes x 2 (JPEG)."""
  rng = np.random.default_rng(9)
  train_labels, test_labels = np.repeat(np.arange(4), 3), np.array([0, 0, 2, 2, 3, 3])
  train = [_png(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)) for _ in train_labels]
  train[4] = _png(rng.integers(0, 256, (4, 6), dtype=np.uint8))  # grey: decoded as RGB
  test = [_jpeg(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)) for _ in test_labels]
  names = ['w', 'x', 'y', 'z']
  _write_npz(tmp_path / 'tr.npz', train, train_labels, names)
  _write_npz(tmp_path / 'te.npz', test, test_labels, names)
  return (train, train_labels), (test, test_labels)


def test_mosaic_tiles_labels_and_determinism(tmp_path):
  (train, train_labels), (test, test_labels) = _tiny_npz(tmp_path)
  source = f'mosaic:npz:{tmp_path}/tr.npz,{tmp_path}/te.npz'
  out = tmp_path / 'out'
  meta = prepare_data.prepare(source, str(out), seed=3, num_mosaics='train=60,test=25',
                              num_shards=2, verbose=False)
  got = {s: _read_split(out, s) for s in ('train', 'test')}
  assert [len(got['train']), len(got['test'])] == [60, 25]
  distinct = _check_mosaics(got['train'], train, train_labels, (4, 6))
  assert set(distinct) == {1, 2, 3, 4}
  distinct = _check_mosaics(got['test'], test, test_labels, (4, 6))
  assert set(distinct) <= {1, 2, 3} and len(set(distinct)) == 3  # only 3 classes in test
  assert meta['multi_label'] and meta['image_size'] == [8, 12, 3]
  assert meta['mosaic']['seed'] == 3 and meta['image_formats'] == {'PNG': 85}
  _check_written(out, meta, got, 4)
  # Seeded: the same seed gives the same bytes, another seed other mosaics.
  again = prepare_data.prepare(source, str(tmp_path / 'again'), seed=3,
                               num_mosaics='train=60,test=25', verbose=False)
  assert {s: _read_split(tmp_path / 'again', s) for s in got} == got
  assert again['splits'] == meta['splits'] | {
      s: {**meta['splits'][s], 'shards': again['splits'][s]['shards'],
          'shard_lengths': again['splits'][s]['shard_lengths']} for s in got}
  prepare_data.prepare(source, str(tmp_path / 'other'), seed=4, num_mosaics='7',
                       verbose=False)
  other = _read_split(tmp_path / 'other', 'train')
  assert len(other) == 7 and other != got['train'][:7]
  # Default size: as many mosaics as source images.
  meta = prepare_data.prepare(source, str(out), verbose=False)
  assert [meta['splits'][s]['num_examples'] for s in ('train', 'test')] == [12, 6]


def test_mosaic_number_of_classes_is_uniform_on_1_to_4():
  """The documented draw: m uniform on {1..4}; the 4 tiles hold exactly m classes, and each
  tile's image belongs to its class. 8000 draws: each frequency within 4 sigma of 1/4."""
  labels = np.repeat(np.arange(10), 7)
  members = prepare_data.class_members(labels, 10)
  assert [m.tolist() for m in members] == [list(range(7 * k, 7 * k + 7)) for k in range(10)]
  m = []
  for i in range(8000):
    tiles, classes = prepare_data.mosaic_plan(members, 0, 'train', i)
    assert sorted(set(labels[tiles].tolist())) == classes
    m.append(len(classes))
  freq = np.bincount(m, minlength=5)[1:] / len(m)
  assert np.all(np.abs(freq - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(m))), freq


def test_mosaic_bad_arguments(tmp_path):
  _tiny_npz(tmp_path)
  with pytest.raises(ValueError, match='mosaics are built from a packed npz source'):
    prepare_data.prepare('mosaic:folder', str(tmp_path / 'o'), input_dir=str(tmp_path))
  with pytest.raises(ValueError, match="--num_mosaics entry 'val=3'"):
    prepare_data.prepare(f'mosaic:npz:{tmp_path}/tr.npz', str(tmp_path / 'o'),
                         num_mosaics='val=3')
  assert not (tmp_path / 'o').exists()


def test_real_cifar10_mosaics(tmp_path):
  if not os.path.isdir(REAL_DATA):
    pytest.skip(f'real data folder {os.path.normpath(REAL_DATA)} is absent')
  out = tmp_path / 'mosaic'
  meta = prepare_data.prepare('mosaic:cifar10_npz', str(out), input_dir=REAL_DATA,
                              splits=['test'], num_mosaics='test=40', seed=0, verbose=False)
  assert meta['image_size'] == [64, 64, 3] and meta['num_skipped'] == 0
  with np.load(os.path.join(REAL_DATA, 'cifar10_test_jpegq75.npz')) as d:
    blob, offsets, labels = d['blob'], d['offsets'], d['labels']
    assert meta['class_names'] == list(d['class_names'])
  images = [blob[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(labels))]
  got = _read_split(out, 'test')
  assert len(got) == 40
  assert set(_check_mosaics(got, images, labels, (32, 32))) == {1, 2, 3, 4}


# ------------------------------------------------------------------------ end to end


def test_train_and_eval_on_a_prepared_multilabel_folder(tmp_path):
  """Prepare a tiny folder + JSONL dataset, train 2 steps, evaluate; the eval counts equal the
  prepared ones and prec@1 / NLL equal numpy on the checkpoint's own logits."""
  import jax
  from evaluation.evaluator import EVAL_SEED
  from tests.helpers import load_config
  from training.checkpointing import Checkpointer
  from training.experiment import Experiment
  from launch.train import train_and_evaluate
  from training.model import step_rngs
  rng = np.random.default_rng(11)
  names = [f'img{i}.png' for i in range(30)]
  files = _image_files(tmp_path / 'images', names, seed=1, size=(8, 8))
  sets = [sorted(rng.choice(3, int(rng.integers(0, 4)), replace=False).tolist()) for _ in names]
  for split, part in (('train', slice(0, 20)), ('test', slice(20, 30))):
    with open(tmp_path / f'{split}.jsonl', 'w') as f:
      for name, ids in zip(names[part], sets[part]):
        f.write(json.dumps({'path': name, 'labels': [['a', 'b', 'c'][k] for k in ids]}) + '\n')
  (tmp_path / 'classes.txt').write_text('a\nb\nc\n')
  data = tmp_path / 'data'
  meta = prepare_data.prepare(
      'folder', str(data), input_dir=str(tmp_path / 'images'), verbose=False,
      labels_file=f'train={tmp_path}/train.jsonl,test={tmp_path}/test.jsonl',
      class_names_file=str(tmp_path / 'classes.txt'))
  test_sets = sets[20:]
  assert meta['splits']['test']['num_unlabelled'] == sum(not s for s in test_sets)

  c = load_config('mosaic.py', 'det,runlocal')
  c.dataset.data_dir, c.dataset.num_classes, c.dataset.max_labels = str(data), 3, 3
  c.dataset.image_size = 8
  c.input.train_augment, c.input.batch_size, c.input.eval_batch_size = 'none', 8, 8
  c.train.num_steps, c.train.async_checkpointing = 2, False
  c.model.backbone, c.model.backbone_kwargs = 'convnet', type(c.model.backbone_kwargs)()  # fast
  result = train_and_evaluate(c, str(tmp_path / 'work'))
  assert result['num_examples'] == 10
  assert result['num_labelled'] == 10 - meta['splits']['test']['num_unlabelled']

  exp = Experiment.build(c)
  ckpt = Checkpointer(str(tmp_path / 'work'), save_every=1, keep=1, read_only=True)
  variables = ckpt.restore_variables(ckpt.latest_step(), exp.abstract_restore_target())
  images = np.stack([_rgb(files[n]) for n in names[20:]])   # decoded here, not by the pipeline
  out = exp.model.apply(jax.device_get(variables), images, train=False,
                        rngs=step_rngs(jax.random.key(EVAL_SEED), 0, exp.model.head))
  logits = np.asarray(out.logits, np.float64)
  y = np.zeros((10, 3))
  for i, s in enumerate(test_sets):
    y[i, s] = 1
  labelled = y.sum(1) > 0
  assert result['prec@1'] == pytest.approx(y[np.arange(10), logits.argmax(1)][labelled].mean())
  p = 1 / (1 + np.exp(-logits))
  nll = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1).mean()
  assert result['nll'] == pytest.approx(nll, rel=1e-4)
