"""launch.compile: ahead-of-time compilation of the train step for a Cloud TPU topology.

Without libtpu (CI): the clear install message, topology-name errors, and the loop-aware HLO
cost walker on CPU-compiled programs. With libtpu (`pip install -e '.[tpu_compile]'`): the real
train step compiled for a 4-chip v4 slice, its numbers checked against closed forms computed
here from the abstract shapes.
"""
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from launch import compile as aot
from launch.hlo_cost import conv_flops, loop_costs, shape_bytes
from tests.helpers import ROOT, load_config


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
    return True
  except ImportError:
    return False


needs_libtpu = pytest.mark.skipif(
    not _has_libtpu(), reason="needs the tpu_compile extra: pip install -e '.[tpu_compile]'")


# ----- Without libtpu.

def test_missing_libtpu_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)    # `import libtpu` now raises ImportError
  with pytest.raises(aot.LibtpuMissingError, match=r"pip install -e '\.\[tpu_compile\]'"):
    aot.require_libtpu()
  with pytest.raises(aot.LibtpuMissingError, match='libtpu==0.0.42.1'):
    aot.topology_devices('v4:2x2x1')


def test_cli_without_libtpu_exits_with_the_message():
  import subprocess
  code = ("import sys; sys.modules['libtpu'] = None; import runpy; "
          "sys.argv = ['launch.compile', '--config=configs/quickstart.py', '--topology=v4:2x2x1'];"
          " runpy.run_module('launch.compile', run_name='__main__')")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error: launch.compile needs libtpu" in proc.stderr
  assert "pip install -e '.[tpu_compile]'" in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('name', ['v4-128', 'v4:4x4x4x4', 'v9:2x2', 'tpu v4:2x2x1', 'v4:'])
def test_bad_topology_names_the_accepted_form(name):
  with pytest.raises(ValueError, match='GENERATION:CHIPS_PER_AXIS'):
    aot.parse_topology(name)


def test_out_of_hbm_compile_error_becomes_one_line():
  """What libtpu raised for the non-parameter-efficient HET baseline on v3:8x8 (BENCHMARKS.md):
  the command answers with the topology, XLA's numbers and what to change; other errors pass."""
  xla = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
         'temporaries (30.77G) exceeds available HBM (15.48G).\nStack trace:\n  ...')
  assert aot.does_not_fit(RuntimeError(xla), 'v3:8x8') == (
      'DOES NOT FIT v3:8x8: Ran out of memory on HBM, the total memory required for HLO '
      'temporaries (30.77G) exceeds available HBM (15.48G). Shard the head or state over more '
      'devices (mesh.shape), or lower the batch per device.')
  assert aot.does_not_fit(RuntimeError('INTERNAL: something else'), 'v3:8x8') is None


def test_parse_topology():
  assert aot.parse_topology('v4:4x4x4') == ('v4', (4, 4, 4))
  assert aot.parse_topology('v5e:16x16') == ('v5e', (16, 16))


def test_shape_bytes_counts_hbm_arrays_only():
  # bf16 [512, 512] in HBM + two s32 scalars; the f32 array in memory space 3 is on chip.
  shape = ('(s32[]{:T(128)}, f32[256,512]{1,0:T(8,128)S(3)}, bf16[512,512]{1,0:T(8,128)(2,1)},'
           ' s32[])')
  assert shape_bytes(shape) == 512 * 512 * 2 + 4 + 4
  assert shape_bytes(shape, hbm_only=False) == 512 * 512 * 2 + 256 * 512 * 4 + 8


def test_conv_flops_counts_valid_window_positions():
  # 1-d: input 5, window 3, pad 1 each side, stride 1 -> output 5; positions touching the
  # input: 5 * 3 - 2 (the two padded corners) = 13; batch 2, in 4, out 6 features.
  flops = conv_flops('f32[2,5,6]', 'f32[2,5,4]', 'window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f')
  assert flops == 2 * 13 * 2 * 4 * 6


def _scan_program(unroll):
  """8 steps of c <- tanh(c @ w_i): 8 matmuls [64, 32] x [32, 32]."""
  def f(x, w):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w, unroll=unroll)[0]
  return jax.jit(f).lower(jax.ShapeDtypeStruct((64, 32), jnp.float32),
                          jax.ShapeDtypeStruct((8, 32, 32), jnp.float32)).compile()


