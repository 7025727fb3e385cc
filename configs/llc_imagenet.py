r"""LLC on ImageNet-1K, the paper's recipe: ResNet-50, 20 bits, SGD, inception crop.

Phase 1: SGD momentum 0.875, lr 0.1 per 256 images (0.1 * batch / 256), cosine, 100 epochs,
coupled weight decay 2^-15 on all parameters (codebook and BN included), label smoothing 0.1,
RandomResizedCrop(224) + flip; eval resize + center crop 224. Phase 2: the same with lr 0.01
per 256 images, 25 epochs, backbone + projection from phase 1, no label smoothing. The cosine
decays per step (the reference decays per epoch). Compute dtype bfloat16.

ImageNet is read with tfds (`imagenet2012`, splits train / validation) from the default TFDS
data dir or `--config.dataset.data_dir`; it has to be prepared beforehand (manual download).
  python -m launch.main --config=configs/llc_imagenet.py:phase=1,bits=20 --workdir=$W/p1
  python -m llc.evaluate --config=configs/llc_imagenet.py:phase=1,bits=20 --workdir=$W/p1
  python -m launch.main --config=configs/llc_imagenet.py:phase=2,bits=20,phase1=$W/p1 --workdir=$W/p2
  python -m llc.evaluate --config=configs/llc_imagenet.py:phase=2,bits=20,phase1=$W/p1 --workdir=$W/p2
Expected (published, ResNet-50, 20 bits): phase-1 class-code accuracy 75.5%, 1000/1000 unique
codes, ED 68.82%, MHD 74.57%, 19.2 of 20 bits right; real-valued ResNet-50 (`:det`) ~77%.
Baseline codebooks from a trained classifier, unique of 1000: random 1000, CCA 813, SVD 969.
`:runlocal` builds a tiny-width ResNet-50 at batch 16 (running it still needs the data).
"""
from configs import base, schema
from configs import llc_phases as phases

SETUP_HINT = (
    'Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into '
    '<tfds data dir>/downloads/manual/, then build it once:\n'
    '  python -c "import tensorflow_datasets as tfds; tfds.builder(\'imagenet2012\').'
    'download_and_prepare()"\n'
    'and point --config.dataset.data_dir at the tfds data dir if it is not the default.')


def imagenet_recipe(c: base.ConfigDict, epochs: int = 100,
                    batch_size: int = 256) -> base.ConfigDict:
  """The LLC paper's ResNet-50 recipe (phase 1 values)."""
  c.dataset.name = 'tfds'
  c.dataset.tfds_name = 'imagenet2012'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.num_classes = 1000
  c.dataset.channels = 3
  c.dataset.setup_hint = SETUP_HINT
  c.input.batch_size = batch_size
  c.input.eval_batch_size = 500
  c.input.train_augment = 'inception'
  c.input.eval_preprocess = 'center_crop'
  c.input.image_size = 224
  c.input.mean = (0.485, 0.456, 0.406)
  c.input.std = (0.229, 0.224, 0.225)
  c.input.num_workers = 8
  c.model.backbone = 'resnet50'
  c.model.backbone_kwargs.stem = 'imagenet'
  c.model.backbone_kwargs.width = 1.0
  c.model.dtype = 'bfloat16'
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.875
  c.optimizer.learning_rate = 0.1
  c.optimizer.lr_batch_size = 256   # 0.1 per 256 images, scaled to the final batch
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 2.0 ** -15
  c.train.num_steps = 0
  c.train.epochs = float(epochs)   # of dataset.train_examples (tfds info)
  c.train.log_every = 500
  c.train.eval_every_epochs = 10.0
  c.train.checkpoint_every = 0
  c.train.checkpoint_every_epochs = 1.0
  return c


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, **phases.ARGS)
  c = imagenet_recipe(schema.base_config())
  phases.configure(c, args)
  if args.runlocal:
    base.runlocal(c)
  return c
