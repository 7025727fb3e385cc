"""Image-text pairs from a captioned dataset (each image has its own text): the record format
(version 3, and versions 1 and 2 still read), preparation from a folder + CSV / JSONL with a
text column and its errors, the training batch carrying each record's own text (byte tokens,
locked-encoder embeddings), the contrastive loss on those texts against numpy, and one
end-to-end `launch.main` run on a tiny captioned folder."""
import csv
import functools
import io
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import schema
from hetxl.contrastive import ContrastiveHead
from input_pipeline import captions, records
from input_pipeline.pipeline import train_dataset
from input_pipeline.sources import RecordSource, build_source
from launch import prepare_data
from launch.prepare_data import LabelsFileError
from launch.prepare_text import dataset_texts, write_embeddings, write_image_text_embeddings
from tests.helpers import last_json, run_main
from tests.test_contrastive import _fake_encoder, _numpy_loss

CLASSES = ['bird', 'cat', 'dog']
TRAIN, TEST = 24, 8


def _png(value: int, size: int = 8) -> bytes:
  """A flat RGB image whose pixels all equal `value`: the example's id, readable in a batch."""
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _text(i: int) -> str:
  """Example i's text: distinct per example, non-ASCII, with commas and a quote."""
  return f'photo {i}, a café "nº {i}" with {CLASSES[i % 3]}s' + (' and more' * (i % 4))


def _labels(i: int) -> list:
  return [] if i == 5 else [CLASSES[i % 3]] + ([CLASSES[(i + 1) % 3]] if i % 4 == 0 else [])


def _write_images(root, n: int) -> None:
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (root / f'{i:02d}.png').write_bytes(_png(7 * i))


@pytest.fixture(scope='module')
def captioned(tmp_path_factory):
  """A prepared captioned dataset: train (CSV with a text column) and test (JSONL with
  "text") splits, example i's image is flat 7 * i, its text `_text(i)`."""
  d = tmp_path_factory.mktemp('captioned')
  _write_images(d / 'images', TRAIN + TEST)
  with open(d / 'train.csv', 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['path', 'labels', 'text'])
    for i in range(TRAIN):
      w.writerow([f'{i:02d}.png', '|'.join(_labels(i)), _text(i)])
  with open(d / 'test.jsonl', 'w', encoding='utf-8') as f:
    for i in range(TRAIN, TRAIN + TEST):
      f.write(json.dumps({'path': f'{i:02d}.png', 'labels': _labels(i), 'text': _text(i)}) + '\n')
  meta = prepare_data.prepare('folder', str(d / 'data'), input_dir=str(d / 'images'),
                              labels_file=f'train={d}/train.csv,test={d}/test.jsonl',
                              num_shards=2, verbose=False)
  return d / 'data', meta


def _dataset(data_dir, **kw):
  c = schema.base_config()
  ds = c.dataset
  ds.name, ds.data_dir, ds.num_classes, ds.channels = 'arrayrecord', str(data_dir), 3, 3
  ds.multi_label, ds.max_labels = True, 2
  ds.update(kw)
  return ds


# ------------------------------------------------------------------------------ records


def test_record_round_trip_with_text_and_older_versions_still_read():
  image = _png(3)
  for text in ('a dog, on a "sofa"\nat night: 狗 🐕', ''):
    rec = records.encode_record([2, 0], image, text)
    data = text.encode('utf-8')
    assert rec == struct.pack('<H2iI', 2, 2, 0, len(data)) + data + image   # the documented layout
    ids, got_image, got_text = records.decode_record_text(rec, records.TEXT_FORMAT_VERSION)
    assert ids.tolist() == [2, 0] and got_image == image and got_text == text
    ids, got_image = records.decode_record(rec, 3)
    assert ids.tolist() == [2, 0] and got_image == image
  # Without a text: version 2, byte for byte as before; version 1 still read.
  v2 = records.encode_record(4, image)
  assert v2 == struct.pack('<Hi', 1, 4) + image
  assert records.decode_record_text(v2, 2)[2] is None
  ids, got_image, text = records.decode_record_text(struct.pack('<i', 7) + image, 1)
  assert ids.tolist() == [7] and got_image == image and text is None
  full = records.encode_record([1], image, 'twelve bytes')
  for cut, what in ((7, 'text length'), (12, '12-byte text')):
    with pytest.raises(ValueError, match=what):
      records.decode_record_text(full[:cut], 3)
  with pytest.raises(ValueError, match='unknown'):
    records.decode_record(v2, 4)
  with pytest.raises(UnicodeEncodeError):
    records.encode_record(1, image, 'lone \ud800')


