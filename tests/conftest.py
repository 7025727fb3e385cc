"""Test setup, before anything imports jax: 8 fake CPU devices compiled for speed of compiling
(`helpers.xla_flags`), and one persistent compilation cache for the whole session.

The cache (`JAX_COMPILATION_CACHE_DIR`, a fresh temporary directory unless already set) is
inherited by every `launch.main` / multi-process subprocess and by pytest-xdist workers, so a
program that several tests compile (the same `:runlocal` train step, a 2-process run and its
1-process reference) is compiled once. It changes no result: a cache hit is the same executable.
"""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import xla_flags  # noqa: E402  (imports no jax)

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='bigclass-jax-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_unconfigure(config):
  # The process that made the cache (not an xdist worker) removes it.
  if _OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
