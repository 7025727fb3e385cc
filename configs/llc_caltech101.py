r"""LLC on real Caltech-101 (64x64 RGB, 101 classes): ResNet-18 (CIFAR stem), SGD momentum 0.9,
lr 0.05, weight decay 5e-4, cosine, 60 epochs, batch 64.

Prepare the data once:
  python -m launch.prepare_data --source=caltech101_npz --input_dir=../shared/data --out=.data/caltech101
Phase 1 (learn a k-bit codebook; default k = ceil(2 log2 K) = 14 for K = 101), export it,
phase 2, evaluate:
  python -m launch.main --config=configs/llc_caltech101.py:phase=1,bits=10 --workdir=/tmp/llc_c101_p1
  python -m llc.evaluate --config=configs/llc_caltech101.py:phase=1,bits=10 --workdir=/tmp/llc_c101_p1
  python -m launch.main --config=configs/llc_caltech101.py:phase=2,bits=10,phase1=/tmp/llc_c101_p1 \
      --workdir=/tmp/llc_c101_p2
  python -m llc.evaluate --config=configs/llc_caltech101.py:phase=2,bits=10,phase1=/tmp/llc_c101_p1 \
      --workdir=/tmp/llc_c101_p2
Real-valued reference and baseline codebooks (random / SVD / CCA of the DET run), used as the
fixed codebook of phase 2 (`codebook=FILE,backbone_from=DET`) or as a phase-1 warm start
(`phase=1,codebook_init=FILE`):
  python -m launch.main --config=configs/llc_caltech101.py:det --workdir=/tmp/c101_det
  python -m llc.baseline_codebooks --kind=svd --bits=10 --det_workdir=/tmp/c101_det --out=/tmp/svd10.npy
  python -m llc.baseline_codebooks --kind=cca --bits=10 --det_workdir=/tmp/c101_det \
      --config=configs/llc_caltech101.py:det --out=/tmp/cca10.npy
  python -m llc.baseline_codebooks --kind=random --bits=10 --num_classes=101 --out=/tmp/rand10.npy
Expected: the full recipe (64 px, 60 epochs) was not run here (CPU only). Scaled down
(ResNet-18 width 1/4 at 32x32, 30 epochs, phase 2 7.5 epochs; `benchmarks/llc_codebooks.py`,
tables in BENCHMARKS.md): DET 67.6%; LLC phase-1 class-code accuracy 47.4 / 56.2 / 60.7% with
65 / 98 / 101 distinct codes at k = 7 / 10 / 14; after phase 2 MHD 44.7 / 51.3 / 54.2% (the
DET run's SVD codebook: 46.5 / 52.3 / 55.9%), strict ED 42.1 / 43.6 / 35.0%. Below k = 14 some
classes share a code (a random 7-bit codebook of 101 classes has about 71 distinct codes).
`:runlocal` trains a tiny-width ResNet-18 for a few steps on CPU.
"""
from configs import base, schema
from configs import llc_phases as phases

def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, data='', **phases.ARGS)
  c = base.small_image_recipe(schema.base_config(), 'caltech101', epochs=60, batch_size=64,
                              data_dir=args.data)
  phases.paper_optimizer(c)
  phases.configure(c, args)
  if args.runlocal:
    base.runlocal(c)
  return c
