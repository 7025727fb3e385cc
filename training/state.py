"""The train state pytree, created already sharded over the mesh."""
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from training.mesh import fit_spec
from training.sharding import param_specs
from training.model import rng_streams


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def _init_variables(model: nn.Module, image_shape: tuple, key: jax.Array) -> dict:
  images = jnp.zeros((2, *image_shape), jnp.uint8)
  rngs = dict.fromkeys(('params', *rng_streams(model.head)), key)
  variables = model.init(rngs, images, train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple,
                    mesh: Mesh, rules: Sequence[Sequence[str]] = ()
                    ) -> tuple[TrainState, TrainState]:
  """(abstract state, NamedShardings). Parameters: the sharding `rules` (`training.sharding`,
  `config.sharding.rules`; () replicates) on top of the class dimensions the heads put on
  'model'; their optimizer moments alike; batch_stats as their modules declare; the rest
  replicated."""
  boxed = jax.eval_shape(lambda k: _init_variables(model, image_shape, k), jax.random.key(0))
  declared = nn.get_partition_spec(boxed)
  abstract_vars = nn.meta.unbox(boxed)
  specs = {'params': param_specs(declared['params'], abstract_vars['params'], rules, mesh),
           'batch_stats': jax.tree.map(lambda s, a: fit_spec(s, a.shape, mesh),
                                       declared['batch_stats'], abstract_vars['batch_stats'],
                                       is_leaf=lambda x: isinstance(x, P))}
  abstract_opt = jax.eval_shape(tx.init, abstract_vars['params'])
  # Masked optimizer states (frozen parameters, optax.partition) hold MaskedNode in place of
  # the parameters they keep no state for: kept as they are.
  masked = lambda x: isinstance(x, (P, optax.MaskedNode))
  opt_specs = optax.tree_map_params(
      tx, lambda a, s: a if isinstance(a, optax.MaskedNode) else s, abstract_opt,
      specs['params'], transform_non_params=lambda _: P(), is_leaf=masked)
  spec_state = TrainState(P(), specs['params'], specs['batch_stats'], opt_specs)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_vars['params'],
                        abstract_vars['batch_stats'], abstract_opt)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec_state,
                           is_leaf=lambda x: isinstance(x, P))
  return abstract, shardings


def class_axes(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple) -> Any:
  """A TrainState-shaped tree of ints: for every array, the index of its class dimension (the
  one its module put on 'model', `heads.base.class_sharded`; optimizer moments like their
  parameters), or -1. What a checkpoint of another padded class count is resized along
  (`training.checkpointing`)."""
  boxed = jax.eval_shape(lambda k: _init_variables(model, image_shape, k), jax.random.key(0))
  is_spec = lambda x: isinstance(x, P)
  axis = lambda s: next((i for i, n in enumerate(s) if n == 'model'), -1)
  axes = jax.tree.map(axis, nn.get_partition_spec(boxed), is_leaf=is_spec)
  abstract_vars = nn.meta.unbox(boxed)
  opt = optax.tree_map_params(
      tx, lambda a, s: a if isinstance(a, optax.MaskedNode) else s,
      jax.eval_shape(tx.init, abstract_vars['params']), axes['params'],
      transform_non_params=lambda _: -1,
      is_leaf=lambda x: isinstance(x, (int, optax.MaskedNode)))
  return TrainState(-1, axes['params'], axes['batch_stats'], opt)


def abstract_params(model: nn.Module, image_shape: tuple) -> Any:
  """The model's parameters as ShapeDtypeStructs (no compute): what the optimizer is built for."""
  boxed = jax.eval_shape(lambda k: _init_variables(model, image_shape, k), jax.random.key(0))
  return nn.meta.unbox(boxed)['params']


def create_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple,
                 shardings: TrainState, key: jax.Array) -> TrainState:
  """Initialises the state directly into its shardings (no full copy on one device)."""
  def init(k):
    v = nn.meta.unbox(_init_variables(model, image_shape, k))
    return TrainState(jnp.zeros((), jnp.int32), v['params'], v['batch_stats'],
                      tx.init(v['params']))
  return jax.jit(init, out_shardings=shardings)(key)


def param_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
