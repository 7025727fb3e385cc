r"""Compiles the real train step ahead of time for a Cloud TPU topology, on any host.

  pip install -e '.[tpu_compile]'     # libtpu: the TPU compiler (runs on the CPU, no TPU needed)
  python -m launch.compile --config=configs/hetxl_jft.py --topology=v4:4x4x4 \
      [--config.input.batch_size=2048] [--json=/tmp/hetxl_jft_v4.json]

No TPU and no dataset are needed: the model, optimizer, state and batch are abstract
(`jax.ShapeDtypeStruct` with `NamedSharding` over a mesh of the topology's compile-only devices,
shaped by `config.mesh`), and the step is `training.train_step.make_train_step`, the function
`launch.main` trains with. Prints, per device (one chip on v4 / v5p / v5e / v6e, one core on v2 /
v3): memory (arguments, outputs, temporaries, generated code; total against the chip's HBM), the
compiled FLOPs and bytes accessed, and a roofline bound on the step time,
max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth).

Topologies are libtpu's names, GENERATION:CHIPS_PER_AXIS: v4:4x4x4 (v4-128, 64 chips),
v5e:16x16 (v5e-256), v3:8x8 (v3-128, 128 cores), v5p:2x2x1, v6e:4x4, v2:4x4.
"""
import os
import re
import sys
import time
from typing import Any, Dict, Optional

from absl import flags
from ml_collections import config_flags

LIBTPU_VERSION = '0.0.42.1'   # the version jax 0.10.2's `tpu` extra pins
INSTALL_HINT = (f"launch.compile needs libtpu, the TPU compiler (it runs on this CPU; no TPU is "
                f"needed). Install the optional extra: pip install -e '.[tpu_compile]' (or: pip "
                f"install libtpu=={LIBTPU_VERSION}).")


class LibtpuMissingError(ImportError):
  """libtpu is not installed; the message says how to install it."""


def require_libtpu() -> str:
  """The installed libtpu's version. Raises LibtpuMissingError (with the install command) when
  libtpu cannot be imported."""
  try:
    import libtpu
  except ImportError as e:
    raise LibtpuMissingError(INSTALL_HINT) from e
  return getattr(libtpu, '__version__', 'unknown')


# Per chip: peak dense bf16 FLOP/s, HBM bytes, HBM bytes/s, and TensorCores JAX shows as separate
# devices (v2 / v3: two per chip; v4 / v5p: one megacore device; v5e / v6e: one core).
# Sources: Google Cloud TPU system architecture pages, cloud.google.com/tpu/docs/
#   v2 (.../v2): 45 TFLOP/s, 16 GiB HBM, 600 GB/s per chip
#   v3 (.../v3): 123 TFLOP/s, 32 GiB HBM, 900 GB/s per chip
#   v4 (.../v4): 275 TFLOP/s, 32 GiB HBM, 1200 GB/s per chip
#   v5e (.../v5e): 197 TFLOP/s, 16 GiB HBM, 819 GB/s per chip
#   v5p (.../v5p): 459 TFLOP/s, 95 GiB HBM, 2765 GB/s per chip
#   v6e (.../v6e): 918 TFLOP/s, 32 GiB HBM, 1640 GB/s per chip
GiB = 2 ** 30
CHIPS = {
    'v2': dict(device_kind='TPU v2', flops=45e12, hbm=16 * GiB, bandwidth=600e9, cores=2),
    'v3': dict(device_kind='TPU v3', flops=123e12, hbm=32 * GiB, bandwidth=900e9, cores=2),
    'v4': dict(device_kind='TPU v4', flops=275e12, hbm=32 * GiB, bandwidth=1200e9, cores=1),
    'v5e': dict(device_kind='TPU v5 lite', flops=197e12, hbm=16 * GiB, bandwidth=819e9, cores=1),
    'v5p': dict(device_kind='TPU v5', flops=459e12, hbm=95 * GiB, bandwidth=2765e9, cores=1),
    'v6e': dict(device_kind='TPU v6 lite', flops=918e12, hbm=32 * GiB, bandwidth=1640e9, cores=1),
}
MEGACORE = ('v4', 'v5p')   # two TensorCores driven as one device, as Cloud TPU runs them
_TOPOLOGY = re.compile(r'(v\d[a-z]?):(\d+(?:x\d+){1,2})')


