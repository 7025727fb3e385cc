"""orbax checkpoints of (train state, grain iterator state, config) in `<workdir>/checkpoints`.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
crash or a kill during a save leaves the previous checkpoint intact. Restores take an abstract
target whose shardings come from the *current* mesh, so a checkpoint written on 8 devices
loads on 4.

A step counts only once orbax has finalised it: orbax writes `commit_success.txt` into every
step it completes (into the temporary directory before the rename on local and gcsfuse paths,
in place on gs://). A step directory without it (a rename that a preemption cut short on a
gcsfuse bucket, where renames are not atomic; a stray `mkdir`) is skipped with a warning that
names it, by every reader: resume, eval, `train.init_from`, LLC phase-1 checks, SOC.

Everything that reads a run's trained parameters (eval, `train.init_from`, SOC's added
classes, LLC's baseline codebooks) goes through `restore_variables`.
"""
import contextlib
import errno
import json
import os
import shutil
import sys
import types
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from training.json_file import write_json
from training.mesh import fit_spec
from training.optimizer import param_path

# Finalised steps: named like a step and holding orbax's commit file.
_FINALISED = ocp.step.standard_name_format(
    temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath)
# Anything named like a step (not an orbax temporary directory), finalised or not.
_STEP_NAMED = ocp.step.standard_name_format(
    temporary_path_cls=ocp.path.atomicity.AtomicRenameTemporaryPath)
INCOMPLETE_SUFFIX = '.incomplete'
NONFINITE_SUFFIX = '.nonfinite'   # finalised, but its parameters gave a non-finite loss
DAMAGED_SUFFIX = '.damaged'       # finalised, but its files no longer read (truncated, overwritten)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model, optimizer or data setup."""


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no finalised checkpoint (or not the step asked for)."""


class DamagedCheckpointError(ValueError):
  """No finalised checkpoint of the workdir (or not the step asked for) restores."""


class DiskFullError(OSError):
  """The disk of the workdir filled up while a run wrote to it (a checkpoint, a log, LOCK)."""


def _disk_full(error: BaseException) -> bool:
  """Whether `error` or one of its causes is ENOSPC / EDQUOT (orbax re-raises tensorstore's as
  "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")."""
  for _ in range(8):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
      return True
    if error.__cause__ is None and error.__context__ is None:
      return False
    error = error.__cause__ or error.__context__
  return False


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path)
             for n in names)


def _mib(n: int) -> str:
  return f'{n / 2**20:.1f} MiB'


def _ignore_closed_event_loops() -> None:
  """Drops the "RuntimeError: Event loop is closed" that tensorstore's write callbacks print
  (through sys.excepthook / sys.unraisablehook), one per write still pending, after orbax's
  save failed and closed its event loop: hundreds of lines after the run's one error line."""
  def quiet(hook):
    def hook_(*args):
      error = args[1] if len(args) > 1 else getattr(args[0], 'exc_value', None)
      if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
        hook(*args)
    return hook_
  sys.excepthook, sys.unraisablehook = quiet(sys.excepthook), quiet(sys.unraisablehook)


@contextlib.contextmanager
def disk_full_is_one_line(workdir: str) -> Iterator[Any]:
  """Turns an exception caused by a full disk into a DiskFullError (one line: the workdir,
  the free space, what a checkpoint needs, the last complete step, which is intact since
  saves are atomic). Yields a namespace whose `state_bytes` the caller may set to the train
  state's size; the need is the larger of it and the newest complete step's size on disk."""
  known = types.SimpleNamespace(state_bytes=0)
  try:
    yield known
  except Exception as e:  # pylint: disable=broad-except
    if not _disk_full(e):
      raise
    _ignore_closed_event_loops()
    steps, _ = scan_steps(workdir)
    root = checkpoint_dir(workdir)
    size = known.state_bytes
    if steps:
      size = max(size, _du(str(_FINALISED.find_step(root, steps[-1]).path)))
      kept = f'the last complete checkpoint, step {steps[-1]}, is intact'
    else:
      kept = 'no checkpoint was complete yet'
    need = f'about {_mib(size)}' if size else 'an unknown amount (no checkpoint was written yet)'
    free = shutil.disk_usage(workdir if os.path.isdir(workdir) else os.path.dirname(
        os.path.abspath(workdir))).free
    raise DiskFullError(
        f'no space left on the disk of {os.path.abspath(workdir)} ({_mib(free)} '
        f'free; a checkpoint needs {need}): {kept}. Free space there (or use a '
        f'--workdir on a larger disk) and re-run the same command to '
        f'{"resume" if steps else "start"}.') from None


