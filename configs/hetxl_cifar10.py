r"""HET-XL on real CIFAR-10: ResNet-18 (CIFAR stem), Adam 1e-3 cosine, 30 epochs, batch 128.

The same recipe as `configs/soc_cifar10.py`, so heads compare side by side. Our choices (no
published CIFAR-10 HET-XL recipe): R = 6 factors, full variant, S = 100 training / 1000 eval
samples, temperature learnt in [0.05, 5.0], softmax link.
Prepare the data once:
  python -m launch.prepare_data --source=cifar10_npz --input_dir=../shared/data --out=.data/cifar10
Run (and the deterministic head, and HET with noise in logit space, on the same backbone):
  python -m launch.main --config=configs/hetxl_cifar10.py --workdir=/tmp/hetxl_c10
  python -m launch.main --config=configs/hetxl_cifar10.py:det --workdir=/tmp/det_c10
  python -m launch.main --config=configs/hetxl_cifar10.py:het --workdir=/tmp/het_c10
Label noise (fraction of training labels flipped, seeded): `:noise=0.4` or
`:noise=0.2,noise_kind=class_dependent`.
`data=DIR` (or `--config.dataset.data_dir=DIR`): any prepared dataset instead, its classes,
channels, size and example counts read from DIR/metadata.json.
Expected: about 93% test accuracy for all three on clean labels (ResNet-18, 30 epochs, JPEG-q75
copy); HET/HET-XL's gain is in NLL, larger with label noise.
"""
from configs import base, schema


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, det=False, het=False, noise=0.0, noise_kind='symmetric', data='',
                        runlocal=False)
  c = base.small_image_recipe(schema.base_config(), 'cifar10', epochs=30, batch_size=128,
                              data_dir=args.data)
  if args.det:
    base.det_head(c)
  else:
    base.hetxl_head(c, 'het' if args.het else 'hetxl', num_factors=6, train_mc_samples=100,
                    mc_chunk_size=100, **base.LEARNT_TEMPERATURE)
  c.dataset.label_noise = args.noise
  c.dataset.label_noise_kind = args.noise_kind
  if args.runlocal:
    base.runlocal(c)
  return c
