r"""Trains and evaluates, or evaluates a checkpoint.

  python -m launch.main --config=configs/quickstart.py --workdir=/tmp/qs [--mode=train|eval]
  python -m launch.main --config=configs/hetxl_cifar10.py:runlocal --workdir=... \
      --config.train.num_steps=10
  python -m launch.main --mode=eval --workdir=/tmp/qs   # the config saved in the workdir
  python -m launch.main --config=configs/quickstart.py:compare --workdir=/tmp/quickstart

A config with `runs` (`:compare` above: DET and HET-XL) trains or evaluates each run in
`<workdir>/<name>` and ends with a side-by-side table (`launch.runs`). Library logs are quiet
unless `--verbosity=0` (`training.cli`).

Without --config, the workdir's saved config.json is used (`configs.workdir`): for
--mode=eval, and to resume a run as it was. The config is resolved against its data
(`training.resolve`) before anything is built; a config that does not fit its data stops with
one line naming the field to set.

On a cluster (TPU pod, multi-node GPU) every process runs the same command; the JAX
distributed runtime is initialised from the environment the cluster sets.
"""
import jax
from absl import flags, logging
from ml_collections import config_flags

from training.distributed import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:args]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints, metrics, results')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (and evaluate) or eval')
_STEP = flags.DEFINE_integer('step', None, 'eval mode: checkpoint step (default: latest)')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  initialize_distributed()
  logging.info('JAX %s: process %d of %d, %d local / %d global devices', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  from launch import runs   # one run, or several side by side (a config with `runs`)
  if _MODE.value == 'train':
    runs.train(_CONFIG.value, _WORKDIR.value)
  else:
    runs.evaluate(_CONFIG.value, _WORKDIR.value, _STEP.value)


if __name__ == '__main__':
  from training import cli   # one-line errors for bad input; --config defaults to the workdir's
  cli.run(main)
