"""Backbone lookup by config name: the only place that knows which backbones exist.

Every backbone is a Flax Linen module called as `module(images, *, train) -> features [B, D]`,
images float [B, H, W, C] already normalised, features float32 whatever the compute `dtype`.
"""
import functools
from typing import Callable, Dict

import jax.numpy as jnp
from flax import linen as nn

from backbones.bit import BiT
from backbones.convnet import ConvNet
from backbones.resnet import ResNet
from backbones.vit import VARIANTS, ViT


def _vit(variant: str, patch_size: int, **kwargs) -> nn.Module:
  width, depth, num_heads, mlp_dim = VARIANTS[variant]
  fields = dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                patch_size=patch_size)
  return ViT(**{**fields, **kwargs})


_BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    'convnet': ConvNet,
    'resnet18': functools.partial(ResNet, depth=18),
    'resnet34': functools.partial(ResNet, depth=34),
    'resnet50': functools.partial(ResNet, depth=50),
    # vit_b16, vit_l32, ..., vit_g14 (giant) and vit_G14 (Gigantic): case kept where it differs
    **{f'vit_{v if v in ("g", "G") else v.lower()}{p}': functools.partial(_vit, v, p)
       for v in VARIANTS for p in (14, 16, 32)},
    # BiT ResNet-v2 (the public BiT-S/M/L weights: backbones/pretrained.py)
    **{f'bit_r{d}x{w}': functools.partial(BiT, depth=d, width=w)
       for d in (50, 101, 152) for w in (1, 2, 3, 4)},
}


def build_backbone(name: str, **kwargs) -> nn.Module:
  """Returns the backbone registered under `name`; kwargs override its fields (str dtype ok)."""
  if name not in _BACKBONES:
    raise ValueError(f'unknown backbone {name!r}; known backbones: {sorted(_BACKBONES)}')
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return _BACKBONES[name](**kwargs)
