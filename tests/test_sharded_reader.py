"""The sharded training reader and shard sizing (issue 29 points 2 and 3).

A tiny dataset (96 8x8 PNGs, 8 shards of 12) is written with the project's own writer; pixel
(0, 0) of image i is i, so every batch says which records it holds. Processes are simulated
by passing process_index / process_count.
"""
import io
import json

import grain
import numpy as np
import pytest
from absl import flags
from PIL import Image

from input_pipeline import pipeline, records, sources
from launch import prepare_data

N, PER_SHARD, BATCH = 96, 12, 4


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('sharded')
  blobs = []
  for i in range(N):
    a = np.full((8, 8), 255 - i, np.uint8)
    a[0, 0] = i
    b = io.BytesIO()
    Image.fromarray(a).save(b, format='PNG')
    blobs.append(b.getvalue())
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  np.savez(tmp / 'd.npz', blob=np.frombuffer(b''.join(blobs), np.uint8), offsets=offsets,
           labels=np.arange(N) % 7, class_names=np.array([str(k) for k in range(7)]))
  prepare_data.prepare(f'npz:train={tmp}/d.npz,test={tmp}/d.npz', str(tmp / 'out'),
                       shard_records=PER_SHARD, verbose=False)
  return str(tmp / 'out')


def _source(data_dir):
  meta = records.read_metadata(data_dir)
  return sources.RecordSource(records.split_paths(data_dir, 'train'), 2,
                              meta['splits']['train']['shard_lengths'])


def _run(source, count, *, p=0, num_p=1, state=None, workers=0, streams=2, shuffle=True,
         batch=BATCH, keep_open=False):
  it = pipeline.train_dataset(source, global_batch=batch * num_p, seed=3, augment='none',
                              image_size=8, channels=1, shuffle=shuffle, reader='sharded',
                              streams=streams, cycle_length=2, window=8, process_index=p,
                              process_count=num_p, num_workers=workers)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(count)]
  final = it.get_state()
  if not keep_open:
    it.close()
  return (out, final, it) if keep_open else (out, final)


def _ids(batches):
  return [int(x) for b in batches for x in b['image'][:, 0, 0, 0]]


