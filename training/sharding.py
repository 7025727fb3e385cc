"""Parameter sharding rules: which mesh axes each parameter (and its optimizer state) is split over.

`config.sharding.rules` is an ordered tuple of (regex, tactic) pairs, matched against parameter
paths such as 'backbone/blocks/MlpBlock_0/Dense_0/kernel' or 'head/loc_layer/kernel' (keys joined
by '/', `re.fullmatch`; the first rule that matches wins; a parameter no rule matches is
replicated), as big_vision's `sharding_strategy`. Tactics, written as calls with literal
keyword arguments:

  'replicate'                                   every device holds the whole parameter
  'fsdp'  /  'fsdp(axes=("data",), min_size_mb=4)'
      FSDP (ZeRO-3): a parameter of at least `min_size_mb` MiB (default 4) is split over `axes`
      (default: every mesh axis but 'replica', which spans slices: HSDP) along its largest
      dimension that their combined size divides and no other axis splits; smaller ones, and
      ones no dimension fits, are replicated.
  'shard_dim(dim=0, axes=("data",))'           dimension `dim` over `axes`, whatever the size

On top of any tactic, a head's class dimension is always split over 'model' (the heads declare
it, `heads.base.class_sharded`; `Head.pads_classes` heads pad it so any K divides). An axis the
tactic names that the mesh lacks is ignored, so one rule set serves every mesh. The optimizer's
moments follow their parameters (`training.state`). The batch is split over every mesh axis
(`training.mesh.batch_sharding`), so no device repeats another's backbone work.
"""
import ast
import math
import re
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from training.mesh import fit_spec
from training.optimizer import param_path
from training.resolve import ConfigError

TACTICS = ('replicate', 'fsdp', 'shard_dim')
FSDP_MIN_SIZE_MB = 4.0


class ShardingRuleError(ConfigError):
  """A sharding rule that cannot be parsed or applied; the message names the rule (a user's
  config error: one `error:` line from the command-line tools)."""


def parse_tactic(tactic: str) -> Tuple[str, dict]:
  """'fsdp(min_size_mb=1)' -> ('fsdp', {'min_size_mb': 1}). Raises ShardingRuleError for
  anything but a known tactic name called with literal keyword arguments."""
  try:
    node = ast.parse(tactic.strip(), mode='eval').body
  except SyntaxError as e:
    raise ShardingRuleError(f'sharding tactic {tactic!r} does not parse: {e.msg}') from None
  if isinstance(node, ast.Name):
    name, kwargs = node.id, {}
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
    name = node.func.id
    try:
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ShardingRuleError(f'sharding tactic {tactic!r}: arguments must be literals') from None
  else:
    raise ShardingRuleError(f'sharding tactic {tactic!r}: expected NAME or NAME(key=value, ...)')
  allowed = {'replicate': set(), 'fsdp': {'axes', 'min_size_mb'},
             'shard_dim': {'dim', 'axes'}}.get(name)
  if allowed is None:
    raise ShardingRuleError(f'unknown sharding tactic {name!r} in {tactic!r}; known: {TACTICS}')
  if set(kwargs) - allowed or (name == 'shard_dim' and 'dim' not in kwargs):
    raise ShardingRuleError(f'sharding tactic {tactic!r}: {name} takes '
                            f'{sorted(allowed) or "no arguments"}'
                            + (' (dim is required)' if name == 'shard_dim' else ''))
  if isinstance(kwargs.get('axes'), str):
    kwargs['axes'] = (kwargs['axes'],)
  return name, kwargs


def compile_rules(rules: Sequence[Sequence[str]]) -> list:
  """[(compiled regex, tactic name, kwargs)] of config rules; ShardingRuleError naming a bad one."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ShardingRuleError(f'sharding rule {tuple(rule)!r}: expected (regex, tactic)')
    pattern, tactic = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ShardingRuleError(f'sharding rule {tuple(rule)!r}: bad regex: {e}') from None
    out.append((regex, *parse_tactic(tactic)))
  return out


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _entry(axes: Sequence[str]) -> Any:
  """A PartitionSpec entry for `axes`: None, one name, or a tuple of names."""
  axes = tuple(axes)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _used(spec: Sequence[Any]) -> set:
  used = set()
  for entry in spec:
    used.update((entry,) if isinstance(entry, str) else entry or ())
  return used


def apply_tactic(name: str, kwargs: dict, declared: P, shape: Sequence[int], itemsize: int,
                 mesh: Mesh) -> P:
  """The PartitionSpec of one parameter of `shape`: the head's `declared` spec (its class
  dimension on 'model'; dimensions an axis does not divide fall back to replicated) plus
  what the tactic adds."""
  spec = list(fit_spec(declared, shape, mesh))
  if name == 'replicate' or not shape:
    return P(*spec)
  default_axes = tuple(a for a in mesh.axis_names if a != 'replica')
  axes = tuple(a for a in kwargs.get('axes', default_axes)
               if a in mesh.shape and mesh.shape[a] > 1 and a not in _used(spec))
  if not axes:
    return P(*spec)
  size = _axes_size(mesh, axes)
  if name == 'shard_dim':
    dim = kwargs['dim'] % len(shape)
    if spec[dim] is not None or shape[dim] % size:
      raise ShardingRuleError(f'shard_dim(dim={kwargs["dim"]}): dimension {shape[dim]} of a '
                              f'parameter of shape {tuple(shape)} cannot split over {axes} '
                              f'({size} devices)')
    spec[dim] = _entry(axes)
    return P(*spec)
  nbytes = int(np.prod(shape)) * itemsize
  if nbytes < kwargs.get('min_size_mb', FSDP_MIN_SIZE_MB) * 2**20:
    return P(*spec)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):   # largest first
    if spec[dim] is None and shape[dim] % size == 0:
      spec[dim] = _entry(axes)
      break
  return P(*spec)


def rule_for(rules: list, path: str) -> Tuple[str, dict]:
  """The tactic (name, kwargs) of the first rule matching `path`; 'replicate' if none does."""
  return next(((name, kw) for regex, name, kw in rules if regex.fullmatch(path)),
              ('replicate', {}))


def param_specs(declared: Any, abstract: Any, rules: Sequence[Sequence[str]],
                mesh: Mesh, prefix: Optional[str] = None) -> Any:
  """PartitionSpecs for a parameter tree: `declared` (the specs the modules declared,
  `flax.linen.get_partition_spec`) and `abstract` (ShapeDtypeStructs) of one structure;
  `rules` as `config.sharding.rules`. Paths are those of `abstract`, under `prefix/` when set
  (e.g. 'batch_stats'). Raises ShardingRuleError naming a rule that cannot apply."""
  import jax
  compiled = compile_rules(rules)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  declared_leaves = treedef.flatten_up_to(declared)
  specs = []
  for (keypath, leaf), spec in zip(flat, declared_leaves):
    path = param_path(keypath)
    path = f'{prefix}/{path}' if prefix else path
    name, kwargs = rule_for(compiled, path)
    try:
      specs.append(apply_tactic(name, kwargs, spec, leaf.shape, np.dtype(leaf.dtype).itemsize,
                                mesh))
    except ShardingRuleError as e:
      raise ShardingRuleError(f'sharding.rules, parameter {path}: {e}') from None
  return jax.tree.unflatten(treedef, specs)
