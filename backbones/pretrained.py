"""Public big_vision checkpoints (`.npz`) -> this suite's backbone parameters.

big_vision saves parameters as one `.npz` whose keys are the '/'-joined parameter paths
(`big_vision.utils.save_params`). Two architectures load:
  * ViT (`backbones.vit.ViT`) from big_vision's `models/vit.py` names (`embedding`, `cls`,
    `pos_embedding`, `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
    LayerNorm_1, MlpBlock_0/Dense_{0,1}}`, `Transformer/encoder_norm`), including the older
    files big_vision's `fix_old_checkpoints` accepts (pre-Linen module numbering such as
    `MlpBlock_3`, `Transformer/posembed_input/pos_embedding` with the class-token row first).
    A scanned ViT (`scan=True`, blocks stacked [depth, ...]) takes the file's per-block arrays
    stacked, or a scanned file's `Transformer/encoderblock/...` arrays as they are.
    The grid of position embeddings is resampled bilinearly (`resample_posemb`, as big_vision's:
    `scipy.ndimage.zoom(order=1)`) when the image size or patch size gives another grid.
  * BiT (`backbones.bit.BiT`, ResNet-v2) from big_vision's `models/bit_paper.py` names, or from
    the original BiT release's TensorFlow names (`resnet/block1/unit01/a/standardized_conv2d/
    kernel`, ...), converted as `bit_paper.maybe_convert_big_transfer_format` does.
Anything else in the file (`head`, `pre_logits`, `MAPHead_0`) is not loaded and is reported,
so the classification head stays freshly initialised. `backbones.resnet.ResNet` (v1.5,
BatchNorm) has no published big_vision counterpart: asking for it is an error that says so.
`training.warm_start` calls `load_backbone` for `train.init_from=<file>.npz`.
"""
import os
import re
from typing import Callable, Dict, Iterable, Sequence, Tuple

import numpy as np
import scipy.ndimage

from backbones.bit import BiT
from backbones.resnet import ResNet
from backbones.vit import ViT

Flat = Dict[str, np.ndarray]


class CheckpointMismatchError(ValueError):
  """The checkpoint's names or shapes do not fit the backbone; the message lists every
  difference."""


def read_npz(path: str) -> Flat:
  """{'/'-joined name: array} of a big_vision `.npz` checkpoint. Raises FileNotFoundError."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'pretrained checkpoint {path} does not exist (train.init_from)')
  with np.load(path, allow_pickle=False) as f:
    return {k: np.asarray(f[k]) for k in f.files}


def renumber_pre_linen(flat: Iterable[str]) -> Dict[str, str]:
  """Pre-Linen Flax numbered sibling modules with one counter (`LayerNorm_0`,
  `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`); Linen numbers each type from
  0. Returns {Linen name: name in `flat`}: every `Type_N` path segment renumbered per type and
  parent in order of N (the pre-Linen to Linen naming rule); Linen names map to themselves."""
  children: Dict[Tuple[str, ...], set] = {}
  for key in flat:
    parts = key.split('/')
    for i, part in enumerate(parts):
      children.setdefault(tuple(parts[:i]), set()).add(part)
  rename: Dict[Tuple[Tuple[str, ...], str], str] = {}
  for parent, names in children.items():
    numbered = sorted((int(m.group(2)), m.group(1), name) for name in names
                      if (m := re.fullmatch(r'(.+)_(\d+)', name)))
    counters: Dict[str, int] = {}
    for _, kind, name in numbered:
      rename[parent, name] = f'{kind}_{counters.setdefault(kind, 0)}'
      counters[kind] += 1
  return {'/'.join(rename.get((tuple(parts[:i]), p), p) for i, p in enumerate(parts)): key
          for key in flat for parts in [key.split('/')]}


def resample_posemb(grid: np.ndarray, size: int) -> np.ndarray:
  """Position embeddings [1, g*g, C] of a g x g patch grid -> [1, size*size, C], bilinear
  (scipy.ndimage.zoom, order 1, corners aligned), as big_vision's `resample_posemb`."""
  g = _side(grid.shape[1], 'the checkpoint')
  if g == size:
    return grid
  zoomed = scipy.ndimage.zoom(grid.reshape(g, g, -1), (size / g, size / g, 1), order=1)
  return zoomed.reshape(1, size * size, -1)


def _side(n: int, where: str) -> int:
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise CheckpointMismatchError(f'{where} has {n} position embeddings, not a square grid of '
                                  'patches; only square grids are resampled')
  return side


# Each converter: (checkpoint, target) -> ({our name: value} for the names found, {our name:
# its name(s) in the file, or the name looked for}).