class ClassLayout(NamedTuple):
  """Where a model's class dimensions are, and how far they are padded: `axes`, a TrainState-
  shaped tree of ints (`training.state.class_axes`: each array's class dimension, -1 for
  none); `num_classes` K real classes, `padded` the model's padded size Kp (a class dimension
  is Kp, or Kp x R for HET's low-rank factors). Checkpoints record shapes unpadded (K), so one
  written with another padding (another 'model' axis size, or before padding existed)
  restores: its class dimensions are restored as saved and padded with zeros or cut back
  to this model's (only padding is ever cut)."""
  axes: Any
  num_classes: int
  padded: int

  def unpadded(self, shape: Sequence[int], axis: int) -> list:
    """`shape` with its class dimension (`axis`, -1 none) at the real class count."""
    shape = list(shape)
    if axis >= 0 and self.padded != self.num_classes and shape[axis] % self.padded == 0:
      shape[axis] = shape[axis] // self.padded * self.num_classes
    return shape


def scan_steps(workdir: str) -> tuple[list[int], list[str]]:
  """(finalised steps, ascending; paths of step directories orbax never finalised)."""
  root = checkpoint_dir(workdir)
  if not os.path.isdir(root):
    return [], []
  named = {m.step: str(m.path) for m in _STEP_NAMED.find_all(root)}
  complete = sorted(m.step for m in _FINALISED.find_all(root))
  return complete, [named[s] for s in sorted(set(named) - set(complete))]


def _warn_incomplete(paths: list[str], action: str) -> None:
  for path in paths:
    logging.warning('checkpoint step directory %s was never finalised (no %s, e.g. a save cut '
                    'short by a preemption); %s', path, ocp.path.atomicity.COMMIT_SUCCESS_FILE,
                    action)


def complete_steps(workdir: str) -> list[int]:
  """The finalised checkpoint steps of `workdir`, ascending; warns about, and skips, step
  directories orbax never finalised."""
  steps, incomplete = scan_steps(workdir)
  _warn_incomplete(incomplete, 'skipped')
  return steps


def _choose(workdir: str, steps: list[int], step: Optional[int], hint: str) -> int:
  root = checkpoint_dir(workdir)
  if not steps:
    _, incomplete = scan_steps(workdir)
    found = (f' (only unfinished step directories: {", ".join(incomplete)})'
             if incomplete else '')
    raise NoCheckpointError(f'no complete checkpoint in {root}{found}; {hint}')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise NoCheckpointError(f'no complete checkpoint for step {step} in {root}; complete steps: '
                            f'{steps}')
  return step


def restore_variables(workdir: str, abstract_state: Any = None, step: Optional[int] = None, *,
                      hint: str = 'train it first',
                      layout: Optional[ClassLayout] = None) -> tuple[dict, int]:
  """({'params', 'batch_stats'}, step) of the newest (or the given) finalised checkpoint of
  `workdir`, as orbax's CheckpointManager lists them; the optimizer state and the data
  position are never read.

  With `abstract_state` (ShapeDtypeStructs carrying the current mesh's shardings,
  `Experiment.abstract_restore_target`) the arrays are restored into those shardings, after
  `check_signature`; without it, as host numpy arrays of the saved shapes (another model's
  checkpoint: `train.init_from`). Raises NoCheckpointError (a FileNotFoundError) naming the
  directory, the steps there and `hint` (what to do); IncompatibleCheckpointError when the
  target's parameter shapes differ from the workdir's. With `layout` (the target's class
  dimensions) a checkpoint of another class padding restores (`ClassLayout`).
  """
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise NoCheckpointError(f'no checkpoints in {workdir}: {hint}')
  ckpt = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
  try:
    ckpt.pick_step(step, hint=hint)   # NoCheckpointError when there is none (or not `step`)
    if abstract_state is not None:
      check_signature(workdir, abstract_state.params, layout=layout)
    return ckpt.restore_newest(lambda s: ckpt.restore_variables(s, abstract_state, layout), step)
  finally:
    ckpt.close()


