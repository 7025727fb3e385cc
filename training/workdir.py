"""The workdir: a lock so two runs never write into one, the resolved config (saved, loaded)
and the model's class list (recorded, checked against the data)."""
import json
import os
import socket
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from training.json_file import write_json


CONFIG_FILE = 'config.json'
CLASSES_FILE = 'classes.json'   # the class list of the model (names in id order)


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir."""


class ClassListError(ValueError):
  """The data's classes are not those the workdir's model was trained on."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`<workdir>/LOCK` holding host and pid of the writer (process 0 only).

  A lock left by a process that no longer runs on this host is taken over; one held by a
  live process, or written from another host, stops the run with a clear error.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'LOCK')
    self._held = False

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return
    me = {'host': socket.gethostname(), 'pid': os.getpid()}
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          owner = json.load(f)
      except (OSError, ValueError):
        owner = {}
      if owner and owner != me and (owner.get('host') != me['host'] or
                                    _pid_alive(int(owner.get('pid', -1)))):
        raise WorkdirInUseError(
            f'{os.path.dirname(self.path)} is in use by pid {owner.get("pid")} on '
            f'{owner.get("host")}; wait for it, use another --workdir, or delete {self.path} '
            'if that run is gone.')
    write_json(self.path, me)
    self._held = True

  def release(self) -> None:
    if self._held and os.path.exists(self.path):
      os.remove(self.path)
    self._held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config (after command-line overrides) as `config.json`.

  A workdir that already holds a different one (a run resumed with a changed config) keeps
  it: it is renamed `config.<step>.json`, step = the last checkpoint written before the change
  (the steps up to it ran with that config), and the changed fields are printed.
  """
  if jax.process_index() != 0:
    return
  from training.checkpointing import config_changes, scan_steps
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      changes = config_changes(json.load(f), json.loads(text))
    if changes:
      steps, _ = scan_steps(workdir)
      step = steps[-1] if steps else 0
      kept, n = os.path.join(workdir, f'config.{step}.json'), 1
      while os.path.exists(kept):
        kept, n = os.path.join(workdir, f'config.{step}-{n}.json'), n + 1
      os.replace(path, kept)
      what = (f'The config of steps 1-{step} is kept as {kept}.' if step else
              f'The previous config (no checkpoint of it is left) is kept as {kept}.')
      print(f'Config changed since step {step} ({len(changes)} fields): ' + '; '.join(changes)
            + f'. {what}', flush=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def save_classes(workdir: str, names: Sequence[str]) -> None:
  """Records `names` (the model's class list, class id = position) as `classes.json`."""
  write_json(os.path.join(workdir, CLASSES_FILE), {'class_names': list(names)})


def check_classes(workdir: str, names: Sequence[str], *, reorder: bool = True,
                  what: str = 'the data') -> Optional[np.ndarray]:
  """Checks the class list of the data (`names`, in its id order) against the one recorded
  with the model of `workdir` (`save_classes`). Returns None when it records none or the same
  list; with `reorder`, when the data has the same classes in another order, the map [K] of
  data class id -> model class id (and prints that it remaps them). Raises ClassListError
  naming what differs otherwise (or, without `reorder`, when only the order differs)."""
  path = os.path.join(workdir, CLASSES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    model = list(json.load(f)['class_names'])
  data = [str(n) for n in names]
  if model == data:
    return None
  where = f'the model in {workdir} was trained on {len(model)} classes'
  if sorted(model) == sorted(data) and len(set(data)) == len(data):
    moved = [f'{n!r} {data.index(n)} -> {i}' for i, n in enumerate(model) if data[i] != n]
    if not reorder:
      raise ClassListError(
          f'{where} in another order than {what} ({len(moved)} ids differ, e.g. '
          f'{"; ".join(moved[:4])}): its class-specific parameters would be taken for the '
          'wrong classes; re-prepare the data in the class order of ' + path)
    print(f'{what.capitalize()} has the classes of the model in {workdir} in another order: '
          f'labels remapped to the model\'s ids ({len(moved)} moved: '
          f'{"; ".join(moved[:6])}{"; ..." if len(moved) > 6 else ""}).', flush=True)
    return np.array([model.index(n) for n in data], np.int32)
  only_model = [n for n in model if n not in data]
  only_data = [n for n in data if n not in model]
  show = lambda names: ', '.join(map(repr, names[:6])) + (', ...' if len(names) > 6 else '')
  diff = '; '.join(part for part in (
      only_model and f'only the model has {show(only_model)}',
      only_data and f'only {what} has {show(only_data)}') if part) or 'the same names, repeated'
  raise ClassListError(
      f'{where} ({path}), {what} has {len(data)} that differ: {diff}. Use the data it was '
      'trained on (re-prepare it with the same class names), or train a new --workdir.')


def _tuples(value):
  """JSON lists back to the tuples configs use (mesh.shape, mean, classes, lr_mults, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in `workdir` by `save_config` (its config.json, lists as tuples).
  Raises FileNotFoundError, naming the file, when the workdir has none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} was never trained (no saved '
                            'config); give the training config with --config=...')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