def test_loop_costs_counts_every_iteration_on_cpu():
  looped, unrolled = _scan_program(1), _scan_program(True)
  matmul = 2 * 64 * 32 * 32
  costs = loop_costs(looped.as_text())
  assert [l['trip_count'] for l in costs.loops] == [8]
  assert costs.unknown_trip_counts == []
  # One iteration: the matmul plus a few scalar ops of the loop counter (tanh is a
  # transcendental, not a FLOP).
  assert costs.loops[0]['body_flops'] == pytest.approx(matmul, rel=0.01)
  assert costs.flops_all == pytest.approx(8 * costs.flops_once, rel=0.01)
  # XLA's own count: one iteration looped, all eight unrolled; the correction closes the gap.
  xla_looped = looped.cost_analysis()['flops']
  xla_unrolled = unrolled.cost_analysis()['flops']
  assert xla_looped < 2 * matmul
  assert xla_looped + costs.extra_flops == pytest.approx(xla_unrolled, rel=0.01)
  assert loop_costs(unrolled.as_text()).extra_flops == 0


def test_loop_bytes_count_slices_and_in_place_updates_like_xla():
  """The backward pass of a scan over stacked weights [L, D, D] reads one [D, D] slice and
  updates one slice of the stacked gradient per iteration. Counted once per loop, our bytes equal
  XLA's own count of the looped program, and our count of the unrolled program equals XLA's;
  counting whole stacked operands instead would be L times too high per iteration."""
  def program(unroll):
    def f(x, w):
      return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w, unroll=unroll)[0]
    return jax.jit(jax.grad(lambda x, w: f(x, w).sum(), argnums=1)).lower(
        jax.ShapeDtypeStruct((64, 256), jnp.float32),
        jax.ShapeDtypeStruct((24, 256, 256), jnp.float32)).compile()
  looped, unrolled = program(1), program(True)
  assert loop_costs(looped.as_text()).bytes_once == pytest.approx(
      looped.cost_analysis()['bytes accessed'], rel=1e-3)
  assert loop_costs(unrolled.as_text()).bytes_all == pytest.approx(
      unrolled.cost_analysis()['bytes accessed'], rel=1e-3)


# ----- With libtpu: the real train step for a 4-chip v4 slice.

def _shard_shapes(tree) -> list:
  """Per-device shapes of ShapeDtypeStructs with shardings (every device holds one shard)."""
  return [(np.dtype(x.dtype).name, tuple(x.sharding.shard_shape(x.shape)))
          for x in jax.tree.leaves(tree)]


