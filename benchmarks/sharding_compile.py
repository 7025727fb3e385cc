r"""Issue 26's proof on the TPU compiler: class-sharded heads, FSDP and HSDP, compiled for Cloud
TPU pods on this CPU host (`launch.compile`, libtpu), one fresh process per row.

  pip install -e '.[tpu_compile]'
  python benchmarks/sharding_compile.py --out=/tmp/sharding_compile [--rows=NAME,NAME] [--list]

Each row is `python -m launch.compile --config=configs/hetxl_jft.py... --topology=T --json=...`
with the overrides listed in ROWS; finished rows (their JSON exists) are not compiled again, so
the command resumes. A row the compiler refuses for lack of HBM is recorded as 'does not fit'
with XLA's own numbers. At the end it prints one markdown table of every finished row: per
device memory (total against the chip's HBM), parameter + optimizer bytes per device, FLOPs
(with loops) and the FLOPs against the same topology's DET row where there is one.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JFT = 'configs/hetxl_jft.py'
FSDP = ("--config.sharding.rules=(('.*', 'fsdp'),)",)
REPL = ("--config.sharding.rules=(('.*', 'replicate'),)",)   # the recipe's FSDP off
QUAD = ('--config.model.head_kwargs.mc_method=quadrature',)


VITG_REMAT = ('--config.model.backbone=vit_g14', '--config.model.backbone_kwargs.remat=True')


def mesh(model: int, axes: str = '') -> tuple:
  return (f'--config.mesh.shape=(-1,{model})',) + ((f'--config.mesh.axes={axes}',) if axes else ())


def classes(k: int) -> tuple:
  return (f'--config.dataset.num_classes={k}',)


# name -> (config, topology, overrides). The JFT recipe throughout (ViT-L/32, 224 px, bf16,
# batch 4096, AdamW); only what a row is about changes.
ROWS = {
    # K = 29,593 (odd): data-parallel against the head class-sharded over 'model'
    'jft_quad_dp_v5e': (JFT, 'v5e:16x16', QUAD + REPL),
    'jft_quad_m4_v5e': (JFT, 'v5e:16x16', QUAD + REPL + mesh(4)),
    'jft_quad_m8_v5e': (JFT, 'v5e:16x16', QUAD + REPL + mesh(8)),
    'jft_quad_m16_v5e': (JFT, 'v5e:16x16', QUAD + REPL + mesh(16)),
    'jft_det_dp_v5e': (JFT + ':det', 'v5e:16x16', REPL),
    'jft_det_m16_v5e': (JFT + ':det', 'v5e:16x16', REPL + mesh(16)),
    # ... with FSDP (the recipe's default)
    'jft_quad_fsdp_v5e': (JFT, 'v5e:16x16', QUAD + FSDP),
    'jft_quad_m16_fsdp_v5e': (JFT, 'v5e:16x16', QUAD + FSDP + mesh(16)),
    # a million classes, HET-XL quadrature, sigmoid
    'k2p20_quad_m16_fsdp_v5e': (JFT, 'v5e:16x16', QUAD + classes(2**20) + mesh(16) + FSDP),
    'k1000003_quad_m16_fsdp_v5e': (JFT, 'v5e:16x16', QUAD + classes(1_000_003) + mesh(16) + FSDP),
    'k2p20_quad_m16_v5e': (JFT, 'v5e:16x16', QUAD + classes(2**20) + mesh(16) + REPL),
    'k2p20_quad_dp_v5e': (JFT, 'v5e:16x16', QUAD + classes(2**20) + REPL),
    'k2p20_det_dp_v5e': (JFT + ':det', 'v5e:16x16', classes(2**20) + REPL),
    'k2p20_det_m16_fsdp_v5e': (JFT + ':det', 'v5e:16x16', classes(2**20) + mesh(16) + FSDP),
    # (v4:4x4x4's logical axes must be products of its physical 4s: 'model' 4 or 16, not 8)
    'k2p20_quad_m16_fsdp_v4': (JFT, 'v4:4x4x4', QUAD + classes(2**20) + mesh(16) + FSDP),
    'k1000003_quad_m16_fsdp_v4': (JFT, 'v4:4x4x4', QUAD + classes(1_000_003) + mesh(16) + FSDP),
    'k2p20_quad_dp_v4': (JFT, 'v4:4x4x4', QUAD + classes(2**20) + REPL),
    # ... 64 images per v4 chip: the backbone's blocks rematerialised
    'k2p20_quad_m16_fsdp_remat_v4': (JFT, 'v4:4x4x4', QUAD + classes(2**20) + mesh(16) + FSDP
                                     + ('--config.model.backbone_kwargs.remat=True',)),
    'k1000003_quad_m16_fsdp_remat_v4': (JFT, 'v4:4x4x4', QUAD + classes(1_000_003) + mesh(16)
                                        + FSDP + ('--config.model.backbone_kwargs.remat=True',)),
    # ViT-g/14 (1.0 B parameters) + HET-XL at JFT size: replicated against FSDP
    'vitg14_quad_dp_v5e': (JFT, 'v5e:16x16', QUAD + REPL + ('--config.model.backbone=vit_g14',)),
    'vitg14_quad_fsdp_v5e': (JFT, 'v5e:16x16', QUAD + ('--config.model.backbone=vit_g14',) + FSDP),
    # ... with each encoder block rematerialised (big_vision trains ViT-g / G so)
    'vitg14_quad_dp_remat_v5e': (JFT, 'v5e:16x16', QUAD + VITG_REMAT + REPL),
    'vitg14_quad_fsdp_remat_v5e': (JFT, 'v5e:16x16', QUAD + VITG_REMAT + FSDP),
    'vitG14_quad_fsdp_remat_v5e': (JFT, 'v5e:16x16', QUAD + FSDP + (
        '--config.model.backbone=vit_G14', '--config.model.backbone_kwargs.remat=True')),
    # the eval step (one batch of 4096 into the on-device metrics, mAP summaries included)
    'eval_jft_quad_dp_v5e': (JFT, 'v5e:16x16', QUAD + REPL + ('--step=eval',)),
    'eval_k2p20_quad_m16_v5e': (JFT, 'v5e:16x16', QUAD + FSDP + classes(2**20) + mesh(16)
                                + ('--step=eval',)),
    # two v5e-256 slices over DCN: HSDP (replicated across slices, FSDP within)
    'jft_quad_2slice_hsdp_v5e': (JFT, 'v5e:16x16', QUAD + FSDP + ('--num_slices=2',
        "--config.mesh.axes=('replica','data','model')", '--config.mesh.shape=(1,-1,1)',
        '--config.mesh.dcn_shape=(2,1,1)')),
    'jft_quad_2slice_dp_v5e': (JFT, 'v5e:16x16', QUAD + REPL + ('--num_slices=2',
        "--config.mesh.axes=('replica','data','model')", '--config.mesh.shape=(1,-1,1)',
        '--config.mesh.dcn_shape=(2,1,1)')),
}


def run_row(name: str, out: str) -> dict:
  path = os.path.join(out, f'{name}.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config, topology, overrides = ROWS[name]
  cmd = [sys.executable, '-m', 'launch.compile', f'--config={config}', f'--topology={topology}',
         *overrides, f'--json={path}']
  print('$', ' '.join(cmd[1:]), flush=True)
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  print(proc.stdout[-3000:], proc.stderr[-2000:] if proc.returncode else '', flush=True)
  if proc.returncode and 'DOES NOT FIT' in (proc.stdout + proc.stderr):
    message = next(l for l in (proc.stdout + proc.stderr).splitlines() if 'DOES NOT FIT' in l)
    record = {'topology': topology, 'does_not_fit': message, 'compile_s': time.time() - t0}
    with open(path, 'w') as f:
      json.dump(record, f)
    return record
  if proc.returncode:
    return {'error': (proc.stderr or proc.stdout)[-500:]}
  with open(path) as f:
    return json.load(f)


def table(out: str) -> str:
  rows = []
  results = {n: json.load(open(os.path.join(out, f'{n}.json'))) for n in ROWS
             if os.path.exists(os.path.join(out, f'{n}.json'))}
  gib = lambda b: f'{b / 2**30:.2f}'
  for name, r in results.items():
    config, topology, overrides = ROWS[name]
    what = ' '.join(o.replace('--config.', '') for o in overrides) or '(recipe)'
    if 'does_not_fit' in r:
      need = re.search(r'(\d+(?:\.\d+)?[GM]) of (\d+(?:\.\d+)?[GM])', r['does_not_fit'])
      rows.append(f'| {name} | {config} | {topology} | {what} | - | - | - | DOES NOT FIT'
                  f'{" (" + need.group(0) + ")" if need else ""} | - | - | '
                  f'{r["compile_s"]:.0f} s |')
      continue
    m, k = r['memory'], r['cost']
    det = results.get(re.sub(r'_(quad|det)_', '_det_', name, count=1))
    ratio = (f'{k["flops_with_loops"] / det["cost"]["flops_with_loops"]:.2f}x'
             if det and 'cost' in det and det is not r else '-')
    rows.append(f'| {name} | {config} | {topology} | {what} | {r["mesh"]} | '
                f'{r["per_device_batch"]} | {gib(r.get("param_bytes_per_device", 0))} GiB | '
                f'{gib(m["total_bytes"])} / {gib(r["chip"]["hbm_bytes"])} GiB '
                f'{"fits" if m["fits"] else "DOES NOT FIT"} | {k["flops_with_loops"]:.4g} | '
                f'{ratio} | {r["compile_s"]:.0f} s |')
  head = ('| row | config | topology | overrides | mesh | batch / device | params + opt / device '
          '| memory / device | FLOPs / device | vs DET | compile |\n' + '|---' * 11 + '|')
  return head + '\n' + '\n'.join(rows)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/sharding_compile')
  p.add_argument('--rows', default=','.join(ROWS), help='comma-separated row names')
  p.add_argument('--list', action='store_true', help='print the rows and exit')
  p.add_argument('--report', action='store_true', help='only tabulate finished rows')
  a = p.parse_args()
  if a.list:
    for name, (config, topology, overrides) in ROWS.items():
      print(name, config, topology, ' '.join(overrides))
    return
  os.makedirs(a.out, exist_ok=True)
  if not a.report:
    for name in a.rows.split(','):
      if name not in ROWS:
        sys.exit(f'error: unknown row {name!r}; --list shows them')
      run_row(name, a.out)
  print(table(a.out))


if __name__ == '__main__':
  main()
