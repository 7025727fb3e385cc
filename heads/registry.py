"""Head lookup by config name: the only place that knows which heads exist."""
import importlib

from flax import linen as nn

_HEADS = {
    'softmax': 'heads.softmax:SoftmaxHead',
    'hetxl': 'hetxl.heads:HETXLHead',
    'het': 'hetxl.heads:HETHead',
    'soc': 'soc.head:SOCHead',
    'llc_codebook': 'llc.heads:CodebookHead',
    'llc_instance': 'llc.heads:InstanceCodeHead',
}


def build_head(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Returns the head module registered under `name`."""
  if name not in _HEADS:
    raise ValueError(f'unknown head {name!r}; known heads: {sorted(_HEADS)}')
  module_name, cls_name = _HEADS[name].split(':')
  cls = getattr(importlib.import_module(module_name), cls_name)
  return cls(num_classes=num_classes, **kwargs)
