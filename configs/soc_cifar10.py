r"""SOC on real CIFAR-10: ResNet-18 (CIFAR stem), Adam 1e-3 cosine, 30 epochs, batch 128.

Prepare the data once:
  python -m launch.prepare_data --source=cifar10_npz --input_dir=../shared/data --out=.data/cifar10
Run (dims = embedding size; `det` = the same backbone with a softmax head):
  python -m launch.main --config=configs/soc_cifar10.py:dims=10 --workdir=/tmp/soc10
  python -m launch.main --config=configs/soc_cifar10.py:det --workdir=/tmp/soc_det
Expected (the post's ResNet-18 table, its augmentation also had zoom and colour jitter; ours is
pad-crop + flip on JPEG-q75 CIFAR-10): CE ~86.9%, SOC dims 1/2/5/10 ~71.8/83.4/87.0/87.2%.
`data=DIR` (or `--config.dataset.data_dir=DIR`) trains on any prepared dataset instead, its
classes, channels, size and example counts read from DIR/metadata.json.
`:runlocal` trains a tiny-width ResNet-18 for a few steps on CPU.
"""
from configs import base, schema


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, dims=10, det=False, learn_scale=False, data='', runlocal=False)
  c = base.small_image_recipe(schema.base_config(), 'cifar10', epochs=30, batch_size=128,
                              data_dir=args.data)
  if args.det:
    c.model.head = 'softmax'
  else:
    c.model.head = 'soc'
    c.model.head_kwargs.dims = args.dims
    c.model.head_kwargs.learn_scale = args.learn_scale
    c.model.head_kwargs.label_smoothing = 0.1
  if args.runlocal:
    base.runlocal(c)
  return c