def test_prepared_captioned_folder_holds_every_text(captioned):
  data, meta = captioned
  assert meta['format_version'] == records.TEXT_FORMAT_VERSION and meta['has_text'] is True
  assert meta['record_format'] == records.TEXT_RECORD_FORMAT and meta['class_names'] == CLASSES
  for split, ids in (('train', range(TRAIN)), ('test', range(TRAIN, TRAIN + TEST))):
    source = RecordSource(records.split_paths(str(data), split), meta['format_version'])
    got = [source[k] for k in range(len(source))]
    assert [g['text'] for g in got] == [_text(i) for i in ids]
    assert [g['image'] for g in got] == [_png(7 * i) for i in ids]
    assert [np.atleast_1d(g['label']).tolist() for g in got] == [
        sorted(CLASSES.index(n) for n in _labels(i)) for i in ids]
  assert dataset_texts(str(data)) == [_text(i) for i in range(TRAIN + TEST)]


def test_dataset_without_texts_is_written_as_before(tmp_path):
  _write_images(tmp_path / 'images', 2)
  (tmp_path / 'l.csv').write_text('path,labels\n00.png,cat\n01.png,\n')
  meta = prepare_data.prepare('folder', str(tmp_path / 'out'), input_dir=str(tmp_path / 'images'),
                              labels_file=str(tmp_path / 'l.csv'), verbose=False)
  on_disk = json.loads((tmp_path / 'out' / records.METADATA_FILE).read_text())
  assert on_disk['format_version'] == 2 and 'has_text' not in on_disk
  assert on_disk['record_format'] == records.RECORD_FORMAT and meta['has_text'] is False
  source = RecordSource(records.split_paths(str(tmp_path / 'out'), 'train'), 2)
  assert 'text' not in source[0] and dataset_texts(str(tmp_path / 'out')) == []


# Each case: labels files ({name: text or bytes}), the --labels_file value (names in tmp_path),
# and the fragments the error must hold, {d} standing for tmp_path.
_BAD = {
    'csv row without its text': (
        {'l.csv': 'path,labels,text\n00.png,cat,a cat\n01.png,dog\n'}, 'l.csv',
        ['{d}/l.csv:3: expected 3 fields (path,labels,text)']),
    'csv empty text': (
        {'l.csv': 'path,labels,text\n00.png,cat,a cat\n01.png,dog,"  "\n'}, 'l.csv',
        ['{d}/l.csv:3: empty text']),
    'csv text without the header': (
        {'l.csv': '00.png,cat,a cat\n'}, 'l.csv',
        ['{d}/l.csv:1: expected 2 fields (path,labels), got 3', 'header row path,labels,text']),
    'jsonl line without text where others have one': (
        {'l.jsonl': '{"path": "00.png", "labels": [], "text": "x"}\n\n'
                    '{"path": "01.png", "labels": []}\n'}, 'l.jsonl',
        ['{d}/l.jsonl:3: no "text", but other images of this file have one (first at line 1)']),
    'jsonl text not a string': (
        {'l.jsonl': '{"path": "00.png", "labels": [], "text": ["x"]}\n'}, 'l.jsonl',
        ['{d}/l.jsonl:1: text must be a string']),
    'jsonl lone surrogate': (
        {'l.jsonl': '{"path": "00.png", "labels": [], "text": "bad \\ud800"}\n'}, 'l.jsonl',
        ['{d}/l.jsonl:1: text is not valid Unicode']),
    'texts in one split only': (
        {'tr.csv': 'path,labels,text\n00.png,cat,a cat\n',
         'te.jsonl': '{"path": "01.png", "labels": ["dog"]}\n'}, 'train=tr.csv,test=te.jsonl',
        ['{d}/te.jsonl:1: no texts in this file, but {d}/tr.csv gives its images texts']),
    'empty file': ({'l.csv': ''}, 'l.csv', ['{d}/l.csv:1: no image listed (the file is empty']),
    'header only': ({'l.csv': 'path,labels,text\n'}, 'l.csv', ['{d}/l.csv:1: no image listed']),
    'not utf-8': (
        {'l.csv': 'path,labels,text\n00.png,cat,a caf\xe9\n'.encode('latin-1')}, 'l.csv',
        ['{d}/l.csv:2: not UTF-8 text']),
}


