r"""Quickstart: scikit-learn's digits (bundled, real), a small convnet, deterministic softmax head.

Run (CPU, about a minute on 2 cores):
  python -m launch.main --config=configs/quickstart.py --workdir=/tmp/quickstart
Expected: final eval accuracy >= 0.97 on the 360 held-out digits, NLL ~0.1, ECE < 0.03.
Then `--mode=eval` on the same workdir prints the same numbers.
Variants: `:runlocal` (a few steps, for tests), `:temperature` (learnt bounded temperature),
`:data=DIR` (the same small convnet on any prepared dataset: classes, channels, size and pixel
statistics read from DIR/metadata.json; a quick first model on your own data).
"""
from configs import base


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, ['runlocal', 'temperature', 'data'])
  c = base.base_config()
  c.dataset.name = 'digits'        # 8x8 gray
  c.dataset.num_classes = 10
  if 'data' in args:               # classes, channels, size: from the data
    base.prepared_dataset(c, '', args['data'])
    c.dataset.num_classes = 0
  c.input.batch_size = 64
  c.input.eval_batch_size = 128
  c.model.backbone = 'convnet'
  c.model.head = 'softmax'
  c.model.head_kwargs.learn_temperature = 'temperature' in args
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  c.train.num_steps = 600
  c.train.log_every = 100
  c.train.eval_every = 300
  c.train.checkpoint_every = 300
  if 'runlocal' in args:
    base.runlocal(c)
  return c