def parse_topology(topology: str) -> tuple[str, tuple]:
  """'v4:4x4x4' -> ('v4', (4, 4, 4)). Raises ValueError naming the accepted form."""
  m = _TOPOLOGY.fullmatch(topology.strip())
  if not m or m.group(1) not in CHIPS:
    raise ValueError(
        f'--topology={topology!r}: expected GENERATION:CHIPS_PER_AXIS with GENERATION one of '
        f'{sorted(CHIPS)}, e.g. v4:4x4x4 (v4-128), v5e:16x16 (v5e-256), v3:8x8 (v3-128)')
  return m.group(1), tuple(int(d) for d in m.group(2).split('x'))


def topology_devices(topology: str, num_slices: int = 1) -> tuple[list, Dict[str, Any]]:
  """The compile-only devices of a TPU topology (`num_slices` of it, joined over DCN: a
  multi-slice pod; each device has its `slice_index`), and the per-device chip figures (peak
  bf16 FLOP/s, HBM bytes and bytes/s divided among the devices of one chip). Needs libtpu."""
  require_libtpu()
  # No TPU here: skip libtpu's metadata-server queries and its one-process lock (other JAX
  # processes on this host may hold it).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  generation, dims = parse_topology(topology)
  kwargs = {'chip_config_name': 'megacore'} if generation in MEGACORE else {}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  devices = topologies.get_topology_desc(f'{generation}:{"x".join(map(str, dims))}', 'tpu',
                                         **kwargs).devices
  chip = CHIPS[generation]
  chips = num_slices
  for d in dims:
    chips *= d
  per_chip = len(devices) // chips
  if devices[0].device_kind != chip['device_kind'] or per_chip * chips != len(devices):
    raise RuntimeError(f'libtpu described {topology} as {len(devices)} x '
                       f'{devices[0].device_kind!r} devices, not {chips} chips of '
                       f'{chip["device_kind"]!r}: the chip table needs updating')
  per_device = {'generation': generation, 'device_kind': chip['device_kind'],
                'chips': chips, 'devices': len(devices), 'devices_per_chip': per_chip,
                'peak_flops': chip['flops'] / per_chip, 'hbm_bytes': chip['hbm'] // per_chip,
                'hbm_bandwidth': chip['bandwidth'] / per_chip}
  return list(devices), per_device


def lower_eval_step(config, topology: str, num_slices: int = 1):
  """(experiment, per-device chip figures, lowered step): the eval step `launch.main` runs
  (`evaluation.evaluator.make_eval_step`: one batch of `input.eval_batch_size` folded into the
  on-device accumulator), lowered on the abstract parameters and batch."""
  from evaluation.evaluator import make_eval_step
  from training.experiment import Experiment

  devices, chip = topology_devices(topology, num_slices)
  config.input.batch_size = config.input.eval_batch_size   # abstract_batch's size
  exp = Experiment.build(config, devices, with_data=False)
  target = exp.abstract_restore_target()
  step = make_eval_step(exp.model, exp.mesh, exp.shardings, config.eval)
  return exp, chip, step.lower(target.params, target.batch_stats, exp.abstract_batch())


def lower_train_step(config, topology: str, num_slices: int = 1):
  """(experiment, per-device chip figures, lowered step): `make_train_step` over a mesh of
  the topology's devices, lowered on the abstract state and batch. Opens no dataset when the
  config fixes the image shape (`training.experiment.config_image_shape`)."""
  from training.experiment import Experiment
  from training.train_step import make_train_step

  devices, chip = topology_devices(topology, num_slices)
  exp = Experiment.build(config, devices, with_data=False)
  lowered = make_train_step(exp).lower(exp.abstract_restore_target(), exp.abstract_batch())
  return exp, chip, lowered


