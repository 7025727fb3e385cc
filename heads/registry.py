"""Head lookup by config name: the only place that knows which heads exist."""
import importlib

from flax import linen as nn

from heads.base import LINKS, Head

_HEADS = {
    'softmax': 'heads.softmax:SoftmaxHead',
    'hetxl': 'hetxl.heads:HETXLHead',
    'het': 'hetxl.heads:HETHead',
    'soc': 'soc.head:SOCHead',
    'llc_codebook': 'llc.heads:CodebookHead',
    'llc_instance': 'llc.heads:InstanceCodeHead',
    'contrastive': 'hetxl.contrastive:ContrastiveHead',
}


def build_head(name: str, num_classes: int, dataset=None, **kwargs) -> nn.Module:
  """Returns the head module registered under `name`. A head class with a `from_dataset`
  constructor (one that needs the dataset's class names, e.g. for captions) is built by it
  from the `dataset` config."""
  if name not in _HEADS:
    raise ValueError(f'unknown head {name!r}; known heads: {sorted(_HEADS)}')
  cls = head_class(name)
  if hasattr(cls, 'from_dataset'):
    if dataset is None:
      raise ValueError(f'head {name!r} is built from a dataset config; pass dataset=')
    return cls.from_dataset(dataset, num_classes, **kwargs)
  return cls(num_classes=num_classes, **kwargs)


def head_class(name: str) -> type:
  """The head class registered under `name`. Raises ValueError for an unknown name and
  TypeError for a class that does not derive from `heads.base.Head` (the head contract)."""
  if name not in _HEADS:
    raise ValueError(f'unknown head {name!r}; known heads: {sorted(_HEADS)}')
  module_name, cls_name = _HEADS[name].split(':')
  cls = getattr(importlib.import_module(module_name), cls_name)
  if not issubclass(cls, Head):
    raise TypeError(f'head {name!r} ({_HEADS[name]}) must derive from heads.base.Head, which '
                    'declares the contract the trainer reads (link, rng streams, sows)')
  if getattr(cls, 'link', None) not in LINKS:
    raise TypeError(f"head {name!r} ({_HEADS[name]}) must declare its link, one of {LINKS}")
  return cls


def head_names() -> list:
  """Every registered head name, sorted."""
  return sorted(_HEADS)


def resolve_head_kwargs(name: str, num_classes: int, kwargs: dict) -> dict:
  """The head's kwargs with the values it derives from the class count filled in (a head
  class may define `resolve_kwargs(num_classes, kwargs) -> kwargs`, e.g. LLC's bits = 0 ->
  ceil(2 log2 K), and check its files there); `training.resolve` calls it after overrides."""
  hook = getattr(head_class(name), 'resolve_kwargs', None)
  return hook(num_classes, dict(kwargs)) if hook else dict(kwargs)
