"""Starting JAX's multi-process runtime, shared by every command that runs a model."""
import os

import jax


def initialize_distributed() -> None:
  """Starts JAX's multi-process runtime when this process is one of several.

  Explicit: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (any cluster, or
  several processes on one machine). Otherwise JAX detects Cloud TPU pods and SLURM / Open MPI
  jobs itself. A plain single-process run initialises nothing.
  """
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS') and env.get('JAX_NUM_PROCESSES'):
    jax.distributed.initialize(env['JAX_COORDINATOR_ADDRESS'], int(env['JAX_NUM_PROCESSES']),
                               int(env['JAX_PROCESS_ID']))
  elif (env.get('TPU_WORKER_HOSTNAMES', 'localhost') != 'localhost'
        or int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1):
    jax.distributed.initialize()
