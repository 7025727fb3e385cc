r"""Fine-tune public big_vision weights (an ImageNet-21k ViT, a BiT-M ResNet) with any head on any
prepared dataset: "an i21k ViT-B/16 with a HET-XL head on my data" is one config.

  python -m launch.main --config=configs/finetune_pretrained.py:ckpt=/ckpts/B_16-i21k.npz,data=/data/my_ar,head=hetxl \
      --workdir=/tmp/ft

Arguments: ckpt = a big_vision `.npz` (ViT: big_vision `vit.py` or original ViT-release /
AugReg files such as `gs://vit_models/augreg/B_16-i21k-300ep-...npz`; BiT: `BiT-M-R50x1.npz`
or a big_vision `bit_paper.py` checkpoint), loaded into the backbone by `train.init_from`
(backbones/pretrained.py: names converted, position embeddings resampled to `size`, the file's
head never loaded); backbone = vit_b16 (default) | vit_s16 | vit_l16 | vit_b32 | bit_r50x1 |
bit_r101x3 | ...; head = det | het | hetxl | soc | llc; data = a prepared dataset
(`launch.prepare_data`); size = image side (default 224); steps (default 10000); runlocal.
Without ckpt the backbone starts from scratch. `--config.train.init_prefixes`
narrows what loads (e.g. "('backbone/block0',)").
Recipe, big_vision's transfer recipe: SGD momentum 0.9, lr 0.01 per 512 images, batch 512,
500 warmup steps then cosine, gradient clip 1.0, no weight decay, inception crop + flip at
`size`, centre crop for eval, pixels scaled to [-1, 1] as the public checkpoints expect; HET /
HET-XL with R = 15 factors, S = 1000 samples, temperature learnt in [0.05, 5.0].
Expected: not measured here (no public weights can be downloaded on the development machine);
the loader is checked against numpy references of big_vision's models (tests/test_pretrained.py).
"""
from configs import base, schema


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, ckpt='', backbone='vit_b16', head='hetxl', data='', size=224,
                        steps=10_000, runlocal=False)
  c = schema.base_config()
  base.prepared_dataset(c, 'cifar10', args.data)
  c.input.batch_size = 512
  c.input.eval_batch_size = 512
  c.input.image_size = args.size
  c.input.train_augment = 'inception'
  c.input.eval_preprocess = 'center_crop'
  c.input.mean, c.input.std = (0.5,), (0.5,)     # [-1, 1], as big_vision's value_range(-1, 1)
  c.input.num_workers = 8
  c.model.backbone = args.backbone
  base.comparison_head(c, args.head, num_factors=15, train_samples=1000,
                       eval_samples=1000, chunk=100)
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.learning_rate = 0.01
  c.optimizer.lr_batch_size = 512
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0
  c.train.num_steps = args.steps
  c.train.epochs = 0.0
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.init_from = args.ckpt
  c.train.init_prefixes = ('backbone',)
  if args.runlocal:
    c.dataset.num_classes = 10
    base.runlocal(c, stand_in=True)
  return c
