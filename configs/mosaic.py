r"""CIFAR-10 mosaic: a real multi-label benchmark that runs offline. DET vs HET-XL, sigmoid.

Each image is a 64x64 2x2 grid of real CIFAR-10 images of 1-4 distinct classes (seeded; the
same class may fill several tiles); its labels are the set of those classes (2.5 per image on
average). Heads: HET-XL with the sigmoid link (R = 6 factors, S = 100 training / 1000 eval MC
samples, temperature learnt in [0.05, 5.0]) and, as `:det`, the deterministic sigmoid head on
the same backbone; both train on binary cross-entropy summed over classes. Backbone: ResNet-18
with the ImageNet stem (7x7/2 conv + 3x3/2 max pool: the 64x64 mosaic becomes a 16x16 map,
16x cheaper than the CIFAR stem, chosen so a 2-core CPU trains it in minutes) at width 0.25
(16 channels in the first stage), pad-crop + flip, Adam 1e-3 with warmup (a third of an epoch)
and cosine decay, batch 128, 10 epochs (1,560 steps).
Prepare the data once (20,000 training / 4,000 test mosaics, PNG, ~250 MB):
  python -m launch.prepare_data --source=mosaic:cifar10_npz --input_dir=../shared/data \
      --num_mosaics=train=20000,test=4000 --seed=0 --out=.data/cifar10_mosaic
Run:
  python -m launch.main --config=configs/mosaic.py --workdir=/tmp/mosaic_hetxl
  python -m launch.main --config=configs/mosaic.py:det --workdir=/tmp/mosaic_det
Options: `epochs=N` (default 10), `width=W` (ResNet width multiplier, default 0.25),
`stem=cifar` (3x3/1 stem: full-resolution features, 16x the compute).
Eval prints prec@1 (the top class is one of the labels), mAP, the summed sigmoid NLL and ECE.
Expected with these defaults (BENCHMARKS.md, "Multi-label mosaic"; seed 0, ~46 min each on a
shared 2-core CPU; converged: prec@1 within 0.5 points over the last 3 epochs):
DET prec@1 0.864, mAP 0.758, NLL 3.414, ECE 0.018; HET-XL 0.868, 0.761, 3.379, 0.016.
`:runlocal` (4 steps on the prepared data, tiny ResNet) only checks the path end to end.
"""
from configs import base, schema

TRAIN_MOSAICS = 20_000   # --num_mosaics of the preparation command
DATA_DIR = '.data/cifar10_mosaic'
PREPARE = ('python -m launch.prepare_data --source=mosaic:cifar10_npz --input_dir=../shared/data '
           f'--num_mosaics=train={TRAIN_MOSAICS},test=4000 --seed=0 --out={DATA_DIR}')


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, det=False, epochs=10.0, width=0.25, stem='imagenet', runlocal=False)
  c = base.small_image_recipe(schema.base_config(), 'cifar10', epochs=args.epochs, batch_size=128,
                              stem=args.stem, data_dir=DATA_DIR)
  c.dataset.multi_label = True
  c.dataset.max_labels = 4
  c.dataset.setup_hint = f'Prepare it with:\n  {PREPARE}'
  c.input.eval_batch_size = 250
  c.model.backbone_kwargs.width = args.width
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_epochs = 1 / 3
  c.train.log_every = 25
  c.train.eval_every_epochs = 1.0
  if args.det:
    base.det_head(c, link='sigmoid')
  else:
    base.hetxl_head(c, num_factors=6, link='sigmoid', train_mc_samples=100, mc_chunk_size=100,
                    **base.LEARNT_TEMPERATURE)
  if args.runlocal:
    base.runlocal(c)
  return c