def _first_line(error: BaseException, limit: int = 240) -> str:
  """The first line of the root cause of `error` (orbax wraps tensorstore's read error, e.g.
  'OUT_OF_RANGE: Error reading ... in OCDBT database', in a page of details), at most `limit`
  characters."""
  for _ in range(8):
    error = error.__cause__ or error.__context__ or error
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= limit else line[:limit] + '...'


def _move_aside(path: str, suffix: str = INCOMPLETE_SUFFIX) -> str:
  """Renames a step directory that must not be listed to `<path><suffix>[-n]` (never a step
  name)."""
  target, n = path + suffix, 1
  while os.path.exists(target):
    target, n = f'{path}{suffix}-{n}', n + 1
  os.rename(path, target)
  return target


def _flat_config(config: Any) -> dict:
  """{'a.b': value} of a ConfigDict or of its JSON form."""
  if not isinstance(config, dict):
    config = json.loads(config.to_json_best_effort())
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update({f'{key}.{k}': v for k, v in _flat_config(value).items()})
    else:
      flat[key] = value
  return flat


def config_changes(saved: Any, current: Any) -> list[str]:
  """'field: old -> new' for every config field whose value differs (JSON-compared)."""
  old, new = _flat_config(saved), _flat_config(current)
  norm = lambda v: json.dumps(v, sort_keys=True)
  return [f'{k}: {old.get(k, "(absent)")!r} -> {new.get(k, "(absent)")!r}'
          for k in sorted(set(old) | set(new))
          if k not in old or k not in new or norm(old[k]) != norm(new[k])]


@jax.jit
def _fingerprint_leaves(leaves: list) -> list:
  def one(x):
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
      words = x.astype(jnp.uint8).astype(jnp.uint32) if x.dtype == jnp.bool_ else \
          jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
      words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)   # mod 2^32: order- and value-sensitive
  return [one(x) for x in leaves]


def fingerprints(tree: Any) -> dict:
  """{'params/head/kernel': int} of every array of a train state (or of its params and
  batch_stats), flattened as orbax stores them: the sum mod 2^32 of its 32-bit words (16- and
  8-bit elements widened) weighted by 2i + 1, computed on device in one jitted call; saved
  with each checkpoint and checked on restore (`Checkpointer._verify`)."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
  items = [('/'.join(map(str, k)), v) for k, v in flat.items()
           if hasattr(v, 'dtype') and v.dtype.itemsize <= 4 and np.size(v)]
  on_host = [i for i, (_, v) in enumerate(items) if isinstance(v, np.ndarray)]
  values = dict(zip(on_host, (_fingerprint_host(items[i][1]) for i in on_host)))
  on_device = [i for i in range(len(items)) if i not in values]
  values.update(zip(on_device, jax.device_get(
      _fingerprint_leaves([items[i][1] for i in on_device]))))
  return {k: int(values[i]) for i, (k, _) in enumerate(items)}


def _fingerprint_host(x: np.ndarray, chunk: int = 1 << 24) -> int:
  """`fingerprints`' value of a host array (warm starts restore to host), in chunks, so the
  temporaries stay small for any size; uint32 arithmetic wraps mod 2^32 as on device."""
  x = np.ravel(x)
  words = (x.astype(np.uint32) if x.dtype == np.bool_ else
           x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]))
  total = 0
  for start in range(0, words.size, chunk):
    part = words[start:start + chunk].astype(np.uint32)
    weights = np.arange(start, start + part.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    total = (total + int(np.sum(part * weights, dtype=np.uint32))) % 2**32
  return total


def _array_shapes(tree: Any) -> dict:
  """{'opt_state/1/0/trace/w': shape} of a train state, or of orbax's metadata of a saved one
  (both flattened the way orbax stores them)."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
  return {'/'.join(map(str, path)): tuple(leaf.shape)
          for path, leaf in flat.items() if hasattr(leaf, 'shape')}


def _shape_signature(tree: Any, axes: Any = None, layout: Optional[ClassLayout] = None) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  axes = [-1] * len(flat) if layout is None else jax.tree.leaves(axes)
  return {jax.tree_util.keystr(path): (layout.unpadded(leaf.shape, ax) if layout
                                       else list(leaf.shape))
          for (path, leaf), ax in zip(flat, axes)}


