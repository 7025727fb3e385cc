"""Shared test helpers: config loading and running a module (launch.main, ...) in a subprocess."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests check values, not speed. At LLVM optimisation level 0 XLA's CPU backend compiles 2-3x
# faster (a ResNet-18 run of 4 steps: 94 s -> 39 s) and computes the same values, up to the
# rounding of a different summation order.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f'{FAST_COMPILE} --xla_force_host_platform_device_count={devices}'


def load_config(path: str, arg: str | None = None):
  """get_config(arg) of a config file under configs/, as launch.main would build it."""
  import importlib
  module = importlib.import_module('configs.' + os.path.splitext(os.path.basename(path))[0])
  return module.get_config(arg)


# Facts of the named prepared datasets (what their metadata.json says), for resolving their
# configs without the data on disk (`resolved_config`).
FACTS = {'cifar10': dict(num_classes=10, channels=3, train_examples=50_000),
         'caltech101': dict(num_classes=101, channels=3, train_examples=5_784),
         'cifar10_mosaic': dict(num_classes=10, channels=3, train_examples=20_000),
         'imagenet2012': dict(train_examples=1_281_167)}


def override(c, overrides: dict):
  """`c` with {'a.b': v} set as --config.a.b=v would set them; returns it."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def resolved_config(path: str, arg: str | None = None, **overrides):
  """load_config(path, arg), `overrides` ('a.b': v) applied as --config.a.b=v would, then
  resolved (`training.resolve`) without reading data from disk: a named prepared dataset's facts (FACTS)
  stand in for its metadata.json."""
  from training.resolve import resolve
  c = load_config(path, arg)
  name = c.dataset.tfds_name or os.path.basename(c.dataset.data_dir)
  if c.dataset.name in ('arrayrecord', 'tfds') and name in FACTS:
    c.dataset.update(FACTS[name])
  return resolve(override(c, overrides), with_data=c.dataset.name in ('digits', 'synthetic'), verbose=False)


def load_benchmark(name: str):
  """benchmarks/NAME.py as a module, loaded by path. benchmarks/ never goes on sys.path: its
  input_pipeline.py would shadow the package of that name, also in grain's worker processes."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'benchmarks',
                                                                   f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def run_module(module: str, *args: str, devices: int = 1, timeout: int = 300,
               check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m MODULE ARGS` with `devices` fake CPU devices."""
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                  XLA_FLAGS=xla_flags(devices), **(env or {}))
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{module} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def run_main(*args: str, **kwargs) -> subprocess.CompletedProcess:
  """Runs `python -m launch.main ARGS` (keyword arguments as `run_module`)."""
  return run_module('launch.main', *args, **kwargs)


def last_json(stdout: str) -> dict:
  import json
  return json.loads(stdout.strip().splitlines()[-1])