def measure(exp, chip: Dict[str, Any], compiled) -> Dict[str, Any]:
  """Per-device memory, cost and roofline of a compiled step (see the module docstring).

  cost.flops / bytes_accessed: XLA's cost analysis, which counts each while-loop body once;
  cost.loop_*: what the loops' remaining iterations add (`launch.hlo_cost.loop_costs`);
  cost.*_with_loops: the sums, which the roofline uses.
  """
  import jax
  from launch.hlo_cost import loop_costs
  from training.mesh import batch_size_multiple
  from training.state import param_count

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  memory = {'argument_bytes': int(mem.argument_size_in_bytes),
            'output_bytes': int(mem.output_size_in_bytes),
            'alias_bytes': int(mem.alias_size_in_bytes),
            'temp_bytes': int(mem.temp_size_in_bytes),
            'generated_code_bytes': int(mem.generated_code_size_in_bytes)}
  # The state is donated: outputs aliasing arguments take no space of their own.
  memory['total_bytes'] = (memory['argument_bytes'] + memory['output_bytes'] -
                           memory['alias_bytes'] + memory['temp_bytes'] +
                           memory['generated_code_bytes'])
  memory['fits'] = memory['total_bytes'] <= chip['hbm_bytes']
  loops = loop_costs(compiled.as_text())
  flops = float(cost.get('flops', 0.0))
  nbytes = float(cost.get('bytes accessed', 0.0))
  costs = {'flops': flops, 'bytes_accessed': nbytes,
           'loop_extra_flops': loops.extra_flops, 'loop_extra_bytes': loops.extra_bytes,
           'flops_with_loops': flops + loops.extra_flops,
           'bytes_with_loops': nbytes + loops.extra_bytes,
           'loops': loops.loops, 'unknown_trip_counts': loops.unknown_trip_counts}
  compute_s = costs['flops_with_loops'] / chip['peak_flops']
  memory_s = costs['bytes_with_loops'] / chip['hbm_bandwidth']
  config = exp.config
  return {
      'topology': None, 'chip': chip, 'mesh': dict(exp.mesh.shape),
      'batch_size': config.input.batch_size,
      'per_device_batch': config.input.batch_size // batch_size_multiple(exp.mesh),
      'param_bytes_per_device': param_bytes_per_device(exp),
      'image_shape': list(exp.image_shape), 'params': param_count(exp.abstract_state.params),
      'memory': memory, 'cost': costs,
      'roofline': {'compute_s': compute_s, 'memory_s': memory_s,
                   'step_s': max(compute_s, memory_s),
                   'bound': 'compute' if compute_s >= memory_s else 'memory'},
      'jax': jax.__version__, 'libtpu': require_libtpu(),
  }


def param_bytes_per_device(exp) -> int:
  """Bytes of parameters and optimizer state one device holds under the run's shardings (the
  largest shard of each array): what FSDP and class sharding divide."""
  import jax
  import numpy as np
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(exp.abstract_state), jax.tree.leaves(exp.shardings)):
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def compile_train_step(config, topology: str, num_slices: int = 1,
                       step: str = 'train') -> Dict[str, Any]:
  """Lowers and compiles the train (or, `step='eval'`, the eval) step for `topology`; returns
  `measure`'s numbers (plus the topology, the step and the compile time in seconds)."""
  t0 = time.perf_counter()
  lower = {'train': lower_train_step, 'eval': lower_eval_step}[step]
  exp, chip, lowered = lower(config, topology, num_slices)
  compiled = lowered.compile()
  report = measure(exp, chip, compiled)
  report['topology'] = topology if num_slices == 1 else f'{num_slices} x {topology}'
  report['step'] = step
  report['compile_s'] = time.perf_counter() - t0
  return report