# ----- ViT: our name -> big_vision name (regex rules applied in order, first match).
_VIT_NAMES = (
    (r'patch_embed/(.*)', r'embedding/\1'),
    (r'cls', 'cls'),
    (r'pos_embedding', 'pos_embedding'),
    (r'block(\d+)/ln1/(.*)', r'Transformer/encoderblock_\1/LayerNorm_0/\2'),
    (r'block(\d+)/ln2/(.*)', r'Transformer/encoderblock_\1/LayerNorm_1/\2'),
    (r'block(\d+)/attn/(.*)', r'Transformer/encoderblock_\1/MultiHeadDotProductAttention_0/\2'),
    (r'block(\d+)/mlp/fc1/(.*)', r'Transformer/encoderblock_\1/MlpBlock_0/Dense_0/\2'),
    (r'block(\d+)/mlp/fc2/(.*)', r'Transformer/encoderblock_\1/MlpBlock_0/Dense_1/\2'),
    (r'ln_final/(.*)', r'Transformer/encoder_norm/\1'),
)


def _vit(checkpoint: Flat, target: Flat) -> Tuple[Flat, Dict[str, str]]:
  linen = renumber_pre_linen(checkpoint)       # Linen name -> name in the file
  for old in ('Transformer/posembed_input/pos_embedding', 'Transformer/pos_embedding'):
    if old in linen:
      linen['pos_embedding'] = linen.pop(old)
  names = {ours: _rename(ours, _VIT_NAMES) for ours in target}
  names = {ours: linen.get(bv, bv) for ours, bv in names.items()}
  values = {ours: checkpoint[key] for ours, key in names.items() if key in checkpoint}
  for ours in (k for k in target if k.startswith('blocks/')):   # scan=True: [depth, ...]
    names[ours], value = _stacked(checkpoint, linen, ours[len('blocks/'):], target[ours].shape[0])
    if value is not None:
      values[ours] = value
  if 'pos_embedding' in values:
    values['pos_embedding'] = _vit_posemb(values['pos_embedding'], target['pos_embedding'],
                                          with_cls='cls' in target)
  return values, names


def _stacked(checkpoint: Flat, linen: Dict[str, str], rest: str, depth: int):
  """(file names, value [depth, ...] or None) of one parameter of a scanned ViT (`scan=True`):
  the file's scanned `Transformer/encoderblock/...` array, or its `encoderblock_{i}` arrays
  stacked; when absent, the first name missing."""
  per_block = [_rename(f'block{i}/{rest}', _VIT_NAMES) for i in range(depth)]
  scanned = per_block[0].replace('encoderblock_0/', 'encoderblock/')
  if scanned in checkpoint:
    return scanned, checkpoint[scanned]
  keys = [linen.get(name, name) for name in per_block]
  absent = [k for k in keys if k not in checkpoint]
  if absent:
    return absent[0], None
  return tuple(keys), np.stack([checkpoint[k] for k in keys])


def _vit_posemb(pos: np.ndarray, target: np.ndarray, with_cls: bool) -> np.ndarray:
  """big_vision's [1, g*g, C] (added before the class token is prepended) or the older
  [1, 1 + g*g, C] (class-token row first) -> ours: [1, (1 +) G*G, C], the class-token row first
  when the model has one (zeros for the newer layout, where the class token gets none)."""
  n = pos.shape[1]
  combined = int(round(np.sqrt(n - 1))) ** 2 == n - 1 and n > 1
  cls_row, grid = (pos[:, :1], pos[:, 1:]) if combined else (np.zeros_like(pos[:, :1]), pos)
  side = _side(target.shape[1] - int(with_cls), 'the model')
  grid = resample_posemb(grid, side)
  return np.concatenate([cls_row, grid], axis=1) if with_cls else grid


