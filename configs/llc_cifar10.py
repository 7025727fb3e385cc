r"""LLC on real CIFAR-10: ResNet-18 (CIFAR stem), SGD momentum 0.9 lr 0.1 wd 5e-4 cosine, 30 epochs,
batch 128.

Prepare the data once:
  python -m launch.prepare_data --source=cifar10_npz --input_dir=../shared/data --out=.data/cifar10
Phase 1 (learn a k-bit codebook; default k = ceil(2 log2 K) = 7 for K = 10), export it, phase 2 (lr / 10,
1/4 of the steps, backbone + projection from phase 1), evaluate:
  python -m launch.main --config=configs/llc_cifar10.py:phase=1,bits=7 --workdir=/tmp/llc_c10_p1
  python -m llc.evaluate --config=configs/llc_cifar10.py:phase=1,bits=7 --workdir=/tmp/llc_c10_p1
  python -m launch.main --config=configs/llc_cifar10.py:phase=2,bits=7,phase1=/tmp/llc_c10_p1 \
      --workdir=/tmp/llc_c10_p2
  python -m llc.evaluate --config=configs/llc_cifar10.py:phase=2,bits=7,phase1=/tmp/llc_c10_p1 \
      --workdir=/tmp/llc_c10_p2
Any other prepared dataset: `data=DIR` (or `--config.dataset.data_dir=DIR`); classes, channels,
size, example counts and the default k come from DIR/metadata.json, the lr scales with the batch
(0.05 per 64 images), epochs count the data's own examples.
Variants: `:det` (same backbone, softmax head, the real-valued reference and the source of SVD /
CCA codebooks), `phase=1,codebook_init=FILE` (warm start from `llc.baseline_codebooks`),
`phase=2,codebook=FILE,backbone_from=DIR` (a fixed baseline codebook).
Expected: not measured (CPU only). The paper's target is 10/10 unique codes and a phase-1
class-code accuracy close to the `:det` run (75.5 vs ~77% on ImageNet), MHD >= strict ED
after phase 2. Short runs fall well short of that: on scaled-down Caltech-101 (10 epochs)
class-code accuracy was 10-16 points below DET and codes collided (see llc_caltech101.py).
`:runlocal` trains a tiny-width ResNet-18 for a few steps on CPU.
"""
from configs import base, schema
from configs import llc_phases as phases


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, data='', **phases.ARGS)
  c = base.small_image_recipe(schema.base_config(), 'cifar10', epochs=30, batch_size=128,
                              data_dir=args.data)
  c.model.backbone_kwargs.width = 1.0
  phases.paper_optimizer(c)
  phases.configure(c, args)
  if args.runlocal:
    base.runlocal(c)
  return c