def fit_class_dims(abstract: Any, axes: Any, stored: dict) -> tuple[Any, Any]:
  """(restore target, resize): `abstract` (ShapeDtypeStructs with shardings) with each array
  whose saved shape (`stored`: path -> shape, `_array_shapes`) differs only along its class
  dimension (`axes`, same structure) given the saved shape, sharded as far as that shape
  allows; and `resize(restored)`, which pads those arrays with zeros (a padded class is
  masked, its optimizer moments start at 0) or cuts their padding, into `abstract`'s
  shardings. Arrays that differ otherwise are left for the shape checks to report."""
  changed = {}

  def target(path, leaf, axis):
    old = stored.get(param_path(path))
    if (axis < 0 or old is None or tuple(old) == tuple(leaf.shape) or len(old) != leaf.ndim
        or any(o != n for i, (o, n) in enumerate(zip(old, leaf.shape)) if i != axis)):
      return leaf
    changed[param_path(path)] = axis
    mesh = leaf.sharding.mesh
    sharding = jax.sharding.NamedSharding(mesh, fit_spec(leaf.sharding.spec, old, mesh))
    return jax.ShapeDtypeStruct(tuple(old), leaf.dtype, sharding=sharding)

  def resize(restored):
    def one(path, x, leaf):
      axis = changed.get(param_path(path))
      if axis is None:
        return x
      def fn(x):
        n = leaf.shape[axis]
        if x.shape[axis] >= n:
          return jax.lax.slice_in_dim(x, 0, n, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, n - x.shape[axis])
        return jnp.pad(x, pad)
      return jax.jit(fn, out_shardings=leaf.sharding)(x)
    return jax.tree_util.tree_map_with_path(one, restored, abstract)

  return jax.tree_util.tree_map_with_path(target, abstract, axes), resize