def format_report(r: Dict[str, Any]) -> str:
  """The report as the lines `main` prints."""
  c, m, k, t = r['chip'], r['memory'], r['cost'], r['roofline']
  gib = lambda b: f'{b / GiB:.2f} GiB'
  return '\n'.join([
      f"topology {r['topology']}: {c['chips']} chips, {c['devices']} devices of "
      f"{c['device_kind']}; mesh {r['mesh']}; batch {r['batch_size']} "
      f"({r['per_device_batch']} per device); image {tuple(r['image_shape'])}; "
      f"{r['params']:,} params",
      'per device memory:',
      f"  arguments       {gib(m['argument_bytes'])}",
      f"  outputs         {gib(m['output_bytes'])} ({gib(m['alias_bytes'])} aliased to "
      f"donated arguments)",
      f"  temporaries     {gib(m['temp_bytes'])}",
      f"  generated code  {gib(m['generated_code_bytes'])}",
      f"  total           {gib(m['total_bytes'])} of {gib(c['hbm_bytes'])} HBM: "
      f"{'fits' if m['fits'] else 'DOES NOT FIT'}",
      'per device cost:',
      f"  FLOPs           {k['flops_with_loops']:.4g} (XLA cost analysis {k['flops']:.4g}, "
      f"which counts each loop body once, + {k['loop_extra_flops']:.4g} for the remaining "
      f"loop iterations)",
      f"  bytes accessed  {k['bytes_with_loops']:.4g} (XLA {k['bytes_accessed']:.4g} + "
      f"{k['loop_extra_bytes']:.4g} estimated for the remaining loop iterations)",
      *[f"  loop {l['name']}: {l['trip_count'] or 'unknown'} iterations, "
        f"{l['body_flops']:.4g} FLOPs each" for l in k['loops']],
      f"roofline step time >= {t['step_s'] * 1e3:.2f} ms ({t['bound']}-bound: compute "
      f"{t['compute_s'] * 1e3:.2f} ms at {c['peak_flops'] / 1e12:.1f} TFLOP/s bf16, memory "
      f"{t['memory_s'] * 1e3:.2f} ms at {c['hbm_bandwidth'] / 1e9:.0f} GB/s)",
      f"compiled in {r['compile_s']:.0f} s (jax {r['jax']}, libtpu {r['libtpu']})",
  ])


def does_not_fit(error: Exception, topology: str) -> Optional[str]:
  """The one-line answer when the TPU compiler refuses the step for lack of HBM (XLA's
  RESOURCE_EXHAUSTED at compile time: the step does not fit the chip), else None."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  detail = text.split('RESOURCE_EXHAUSTED:', 1)[1].strip().splitlines()[0]
  return (f'DOES NOT FIT {topology}: {detail} Shard the head or state over more devices '
          '(mesh.shape), or lower the batch per device.')


def _define_flags() -> None:
  """Flags of the command, defined only when it runs (so tests can import this module beside
  other modules that define --config)."""
  config_flags.DEFINE_config_file('config', None, 'experiment config file[:args]',
                                  lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU topology, e.g. v4:4x4x4, v5e:16x16')
  flags.DEFINE_string('json', None, 'also write the numbers to this JSON file')
  flags.DEFINE_enum('step', 'train', ['train', 'eval'], 'which step to compile: the train '
                    'step, or the eval step (one eval batch into the on-device metrics)')
  flags.DEFINE_integer('num_slices', 1, 'slices of the topology joined over DCN (multi-slice: '
                       'use mesh.dcn_shape to lay the mesh over them)')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  del argv
  import jax
  jax.config.update('jax_platforms', 'cpu')   # the TPU is only a compile target here
  f = flags.FLAGS
  try:
    require_libtpu()
    report = compile_train_step(f.config, f.topology, f.num_slices, f.step)
  except (LibtpuMissingError, ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  except jax.errors.JaxRuntimeError as e:
    message = does_not_fit(e, f.topology)
    if message is None:
      raise
    sys.exit(message)
  print(format_report(report), flush=True)
  if f.json:
    from training.json_file import write_json
    write_json(f.json, report)
    print(f'wrote {f.json}', flush=True)


if __name__ == '__main__':
  from training import cli   # quiet library logs
  _define_flags()
  cli.run(main, {'config': None})   # --config.*_kwargs.KEY=V as in launch.main