@pytest.mark.parametrize('case', sorted(_BAD))
def test_bad_text_input_names_file_and_line_and_writes_nothing(tmp_path, case):
  files, spec, fragments = _BAD[case]
  _write_images(tmp_path / 'images', 2)
  for name, content in files.items():
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
  spec = ','.join(f'{s}{eq}{tmp_path}/{n}' for s, eq, n in (e.rpartition('=')
                                                            for e in spec.split(',')))
  with pytest.raises(LabelsFileError) as e:
    prepare_data.prepare('folder', str(tmp_path / 'out'), input_dir=str(tmp_path / 'images'),
                         labels_file=spec, verbose=False)
  for fragment in fragments:
    assert fragment.replace('{d}', str(tmp_path)) in str(e.value), str(e.value)
  assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------ pipeline + head


def _batches(data, text_input, n=3, batch=8):
  source = build_source(_dataset(data), 'train', 0, train=True)[0]
  it = iter(train_dataset(source, global_batch=batch, seed=1, augment='none', image_size=0,
                          channels=3, text_input=text_input))
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _ids(batch) -> np.ndarray:
  """Example ids from the flat images (pixel value 7 * id)."""
  return batch['image'][:, 0, 0, 0].astype(int) // 7


def _locked_files(data):
  """The fake encoder's class-prompt and per-image embeddings, as launch.prepare_text writes."""
  write_embeddings(captions.embeddings_path(str(data)), CLASSES, captions.TEMPLATES,
                   _fake_encoder, 'fake')
  write_image_text_embeddings(os.path.join(str(data), captions.IMAGE_TEXT_EMBEDDINGS_FILE),
                              dataset_texts(str(data)), _fake_encoder)


def test_batches_carry_each_records_own_text(captioned):
  data, _ = captioned
  seen = set()
  for batch in _batches(data, captions.TextInput('tokens', context_length=24)):
    ids = _ids(batch)
    assert batch['text'].dtype == np.int32 and batch['text'].shape == (8, 24)
    np.testing.assert_array_equal(batch['text'],
                                  captions.byte_tokenize([_text(i) for i in ids], 24))
    seen |= set(ids.tolist())
  assert seen == set(range(TRAIN))          # three batches of 8: one epoch, every example once
  _locked_files(data)
  text_input = captions.text_input(_dataset(data), 'locked', 0)
  assert text_input.shape == (12,) and text_input.dtype == np.float32
  for batch in _batches(data, text_input, n=2):
    np.testing.assert_allclose(batch['text'], _fake_encoder([_text(i) for i in _ids(batch)]),
                               rtol=1e-6)
  with pytest.raises(ValueError, match='no embedding in .*re-run'):
    text_input('a text that was never embedded')


