"""orbax checkpoints of (train state, grain iterator state) in `<workdir>/checkpoints`.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
crash or a kill during a save leaves the previous checkpoint intact. Restores take an abstract
target whose shardings come from the *current* mesh, so a checkpoint written on 8 devices
loads on 4.
"""
import json
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model."""


def _shape_signature(tree: Any) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


def check_signature(workdir: str, params: Any) -> None:
  """Writes the parameter shapes on first use; afterwards fails clearly when they changed."""
  path = os.path.join(workdir, 'param_shapes.json')
  current = _shape_signature(params)
  if not os.path.exists(path):
    if jax.process_index() == 0:
      with open(path, 'w') as f:
        json.dump(current, f, indent=1)
    return
  with open(path) as f:
    saved = json.load(f)
  if saved != current:
    diffs = [f'  {k}: checkpoint {saved.get(k)} vs config {current.get(k)}'
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    raise IncompatibleCheckpointError(
        f'{workdir} holds a checkpoint of a different model ({len(diffs)} parameters differ):\n'
        + '\n'.join(diffs[:10]) + '\nUse a new --workdir, or the config that wrote this one '
        f'({os.path.join(workdir, "config.json")}).')


class Checkpointer:
  """Saves and restores {'state': train state, 'data': grain iterator} by step."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, use_async: bool = True,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1),
        max_to_keep=keep,
        enable_async_checkpointing=use_async,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    if read_only:  # evaluation: reads parts of the state
      handlers = {'state': ocp.PyTreeCheckpointHandler()}
    else:
      handlers = {'state': ocp.StandardCheckpointHandler(),
                  'data': grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Saves state and (unless None) the iterator position; a checkpoint without the latter
    evaluates but cannot resume training."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores state into `abstract_state`'s shardings and the iterator in place."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=grain.checkpoint.CheckpointRestore(data_iterator))
    return self._manager.restore(step, args=args)['state']

  def restore_variables(self, step: int, abstract_state: Any) -> dict:
    """Restores only {'params', 'batch_stats'} (evaluation), into the abstract shardings;
    the optimizer state is never read. Needs `read_only=True`."""
    item = {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}
    restore = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=restore))['state']

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