# ----- BiT: big_vision's bit_paper names are ours; the BiT release's TF names are converted.
_BIT_TF_NAMES = (
    (r'resnet/root_block/standardized_conv2d(_\d+)?/kernel', 'root_block/conv_root/kernel'),
    (r'resnet/group_norm/gamma', 'norm-pre-head/scale'),
    (r'resnet/group_norm/beta', 'norm-pre-head/bias'),
    (r'resnet/(block\d)/(unit\d+)/a/proj/standardized_conv2d(_\d+)?/kernel',
     r'\1/\2/conv_proj/kernel'),
    (r'resnet/(block\d)/(unit\d+)/a/standardized_conv2d(_\d+)?/kernel', r'\1/\2/conv1/kernel'),
    (r'resnet/(block\d)/(unit\d+)/b/standardized_conv2d(_\d+)?/kernel', r'\1/\2/conv2/kernel'),
    (r'resnet/(block\d)/(unit\d+)/c/standardized_conv2d(_\d+)?/kernel', r'\1/\2/conv3/kernel'),
    (r'resnet/(block\d)/(unit\d+)/a/group_norm/gamma', r'\1/\2/gn1/scale'),
    (r'resnet/(block\d)/(unit\d+)/a/group_norm/beta', r'\1/\2/gn1/bias'),
    (r'resnet/(block\d)/(unit\d+)/b/group_norm/gamma', r'\1/\2/gn2/scale'),
    (r'resnet/(block\d)/(unit\d+)/b/group_norm/beta', r'\1/\2/gn2/bias'),
    (r'resnet/(block\d)/(unit\d+)/c/group_norm/gamma', r'\1/\2/gn3/scale'),
    (r'resnet/(block\d)/(unit\d+)/c/group_norm/beta', r'\1/\2/gn3/bias'),
)


def _bit(checkpoint: Flat, target: Flat) -> Tuple[Flat, Dict[str, str]]:
  renamed = {_rename(k, _BIT_TF_NAMES): k for k in checkpoint}
  names = {ours: renamed.get(ours, ours) for ours in target}
  values = {}
  for ours, bv in names.items():
    if bv in checkpoint:
      value = checkpoint[bv]
      if value.ndim == 1 and target[ours].ndim == 4:   # GroupNorm [C] -> [1, 1, 1, C]
        value = value.reshape(1, 1, 1, -1)
      values[ours] = value
  return values, names


def _resnet(checkpoint: Flat, target: Flat):
  raise CheckpointMismatchError(
      'backbones.resnet.ResNet is ResNet v1.5 with BatchNorm; big_vision publishes BiT '
      'ResNet-v2 (GroupNorm, weight-standardised convs), a different network: use '
      "model.backbone='bit_r50x1' (or another bit_r*) to load BiT weights")


_CONVERTERS: Dict[type, Callable[[Flat, Flat], Tuple[Flat, Dict[str, str]]]] = {
    ViT: _vit, BiT: _bit, ResNet: _resnet}


def _rename(name: str, rules: Sequence[Tuple[str, str]]) -> str:
  for pattern, replacement in rules:
    if re.fullmatch(pattern, name):
      return re.sub(f'^{pattern}$', replacement, name)
  return name


def load_backbone(path: str, backbone: object, target: Flat,
                  wanted: Iterable[str] = None) -> Tuple[Flat, list]:
  """Backbone parameters from the big_vision checkpoint at `path`.

  `backbone`: the model's backbone module (its class picks the name map); `target`: the fresh
  backbone parameters {'/'-joined name: array}, which give the shapes (the position-embedding
  grid, say); `wanted`: the names to load (default all of `target`).
  Returns ({name: array} for `wanted`, the checkpoint names not loaded).
  Raises CheckpointMismatchError listing every wanted parameter the file lacks (with the name
  looked for) and every shape that differs; FileNotFoundError when there is no file.
  """
  converter = _CONVERTERS.get(type(backbone))
  if converter is None:
    raise CheckpointMismatchError(
        f'no big_vision checkpoint format for backbone {type(backbone).__name__}; '
        f'loadable: {sorted(c.__name__ for c in _CONVERTERS if c is not ResNet)}')
  checkpoint = read_npz(path)
  values, names = converter(checkpoint, target)
  wanted = list(target if wanted is None else wanted)
  missing = [f'{_keys(names[k])[0]} (for {k})' for k in wanted if k not in values]
  wrong = [f'{_keys(names[k])[0]}: {values[k].shape} in the file, {target[k].shape} in the model'
           for k in wanted if k in values and values[k].shape != target[k].shape]
  if missing or wrong:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing from the file: {_listing(missing)}')
    if wrong:
      parts.append(f'{len(wrong)} of another shape: {_listing(wrong)}')
    raise CheckpointMismatchError(
        f'{path} does not fit backbone {type(backbone).__name__}: ' + '; '.join(parts) +
        '. Check model.backbone, model.backbone_kwargs and input.image_size against the '
        'checkpoint (or narrow train.init_prefixes).')
  used = {key for k in wanted for key in _keys(names[k])}
  return ({k: values[k].astype(target[k].dtype) for k in wanted},
          sorted(k for k in checkpoint if k not in used))


def _keys(name) -> tuple:
  return (name,) if isinstance(name, str) else tuple(name)


def _listing(items: list, limit: int = 12) -> str:
  more = f', and {len(items) - limit} more' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more
