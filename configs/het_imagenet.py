r"""HET baseline on ImageNet-1k: ResNet-50, noise in logit space, R = 15, full variant, tau 1.5.

The uncertainty-baselines ImageNet HET recipe: S = 5000 MC samples (train and eval), fixed
temperature 1.5, SGD Nesterov momentum 0.9, lr 0.1 per 256 images (batch 1024 -> 0.4), 5 warmup
epochs, 90 epochs, weight decay 1e-4 (coupled), 224 px inception crop, softmax link. Their decay
is stepwise; ours is cosine.
Needs tfds `imagenet2012` prepared on disk (no download here):
  python -m launch.main --config=configs/het_imagenet.py --workdir=/tmp/het_in1k \
      --config.dataset.data_dir=~/tensorflow_datasets
Expected (published, uncertainty-baselines): HET NLL 0.898, top-1 77.5%, ECE 0.033;
the `det` variant NLL 0.939, top-1 76.2%, ECE 0.032.
`:runlocal` swaps in a synthetic 1000-class stand-in and a tiny ResNet-50 for a CPU check.
"""
from configs import base, schema


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, det=False, runlocal=False)
  c = schema.base_config()
  c.dataset.name = 'tfds'
  c.dataset.tfds_name = 'imagenet2012'
  c.dataset.num_classes = 1000
  c.dataset.channels = 3
  c.dataset.eval_split = 'validation'
  c.dataset.setup_hint = ('Download and prepare ImageNet with tfds (`tfds build imagenet2012` '
                          'with the tarballs in the manual dir), then point '
                          '--config.dataset.data_dir at that data dir.')
  c.input.batch_size = 1024
  c.input.eval_batch_size = 1000
  c.input.image_size = 224
  c.input.train_augment = 'inception'
  c.input.eval_preprocess = 'center_crop'
  c.input.mean = (0.485, 0.456, 0.406)
  c.input.std = (0.229, 0.224, 0.225)
  c.input.num_workers = 16
  c.model.backbone = 'resnet50'
  c.model.backbone_kwargs.width = 1.0
  c.model.dtype = 'bfloat16'
  if args.det:
    base.det_head(c)
  else:
    base.hetxl_head(c, 'het', num_factors=15, train_mc_samples=5000, eval_mc_samples=5000,
                    mc_chunk_size=250, temperature=1.5)
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.learning_rate = 0.1
  c.optimizer.lr_batch_size = 256   # 0.1 per 256 images: 0.4 at batch 1024
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_epochs = 5.0   # epochs of the tfds train split (training.resolve)
  c.train.num_steps = 0
  c.train.epochs = 90.0
  c.train.log_every = 100
  c.train.eval_every_epochs = 10.0
  c.train.checkpoint_every = 0
  c.train.checkpoint_every_epochs = 1.0
  if args.runlocal:
    base.runlocal(c, stand_in=True)
  return c
