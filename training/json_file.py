"""JSON records (results, signatures, locks) written once per run: by process 0, atomically."""
import json
import os
from typing import Any

import jax


def write_json(path: str, obj: Any, *, indent: int = 1) -> None:
  """Writes `obj` as JSON to `path` on process 0 only (other processes return at once).

  Atomic: written to `<path>.<pid>.tmp` and renamed over `path`, so a reader (or a kill
  mid-write) sees the old file or the new one, never half of one. Raises TypeError for an
  object JSON cannot encode (nothing is left behind), OSError when the directory is missing.
  """
  if jax.process_index() != 0:
    return
  text = json.dumps(obj, indent=indent)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