def _entry_parameters(hlo: str) -> list:
  """(dtype, dims, bytes in the TPU's tiled layout) of each parameter of the compiled module:
  dims in minor-to-major order reversed to major-to-minor, the minor dims padded up to the
  first tile T(a, b), scalars to a tile of T(n)."""
  layout = re.search(r'entry_computation_layout=\{\((.*?)\)->', hlo).group(1)
  params = []
  for dtype, dims, m2m, tile in re.findall(
      r'([a-z][a-z0-9]*)\[([0-9,]*)\]\{([0-9,]*):T\(([0-9,]+)\)', layout):
    dims = [int(d) for d in dims.split(',') if d]
    physical = [dims[int(i)] for i in reversed(m2m.split(','))] if m2m else [1]
    for j, t in enumerate(reversed([int(t) for t in tile.split(',')])):
      physical[-1 - j] = -(-physical[-1 - j] // t) * t
    name = {'s32': 'int32', 'f32': 'float32', 'u8': 'uint8', 'bf16': 'bfloat16'}[dtype]
    params.append((name, tuple(dims), math.prod(physical) * np.dtype(name).itemsize))
  return params


@needs_libtpu
def test_det_train_step_memory_and_flops_match_closed_forms():
  # hetxl_jft's DET variant, tiny ViT (width 64, depth 1, mlp 128, patch 32 on 32 px: 1 patch
  # + the class token), K = 29,696 (even, so the head's classes split over 'model').
  c = load_config('configs/hetxl_jft.py', 'det,runlocal')
  c.input.batch_size = 512
  c.dataset.num_classes = 29_696
  c.mesh.shape = (2, 2)
  exp, chip, lowered = aot.lower_train_step(c, 'v4:2x2x1')
  compiled = lowered.compile()
  r = aot.measure(exp, chip, compiled)
  assert r['mesh'] == {'data': 2, 'model': 2} and chip['devices'] == 4
  assert chip['hbm_bytes'] == 32 * 2 ** 30 and chip['peak_flops'] == 275e12

  # Memory: the compiled step's parameters are this device's shards of the state and the
  # batch (as numpy computes them from the abstract shapes and shardings); the argument bytes
  # are their sizes in the TPU's tiled layouts; the donated state comes back aliased.
  state, batch = exp.abstract_restore_target(), exp.abstract_batch()
  params = _entry_parameters(compiled.as_text())
  assert sorted(p[:2] for p in params) == sorted(_shard_shapes((state, batch)))
  m = r['memory']
  assert m['argument_bytes'] == sum(p[2] for p in params)
  unpadded = sum(math.prod(s) * np.dtype(d).itemsize for d, s in _shard_shapes((state, batch)))
  assert unpadded <= m['argument_bytes']
  state_bytes = sum(p[2] for p in params[:len(jax.tree.leaves(state))])
  assert m['alias_bytes'] == state_bytes
  assert m['total_bytes'] == (m['argument_bytes'] + m['output_bytes'] - m['alias_bytes'] +
                              m['temp_bytes'] + m['generated_code_bytes'])
  assert m['fits']

  # FLOPs per device, closed form: 2 per multiply-add, backward = 2x forward except the patch
  # embedding (no gradient into the images). Batch 256 per data shard; the head's classes are
  # split over the 2 'model' devices, the backbone is computed on both.
  b, width, mlp, tokens, k = 256, 64, 128, 2, 29_696
  patch = 32 * 32 * 3 * width                         # one patch
  encoder = tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * tokens * width
  head = width * k / 2
  closed = 2 * b * (2 * patch + 3 * encoder + 3 * head)
  costs = r['cost']
  assert costs['loops'] == [] and costs['loop_extra_flops'] == 0
  # XLA's count adds the elementwise work, mostly on the [256, K/2] logits (multi-hot targets
  # from the padded label sets, sigmoid BCE and its gradient: ~90 FLOPs per logit here).
  assert closed <= costs['flops'] <= 1.25 * closed
  # The HLO walker's own count (no loops here) agrees with XLA's to the few ops it does not
  # model (scatter, reduce-window, ...).
  assert loop_costs(compiled.as_text()).flops_all == pytest.approx(costs['flops'], rel=0.03)
  t = r['roofline']
  assert t['step_s'] == max(costs['flops'] / 275e12, costs['bytes_accessed'] / 1200e9)


@needs_libtpu
def test_hetxl_step_counts_every_mc_chunk():
  # HET-XL sigmoid, 12 MC samples: in 3 chunks of 4 (a scan of 2 iterations after the first
  # chunk, forward and backward) or in 1 chunk (no loop). Chunking does not change the math,
  # so the loop-aware FLOPs agree; XLA's own count misses the loop iterations.
  flops = {}
  for chunk in (4, 12):
    c = load_config('configs/hetxl_jft.py', 'runlocal')
    c.input.batch_size = 64
    c.dataset.num_classes = 256     # a small head compiles in seconds; the loops are the same
    c.model.head_kwargs.train_mc_samples = 12
    c.model.head_kwargs.mc_chunk_size = chunk
    exp, chip, lowered = aot.lower_train_step(c, 'v4:2x2x1')
    r = aot.measure(exp, chip, lowered.compile())
    flops[chunk] = r['cost']
  looped, single = flops[4], flops[12]
  assert single['loops'] == [] and looped['unknown_trip_counts'] == []
  assert sorted(l['trip_count'] for l in looped['loops']) == [2, 2]
  assert looped['loop_extra_flops'] > 0.1 * looped['flops']
  assert looped['flops_with_loops'] == pytest.approx(single['flops'], rel=0.05)