def check_signature(workdir: str, params: Any, *, record: bool = True,
                    layout: Optional[ClassLayout] = None) -> None:
  """Writes the parameter shapes on first use (unless `record` is False: a check before
  anything is written); afterwards fails clearly when they changed. With `layout` the class
  dimensions are compared unpadded (`ClassLayout`), so padding is never a difference."""
  path = os.path.join(workdir, 'param_shapes.json')
  current = _shape_signature(params, layout and layout.axes.params, layout)
  if not os.path.exists(path):
    if record:
      write_json(path, current)
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
  """Saves and restores {'state': train state, 'data': grain iterator, 'config'} by step.

  Only finalised steps are listed and restored. Step directories orbax never finalised are
  skipped with a warning; a writer (not `read_only`) on process 0 also renames them to
  `<step>.incomplete`, so saving that step again cannot collide with them.
  """

  def __init__(self, workdir: str, *, save_every: int, keep: int, use_async: bool = True,
               read_only: bool = False, config: Any = None):
    self._workdir, self._config, self._read_only = workdir, config, read_only
    _, incomplete = scan_steps(workdir)
    if read_only or jax.process_index() != 0:
      _warn_incomplete(incomplete, 'skipped')
    else:
      for path in incomplete:
        _warn_incomplete([path], f'skipped and renamed to {_move_aside(path)} (delete it at will)')
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else max(save_every, 1),   # orbax warns otherwise
        # The newest checkpoint is good only once the next step's loss is finite (see
        # `set_aside_from`), so rotation always keeps the one before it too.
        max_to_keep=None if read_only or not keep else max(keep, 2),
        enable_async_checkpointing=use_async,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
        step_name_format=_FINALISED,
    )
    if read_only:  # evaluation: reads parts of the state
      handlers = {'state': ocp.PyTreeCheckpointHandler()}
    else:
      handlers = {'state': ocp.StandardCheckpointHandler(),
                  'data': grain.checkpoint.CheckpointHandler()}
    handlers['config'] = ocp.JsonCheckpointHandler()
    handlers['checksums'] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def pick_step(self, step: Optional[int] = None, *, hint: str = 'train it first') -> int:
    """`step` if it is a finalised checkpoint this manager lists, else (None) the newest one.
    Raises NoCheckpointError naming the directory, the steps there and `hint` (what to do)."""
    return _choose(self._workdir, self.all_steps(), step, hint)

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Saves state, the config given at construction and (unless None) the iterator position;
    a checkpoint without the latter evaluates but cannot resume training."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    if self._config is not None:
      items['config'] = ocp.args.JsonSave(json.loads(self._config.to_json_best_effort()))
    items['checksums'] = ocp.args.JsonSave(fingerprints(state))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _verify(self, step: int, restored: Any) -> Any:
    """`restored` (arrays as saved) after checking each against the fingerprint saved with
    `step` (checkpoints that predate them are not checked). Raises DamagedCheckpointError
    naming the arrays whose bytes changed (overwritten: orbax keeps no checksum of them)."""
    if not os.path.isdir(os.path.join(self._step_path(step), 'checksums')):
      return restored
    saved = self._manager.restore(step, args=ocp.args.Composite(
        checksums=ocp.args.JsonRestore()))['checksums']
    bad = [k for k, v in fingerprints(restored).items() if k in saved and saved[k] != v]
    if bad:
      raise DamagedCheckpointError(
          f'{len(bad)} arrays of checkpoint step {step} differ from what was saved (their '
          f'fingerprints): {", ".join(bad[:4])}{", ..." if len(bad) > 4 else ""}')
    return restored

  def saved_config(self, step: int) -> Optional[dict]:
    """The config (JSON form) that wrote `step`, or None for checkpoints that predate it."""
    if not os.path.isdir(os.path.join(self._step_path(step), 'config')):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def _step_path(self, step: int) -> str:
    return str(_FINALISED.find_step(checkpoint_dir(self._workdir), step).path)

  def check_resumable(self, step: int, abstract_state: Any) -> None:
    """Fails with IncompatibleCheckpointError, naming what differs and what to do, unless
    `step` holds a data position for this process count and a train state of exactly the
    arrays (paths and shapes) of `abstract_state`. Logs the config fields that changed."""
    where = f'{self._workdir} (checkpoint step {step})'
    saved_config = self.saved_config(step)
    changes = (config_changes(saved_config, self._config)
               if saved_config is not None and self._config is not None else [])
    changed = ('\nConfig fields that differ from the run that wrote it:\n  ' +
               '\n  '.join(changes[:12]) + ('\n  ...' if len(changes) > 12 else '')
               if changes else '')
    if saved_config is None:
      changed = ('\nThe checkpoint does not record the config that wrote it (written by an '
                 'older version of this project, whose code may also have built another '
                 'optimizer state).')
    elif self._config is not None and not changes:
      changed = '\nThe config is unchanged: the code that builds the optimizer state changed.'
    keys = ', '.join(repr(k) for k in getattr(abstract_state, 'params', {}))
    fresh = (f'or start a new --workdir with --config.train.init_from={self._workdir} '
             f'--config.train.init_prefixes="({keys},)" to keep only the trained parameters.')
    data_dir = os.path.join(self._step_path(step), 'data')
    if not os.path.isdir(data_dir):
      raise IncompatibleCheckpointError(
          f'{where} holds no data-iterator position (a state-only checkpoint, e.g. written by '
          f'soc.add_classes): it evaluates (--mode=eval) but cannot resume training; {fresh}')
    mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not os.path.exists(os.path.join(data_dir, mine)):
      written = sorted(os.listdir(data_dir))
      raise IncompatibleCheckpointError(
          f'{where} holds the data positions of other processes ({", ".join(written)}), none for '
          f'this one ({mine}): resume with the process count that wrote it, {fresh}')
    saved = _array_shapes(self._manager.item_metadata(step)['state'])
    now = _array_shapes(abstract_state)
    if saved != now:
      diffs = ([f'  only in the checkpoint: {k} {saved[k]}' for k in sorted(set(saved) - set(now))]
               + [f'  only in this config:   {k} {now[k]}' for k in sorted(set(now) - set(saved))]
               + [f'  shape {saved[k]} -> {now[k]}: {k}' for k in sorted(set(saved) & set(now))
                  if saved[k] != now[k]])
      raise IncompatibleCheckpointError(
          f'cannot resume {where}: the train state this config builds (optimizer state '
          f'included) differs from the saved one in {len(diffs)} arrays.' + changed +
          '\nArrays that differ:\n' + '\n'.join(diffs[:6]) +
          ('\n  ...' if len(diffs) > 6 else '') +
          f'\nResume with the config that wrote it, {fresh}')
    if changes:
      logging.info('resuming %s with changed config fields:\n  %s', where, '\n  '.join(changes))

  def _fit_classes(self, step: int, abstract: Any, axes: Any) -> tuple[Any, Any]:
    """`fit_class_dims` of `abstract` against the arrays saved at `step`."""
    saved = _array_shapes(self._manager.item_metadata(step)['state'])
    return fit_class_dims(abstract, axes, saved)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any,
              layout: Optional[ClassLayout] = None) -> Any:
    """Restores state into `abstract_state`'s shardings and the iterator in place, after
    `check_resumable`; with `layout`, from a checkpoint of another class padding too."""
    resize = lambda x: x
    if layout is not None:
      abstract_state, resize = self._fit_classes(step, abstract_state, layout.axes)
    self.check_resumable(step, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=grain.checkpoint.CheckpointRestore(data_iterator))
    return resize(self._verify(step, self._manager.restore(step, args=args)['state']))

  def restore_newest(self, restore: Callable[[int], Any],
                     step: Optional[int] = None) -> tuple[Any, int]:
    """(restore(s), s) of the newest finalised step s that restores (only `step` when given).

    A step whose files do not read (truncated or overwritten: a crash, a full disk, a bad
    copy) is skipped with a warning naming its directory once an older step has restored, so
    a fault that every step shares (memory, the code) stops instead of skipping them all; a
    writer on process 0 also renames it `<step>.damaged`, kept but never listed. Raises
    DamagedCheckpointError naming the newest step directory and its error when none
    restores; IncompatibleCheckpointError and NoCheckpointError pass through.
    """
    failed = []
    for s in [step] if step is not None else self.all_steps()[::-1]:
      try:
        result = restore(s)
      except (IncompatibleCheckpointError, NoCheckpointError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax re-raises tensorstore's
        failed.append((s, e))  # read errors as a bare Exception)
        continue
      for bad, error in failed:
        path, action = self._step_path(bad), 'skipped'
        if not self._read_only and jax.process_index() == 0:
          action = f'skipped and renamed to {_move_aside(path, DAMAGED_SUFFIX)}'
        logging.warning('checkpoint step directory %s does not restore (%s): damaged; %s, '
                        'using step %d', path, _first_line(error), action, s)
      if failed:
        self._manager.reload()
      return result, s
    bad, error = failed[0]
    older = (f'; nor do the {len(failed) - 1} older steps, so the cause is likely not the files'
             if len(failed) > 1 else '')
    raise DamagedCheckpointError(
        f'checkpoint step directory {self._step_path(bad)} does not restore '
        f'({_first_line(error)}){older}. If its files are damaged (truncated or overwritten), '
        'move that directory out of checkpoints/ and re-run to use an older step, or train '
        'anew in another --workdir.')

  def restore_variables(self, step: int, abstract_state: Any = None,
                        layout: Optional[ClassLayout] = None) -> dict:
    """{'params', 'batch_stats'} of `step`; the optimizer state is never read. Into
    `abstract_state`'s shardings (with `layout`, from another class padding too), or without
    it as host numpy arrays of the saved shapes (see the module's `restore_variables`). Needs
    `read_only=True`."""
    resize = lambda x: x
    if abstract_state is None:
      saved = self._manager.item_metadata(step)['state']
      item = {k: saved[k] for k in ('params', 'batch_stats') if k in saved}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    else:
      item = {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}
      if layout is not None:
        item, resize = self._fit_classes(
            step, item, {'params': layout.axes.params, 'batch_stats': layout.axes.batch_stats})
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restore = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))['state']
    restored = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
    return resize(self._verify(step, restored))

  def set_aside_from(self, first_bad: int) -> tuple[Optional[int], list[str]]:
    """After a non-finite loss: waits for a pending save, then (process 0) renames each
    finalised step >= `first_bad` to `<step>.nonfinite`, kept but never listed, since its
    parameters gave that loss and a resume would only repeat it. Returns (the newest step
    left, or None; the new paths)."""
    self.wait()
    steps = self.all_steps()
    moved = [_move_aside(self._step_path(s), NONFINITE_SUFFIX) for s in steps
             if s >= first_bad and jax.process_index() == 0]
    self._manager.reload()
    good = [s for s in steps if s < first_bad]
    return (good[-1] if good else None), moved

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