def test_per_image_text_loss_equals_numpy(captioned):
  """The head built from the captioned dataset reads each image's own text: its loss on a
  pipeline batch equals the numpy loss of the fake encoder's embeddings of those texts, and
  differs from the class-template loss with the same parameters."""
  data, _ = captioned
  _locked_files(data)
  kw = dict(embed_dim=6, text_tower='locked', templates=captions.TEMPLATES)
  head = ContrastiveHead.from_dataset(_dataset(data), 3, **kw)
  assert head.captions_from == 'dataset' and head.label_sets_unsupported is None
  batch = _batches(data, head.text_input, n=1)[0]
  mask = np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)
  feats = np.random.default_rng(0).normal(0, 2, (8, 5)).astype(np.float32)
  rngs = {'params': jax.random.key(0), 'captions': jax.random.key(1)}
  args = (jnp.asarray(feats), jnp.asarray(batch['label']))
  params = jax.jit(functools.partial(head.init, train=True))(
      rngs, *args, mask=mask, text=batch['text'])['params']
  loss = np.asarray(jax.jit(functools.partial(head.apply, train=True))(
      {'params': params}, *args, mask=mask, text=batch['text'], rngs=rngs).loss)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  z = unit(feats @ p['image_projection']['kernel'] + p['image_projection']['bias'])
  emb = _fake_encoder([_text(i) for i in _ids(batch)])
  t = unit(emb @ p['text']['projection']['kernel'] + p['text']['projection']['bias'])
  logits = np.exp(p['log_inverse_temperature']) * z @ t.T
  np.testing.assert_allclose(loss, _numpy_loss(logits[None], mask), rtol=1e-5, atol=1e-6)

  templated = ContrastiveHead.from_dataset(_dataset(data, multi_label=False), 3,
                                           captions_from='templates', **kw)
  assert templated.text_input is None and templated.label_sets_unsupported
  single = jnp.asarray(np.maximum(batch['label'][:, 0], 0))
  other = np.asarray(jax.jit(functools.partial(templated.apply, train=True))(
      {'params': params}, args[0], single, mask=mask, rngs=rngs).loss)
  assert np.abs(other - loss).max() > 1e-2
  with pytest.raises(ValueError, match="call it with text="):
    jax.eval_shape(functools.partial(head.apply, train=True), {'params': params}, *args,
                   mask=mask, rngs=rngs)


def test_asking_for_texts_on_data_without_them_is_a_clear_error(tmp_path):
  (tmp_path / 'images' / 'cat').mkdir(parents=True)
  (tmp_path / 'images' / 'cat' / 'a.png').write_bytes(_png(1))
  prepare_data.prepare('folder', str(tmp_path / 'data'), input_dir=str(tmp_path / 'images'),
                       verbose=False)
  ds = _dataset(tmp_path / 'data', num_classes=1, multi_label=False)
  with pytest.raises(ValueError, match="captions_from='dataset' trains on each image's own "
                     "text, but arrayrecord dataset .* has none"):
    ContrastiveHead.from_dataset(ds, 1, captions_from='dataset')
  auto = ContrastiveHead.from_dataset(ds, 1)          # 'auto': the class-name templates
  assert auto.captions_from == 'templates' and auto.text_input is None
  with pytest.raises(ValueError, match="'auto', 'dataset' or 'templates'"):
    ContrastiveHead.from_dataset(ds, 1, captions_from='own')


def test_locked_tower_without_image_text_embeddings_says_how_to_write_them(captioned, tmp_path):
  data, _ = captioned
  copy = tmp_path / 'copy'
  shutil.copytree(data, copy, ignore=shutil.ignore_patterns(captions.IMAGE_TEXT_EMBEDDINGS_FILE))
  with pytest.raises(FileNotFoundError, match='python -m launch.prepare_text'):
    captions.text_input(_dataset(copy), 'locked', 0)


def test_train_and_eval_on_a_captioned_folder(captioned, tmp_path):
  """launch.main on the captioned dataset (own texts, locked tower: the pipeline looks each
  text's embedding up in the grain workers; the batch sharded over 2 devices): trains 2 steps
  and evaluates zero-shot on the 8 test images."""
  data, _ = captioned
  _locked_files(data)
  proc = run_main('--config=configs/contrastive_caltech.py:runlocal,size=16,text=locked,'
                  f'data={data}', '--config.input.num_workers=1',
                  '--config.model.head_kwargs.captions_from=dataset',
                  '--config.train.num_steps=2', '--config.train.async_checkpointing=False',
                  f'--workdir={tmp_path / "work"}', devices=2)
  result = last_json(proc.stdout)
  assert result['step'] == 2 and result['num_examples'] == TEST
  losses = [json.loads(line) for line in open(tmp_path / 'work' / 'metrics.jsonl')]
  assert [m['step'] for m in losses if 'loss' in m] == [1, 2]
  assert all(np.isfinite(m['loss']) for m in losses if 'loss' in m)
