"""Tests of the ArrayRecord dataset format, `launch.prepare_data` and `input_pipeline.image_ops`."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import image_ops, records
from launch import prepare_data

REAL_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         '..', 'shared', 'data')


def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _image(rng, h=12, w=10, c=3) -> np.ndarray:
  shape = (h, w) if c == 1 else (h, w, c)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _read_split(data_dir, split) -> list[tuple[int, bytes]]:
  from array_record.python.array_record_module import ArrayRecordReader
  out = []
  for path in records.split_paths(str(data_dir), split):
    reader = ArrayRecordReader(path)
    for r in reader.read_all():
      ids, image = records.decode_record(r)
      assert len(ids) == 1, ids
      out.append((int(ids[0]), image))
    reader.close()
  return out


@pytest.fixture
def image_tree(tmp_path):
  """ROOT/<split>/<class>/<file> with PNG/JPEG/grey images and one corrupt file.

  Returns (root, {split: [(label, file bytes), ...] in expected record order}).
  """
  rng = np.random.default_rng(0)
  root = tmp_path / 'images'
  layout = {'train': {'cat': 3, 'dog': 2, 'emu': 2}, 'test': {'cat': 1, 'dog': 2}}
  expected = {}
  for split, classes in layout.items():
    expected[split] = []
    for label, (name, n) in enumerate(sorted(classes.items())):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(n):
        if i % 2:
          data = _encode(_image(rng, c=1 if i == 3 else 3), 'JPEG', quality=90)
          f = d / f'img{i}.jpg'
        else:
          data = _encode(_image(rng, h=8 + i, c=1 if name == 'emu' else 3), 'PNG')
          f = d / f'img{i}.png'
        f.write_bytes(data)
        expected[split].append((label, data))
  good = _encode(_image(rng), 'JPEG')
  (root / 'train' / 'dog' / 'broken.jpg').write_bytes(good[:len(good) // 2])  # truncated
  (root / 'train' / 'dog' / '.hidden.png').write_bytes(b'ignored')
  return root, expected


# ------------------------------------------------------------------------ records format


def test_record_roundtrip_of_zero_one_and_many_labels():
  cases = [([], b''), (7, b'\xff\xd8jpeg'), ([3], bytes(range(256))),
           ([0, 5, 2**31 - 1, 9], b'x'), (list(range(300)), b'\x89PNG')]
  for labels, data in cases:
    rec = records.encode_record(labels, data)
    ids = [labels] if isinstance(labels, int) else labels
    # byte layout, written out by hand: uint16 count, int32 ids, then the image
    assert rec == (len(ids).to_bytes(2, 'little')
                   + b''.join(i.to_bytes(4, 'little', signed=True) for i in ids) + data)
    got, image = records.decode_record(rec)
    assert got.dtype == np.int32 and got.tolist() == ids and image == data


def test_version_1_records_still_decode():
  for label, data in [(0, b''), (7, b'\xff\xd8jpeg'), (2**31 - 1, b'x')]:
    rec = label.to_bytes(4, 'little', signed=True) + data
    got, image = records.decode_record(rec, version=1)
    assert got.tolist() == [label] and image == data
  with pytest.raises(ValueError, match='too short for its 3 labels'):
    records.decode_record(records.encode_record([1, 2, 3], b'')[:9])


def test_missing_dataset_names_prepare_command(tmp_path):
  for data_dir in (tmp_path / 'absent', tmp_path):
    with pytest.raises(FileNotFoundError, match=r'python -m launch\.prepare_data --source='):
      records.read_metadata(str(data_dir))
    with pytest.raises(FileNotFoundError, match='launch.prepare_data'):
      records.split_paths(str(data_dir), 'train')


# ------------------------------------------------------------------------ preparation


def test_folder_roundtrip_and_corrupt_skipped(image_tree, tmp_path, capsys):
  root, expected = image_tree
  out = tmp_path / 'out'
  meta = prepare_data.prepare('folder', str(out), input_dir=str(root), num_shards=2,
                              verbose=False)
  assert meta == records.read_metadata(str(out))
  assert meta['class_names'] == ['cat', 'dog', 'emu'] and meta['num_classes'] == 3
  assert meta['image_size'] is None  # mixed sizes
  assert set(meta['splits']) == {'train', 'test'}
  for split, want in expected.items():
    got = _read_split(out, split)
    assert got == want  # labels and bytes, bit-exact, in order
    assert meta['splits'][split]['num_examples'] == len(want)
    assert sum(meta['splits'][split]['shard_lengths']) == len(want)
  assert meta['splits']['train']['class_counts'] == [3, 2, 2]
  assert meta['splits']['test']['class_counts'] == [1, 2, 0]
  assert [s['source'] for s in meta['skipped']] == [str(root / 'train' / 'dog' / 'broken.jpg')]
  assert meta['num_skipped'] == 1 and meta['splits']['train']['num_skipped'] == 1
  assert 'broken.jpg' in capsys.readouterr().err
  assert sorted(os.listdir(out)) == sorted(
      ['metadata.json'] + [records.shard_name(s, i, 2) for s in ('train', 'test') for i in (0, 1)])


def test_single_split_folder(tmp_path):
  rng = np.random.default_rng(1)
  for name in ('b', 'a'):
    (tmp_path / 'in' / name).mkdir(parents=True)
    (tmp_path / 'in' / name / 'x.png').write_bytes(_encode(_image(rng, 4, 4), 'PNG'))
  meta = prepare_data.prepare('folder', str(tmp_path / 'out'), input_dir=str(tmp_path / 'in'),
                              verbose=False)
  assert list(meta['splits']) == ['train'] and meta['class_names'] == ['a', 'b']
  assert meta['image_size'] == [4, 4, 3]
  assert [label for label, _ in _read_split(tmp_path / 'out', 'train')] == [0, 1]


def test_rerun_replaces_without_duplicates(image_tree, tmp_path):
  root, expected = image_tree
  out = tmp_path / 'out'
  prepare_data.prepare('folder', str(out), input_dir=str(root), num_shards=3, verbose=False)
  (out / '.prepare-tmp-crashed').mkdir()  # leftover of an interrupted run
  (out / 'notes.txt').write_text('kept')
  meta = prepare_data.prepare('folder', str(out), input_dir=str(root), num_shards=1,
                              verbose=False)
  assert _read_split(out, 'train') == expected['train']
  assert meta['splits']['train']['shards'] == [records.shard_name('train', 0, 1)]
  assert sorted(os.listdir(out)) == sorted(['metadata.json', 'notes.txt',
                                            records.shard_name('train', 0, 1),
                                            records.shard_name('test', 0, 1)])


def _write_npz(path, images, labels, class_names, paths=None):
  blobs = [np.frombuffer(b, np.uint8) for b in images]
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  arrays = dict(blob=np.concatenate(blobs), offsets=offsets,
                labels=np.asarray(labels, np.int16), class_names=np.asarray(class_names))
  if paths is not None:
    arrays['paths'] = np.asarray(paths)
  np.savez(path, **arrays)


def test_npz_source(tmp_path):
  rng = np.random.default_rng(2)
  train = [_encode(_image(rng, 6, 6), 'JPEG', quality=75) for _ in range(5)]
  test = [_encode(_image(rng, 6, 6), 'JPEG', quality=75) for _ in range(3)]
  bad = b'\xff\xd8\xff not a jpeg'
  _write_npz(tmp_path / 'tr.npz', train + [bad], [0, 1, 2, 1, 0, 2], ['x', 'y', 'z'])
  _write_npz(tmp_path / 'te.npz', test, [2, 2, 0], ['x', 'y', 'z'], paths=['p0', 'p1', 'p2'])
  out = tmp_path / 'out'
  meta = prepare_data.prepare(f'npz:{tmp_path}/tr.npz,{tmp_path}/te.npz', str(out),
                              verbose=False)
  assert meta['class_names'] == ['x', 'y', 'z'] and meta['image_size'] == [6, 6, 3]
  assert _read_split(out, 'train') == list(zip([0, 1, 2, 1, 0], train))
  assert _read_split(out, 'test') == list(zip([2, 2, 0], test))
  assert [(s['split'], s['index']) for s in meta['skipped']] == [('train', 5)]
  # Named entries.
  meta = prepare_data.prepare(f'npz:val={tmp_path}/te.npz', str(out), verbose=False)
  assert list(meta['splits']) == ['val'] and not os.path.exists(
      out / records.shard_name('train', 0, 1))


def test_cli(tmp_path):
  rng = np.random.default_rng(3)
  _write_npz(tmp_path / 'a.npz', [_encode(_image(rng), 'PNG')] * 2, [0, 1], ['u', 'v'])
  prepare_data.main([f'--source=npz:{tmp_path}/a.npz', f'--out={tmp_path}/o', '--num_shards=2'])
  assert records.read_metadata(str(tmp_path / 'o'))['splits']['train']['shard_lengths'] == [1, 1]


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  images = [_encode(_image(np.random.default_rng(i), 5, 7), 'PNG') for i in range(4)]

  class PrepareDataFakeTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=['a', 'b'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, data in enumerate(images):  # encoded bytes: writing needs no TensorFlow
        yield i, {'image': io.BytesIO(data), 'label': i % 2}

  PrepareDataFakeTfds(data_dir=str(tmp_path / 'tfds'), file_format='array_record'
                      ).download_and_prepare()
  meta = prepare_data.prepare('tfds:prepare_data_fake_tfds', str(tmp_path / 'out'),
                              tfds_data_dir=str(tmp_path / 'tfds'), verbose=False)
  assert meta['class_names'] == ['a', 'b'] and meta['encoding'] == 'original bytes'
  got = _read_split(tmp_path / 'out', 'train')  # TFDS shuffles on write: compare as sets
  assert sorted(got) == sorted((i % 2, data) for i, data in enumerate(images))


def test_real_cifar10_test_split(tmp_path):
  if not os.path.isdir(REAL_DATA):
    pytest.skip(f'real data folder {os.path.normpath(REAL_DATA)} is absent')
  out = tmp_path / 'cifar10'
  meta = prepare_data.prepare('cifar10_npz', str(out), input_dir=REAL_DATA, splits=['test'],
                              verbose=False)
  assert meta['splits']['test']['num_examples'] == 10_000 and meta['num_skipped'] == 0
  assert meta['image_size'] == [32, 32, 3] and meta['num_classes'] == 10
  import grain
  source = grain.sources.ArrayRecordDataSource(records.split_paths(str(out), 'test'))
  assert len(source) == 10_000
  with np.load(os.path.join(REAL_DATA, 'cifar10_test_jpegq75.npz')) as d:
    blob, offsets, labels = d['blob'], d['offsets'], d['labels']
    assert meta['class_names'] == list(d['class_names'])
  for i in (0, 1234, 9999):
    image = blob[offsets[i]:offsets[i + 1]].tobytes()
    ids, data = records.decode_record(source[i])
    assert ids.tolist() == [labels[i]] and data == image


# ------------------------------------------------------------------------ image ops


def _pil_resize(img, h, w):
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def test_decode():
  img = _image(np.random.default_rng(4), 9, 7)
  np.testing.assert_array_equal(image_ops.decode(_encode(img, 'PNG')), img)
  grey = _image(np.random.default_rng(5), 9, 7, c=1)
  assert image_ops.decode(_encode(grey, 'PNG'), channels=1).shape == (9, 7, 1)
  np.testing.assert_array_equal(image_ops.decode(_encode(grey, 'PNG'))[..., 1], grey)


def test_random_resized_crop():
  rng = np.random.default_rng(6)
  img = _image(rng, 40, 30)
  for size, shape in [(16, (16, 16, 3)), ((12, 20), (12, 20, 3))]:
    assert image_ops.random_resized_crop(img, size, rng).shape == shape
  square = _image(rng, 24, 24)
  full = image_ops.random_resized_crop(square, 10, rng, scale=(1, 1), ratio=(1, 1))
  np.testing.assert_array_equal(full, _pil_resize(square, 10, 10))
  a = image_ops.random_resized_crop(img, 16, np.random.default_rng(7))
  b = image_ops.random_resized_crop(img, 16, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  # Impossible constraints fall back to the central crop of the nearest allowed aspect.
  wide = _image(rng, 10, 40)
  np.testing.assert_array_equal(
      image_ops.random_resized_crop(wide, (10, 13), rng, scale=(2, 3), ratio=(1.3, 1.3)),
      wide[:, 13:26])  # h = 10, w = round(10 * 1.3), left = (40 - 13) // 2


def test_crop_window_statistics():
  rng = np.random.default_rng(8)
  for _ in range(200):
    top, left, h, w = image_ops.sample_crop_window(50, 80, rng)
    assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80
    assert 0.08 * 4000 * 0.8 <= h * w <= 4000 and 0.7 <= w / h <= 1.4


def test_decode_and_random_crop_matches_slow_path():
  rng = np.random.default_rng(9)
  small = _image(rng, 30, 40)
  png = _encode(small, 'PNG')
  np.testing.assert_array_equal(
      image_ops.decode_and_random_crop(png, 16, np.random.default_rng(1)),
      image_ops.random_resized_crop(small, 16, np.random.default_rng(1)))
  y, x = np.mgrid[0:600, 0:800]
  smooth = np.stack([x * 255 // 800, y * 255 // 600, (x + y) % 256], -1).astype(np.uint8)
  jpeg = _encode(smooth, 'JPEG', quality=95)
  for seed in range(4):
    fast = image_ops.decode_and_random_crop(jpeg, 32, np.random.default_rng(seed))
    slow = image_ops.random_resized_crop(image_ops.decode(jpeg), 32, np.random.default_rng(seed))
    assert fast.shape == slow.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - slow).mean() < 3


def test_random_flip():
  img = _image(np.random.default_rng(10))
  np.testing.assert_array_equal(image_ops.random_flip(img, np.random.default_rng(0), p=1.0),
                                img[:, list(range(img.shape[1]))[::-1]])
  np.testing.assert_array_equal(image_ops.random_flip(img, np.random.default_rng(0), p=0.0), img)
  flips = [image_ops.random_flip(img, np.random.default_rng(s)) for s in range(40)]
  assert 5 < sum((f == img[:, ::-1]).all() for f in flips) < 35


def test_pad_random_crop():
  img = _image(np.random.default_rng(11), 8, 8)
  np.testing.assert_array_equal(image_ops.pad_random_crop(img, 0, np.random.default_rng(0)), img)
  for mode in ('reflect', 'constant'):
    out = [image_ops.pad_random_crop(img, 4, np.random.default_rng(s), mode=mode)
           for s in range(30)]
    assert all(o.shape == img.shape for o in out)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode=mode)
    windows = {(i, j) for i in range(9) for j in range(9)
               for o in out if (padded[i:i + 8, j:j + 8] == o).all()}
    assert len(windows) > 5  # many offsets, each a real window of the padded image
    np.testing.assert_array_equal(
        out[3], image_ops.pad_random_crop(img, 4, np.random.default_rng(3), mode=mode))


def test_center_crop_and_resize():
  img = _image(np.random.default_rng(12), 32, 32)
  np.testing.assert_array_equal(image_ops.center_crop_resize(img, 28), img[2:30, 2:30])
  rect = _image(np.random.default_rng(13), 40, 64)
  np.testing.assert_array_equal(image_ops.center_crop_resize(rect, 35, crop_fraction=1.0),
                                _pil_resize(rect[:, 12:52], 35, 35))
  np.testing.assert_array_equal(image_ops.resize(img, (16, 8)), _pil_resize(img, 16, 8))
  assert image_ops.resize(img, 32) is img