def test_the_writer_sizes_shards_by_record_count_and_the_source_reads_counts_from_metadata(
    data_dir, monkeypatch):
  meta = records.read_metadata(data_dir)['splits']['train']
  assert meta['shard_lengths'] == [PER_SHARD] * (N // PER_SHARD)
  assert prepare_data.default_num_shards(200_000, 200_000 * 100) == 20       # records rule
  assert prepare_data.default_num_shards(1_000, 1_000 * (1 << 20)) == 4      # bytes rule
  opened = []
  real = sources.open_shard
  monkeypatch.setattr(sources, 'open_shard', lambda path: opened.append(path) or real(path))
  source = _source(data_dir)
  assert len(source) == N and opened == []            # no shard opened to count records
  reference = grain.sources.ArrayRecordDataSource(records.split_paths(data_dir, 'train'))
  for i in (0, 11, 12, 50, N - 1):                    # record i = grain's record i
    labels, image = records.decode_record(reference[i])
    assert source[i]['label'] == int(labels[0]) and source[i]['image'] == image
  assert sources.RecordSource(records.split_paths(data_dir, 'train'), 2).shard_lengths.tolist() \
      == meta['shard_lengths']                        # without lengths: counted by opening
  assert len(opened) == 4 + 8       # the shards of the 5 records read (0, 1, 4, 7), then all


def test_every_example_of_each_epoch_once_across_2_processes_x_2_streams(data_dir):
  per_epoch = N // (2 * BATCH)                        # batches per process per epoch
  seen, shards = {0: [], 1: []}, []
  for p in (0, 1):
    out, _ = _run(_source(data_dir), 2 * per_epoch, p=p, num_p=2)
    seen[0] += _ids(out[:per_epoch])
    seen[1] += _ids(out[per_epoch:])
    shards.append([{i // PER_SHARD for i in _ids(out[e * per_epoch:(e + 1) * per_epoch])}
                   for e in (0, 1)])
  assert sorted(seen[0]) == list(range(N)) and sorted(seen[1]) == list(range(N))
  assert seen[0] != seen[1]                           # reshuffled per epoch
  assert all(len(s) == 4 for s in shards[0] + shards[1])   # whole shards per process
  assert shards[0][0] != shards[0][1]                 # assigned anew each epoch


def test_a_process_opens_only_the_shards_it_reads_and_closes_them(data_dir, monkeypatch):
  opened = []
  real = sources.open_shard
  monkeypatch.setattr(sources, 'open_shard', lambda path: opened.append(path) or real(path))
  source = _source(data_dir)
  # Unshuffled, visit v is shard v mod 8; process 0 of 2 with 2 streams reads visits 0, 2, 4,
  # ... (stream 0: 0, 4, 8, ...; stream 1: 2, 6, ...): shards 0, 2, 4, 6 in every epoch.
  out, _, it = _run(source, 3 * N // (2 * BATCH), p=0, num_p=2, shuffle=False, keep_open=True)
  mine = {source.path(s) for s in (0, 2, 4, 6)}
  assert set(opened) == mine
  assert {i // PER_SHARD for i in _ids(out)} == {0, 2, 4, 6}
  it.close()
  assert source.open_shards() == []
  # One shard visit: open from its first read to its end, then closed.
  visit = iter(pipeline._ShardExamples(source, True, 0).map((5, 3)))
  assert source.open_shards() == []
  got = [next(visit)['image'] for _ in range(PER_SHARD)]
  assert source.open_shards() == [3]
  with pytest.raises(StopIteration):
    next(visit)
  assert source.open_shards() == []
  assert sorted(got) == sorted(source[i]['image'] for i in range(3 * PER_SHARD, 4 * PER_SHARD))


def test_a_resume_continues_at_the_same_example(data_dir):
  reference, _ = _run(_source(data_dir), 11)
  _, state = _run(_source(data_dir), 5)              # mid-epoch, mid-window
  assert state['sharded_next_batch'] == 5 and len(state['streams']) == 2
  state = json.loads(json.dumps(state))               # as grain's checkpoint handler keeps it
  rest, _ = _run(_source(data_dir), 6, state=state)
  for got, want in zip(rest, reference[5:]):
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  # Another batch size continues at the same example of every stream: the 2 streams' own
  # sequences are unchanged, only cut into batches of 2.
  rest2, _ = _run(_source(data_dir), 12, state=state, batch=2)
  assert _per_stream(_ids(rest2), 2) == _per_stream(_ids(reference[5:]), BATCH)


def _per_stream(ids, batch):
  """The examples of each of 2 streams, from batches that alternate between them."""
  chunks = [ids[i:i + batch] for i in range(0, len(ids), batch)]
  return sum(chunks[0::2], []), sum(chunks[1::2], [])


def test_a_resume_with_another_stream_count_is_adopted_or_named(data_dir):
  reference, _ = _run(_source(data_dir), 7)
  _, state = _run(_source(data_dir), 3, streams=2)
  rest, _ = _run(_source(data_dir), 4, state=state, streams=0)   # auto: the saved 2
  assert _ids(rest) == _ids(reference[3:])
  with pytest.raises(ValueError, match='shard_streams=2'):
    _run(_source(data_dir), 1, state=state, streams=3)
  with pytest.raises(ValueError, match='input.reader=sharded'):
    pipeline._examples_consumed(state)                 # the global reader given this state


def test_2_processes_x_2_grain_workers_read_every_example_once_and_resume_in_process(data_dir):
  """Real grain worker processes: each runs one stream, so the batches equal the in-process
  ones, and a position saved with 2 workers resumes exactly with none."""
  per_epoch = N // (2 * BATCH)
  seen = []
  for p in (0, 1):
    first, state = _run(_source(data_dir), per_epoch, p=p, num_p=2, workers=2)
    seen += _ids(first)
  assert sorted(seen) == list(range(N))
  reference, _ = _run(_source(data_dir), per_epoch + 3, p=1, num_p=2)
  assert _ids(first) == _ids(reference[:per_epoch])
  rest, _ = _run(_source(data_dir), 3, p=1, num_p=2, state=state)   # resumed in-process
  assert _ids(rest) == _ids(reference[per_epoch:])


def test_choose_reader():
  from input_pipeline.sources import ArraySource, CheckedLabels
  memory = ArraySource(np.zeros((4, 2, 2, 1), np.uint8), np.arange(4))
  assert pipeline.choose_reader(memory, 'auto')[0] == 'global'
  with pytest.raises(ValueError, match="input.reader='sharded' reads a prepared dataset"):
    pipeline.choose_reader(memory, 'sharded')
  with pytest.raises(ValueError, match='input.reader must be one of'):
    pipeline.choose_reader(memory, 'fast')


def test_auto_reader_threshold(data_dir):
  source = sources.CheckedLabels(_source(data_dir), 7, 'train')
  kind, why = pipeline.choose_reader(source, 'auto', sharded_above=N)
  assert kind == 'global' and '96 train records <= input.sharded_above = 96' in why
  kind, why = pipeline.choose_reader(source, 'auto', sharded_above=N - 1)
  assert kind == 'sharded' and 'own shards' in why
  assert pipeline.choose_reader(source, 'global', sharded_above=0)[0] == 'global'


def test_training_resumes_at_the_same_example_from_its_checkpoint(data_dir, tmp_path):
  """launch.train with input.reader='sharded': 2 steps, then a resume to 4 (the data position
  through orbax) gives the losses of 4 straight steps."""
  from launch.train import train_and_evaluate
  from tests.test_train_eval import _config, _losses
  c = dict(**{'dataset.name': 'arrayrecord', 'dataset.data_dir': data_dir,
              'dataset.num_classes': 7, 'input.reader': 'sharded', 'input.batch_size': 8,
              'input.shard_streams': 2, 'input.shards_interleaved': 2,
              'input.shuffle_window': 8, 'optimizer.schedule': 'constant',
              'optimizer.warmup_steps': 0})
  straight, work = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train_and_evaluate(_config(4, **c), straight)
  train_and_evaluate(_config(2, **c), work)
  train_and_evaluate(_config(4, **c), work)
  want, got = _losses(straight), _losses(work)
  assert got[3] == pytest.approx(want[3], rel=1e-6) and got[4] == pytest.approx(want[4], rel=1e-6)
