r"""Quickstart: scikit-learn's digits (bundled, real), a small convnet, DET beside HET-XL.

Run (the README's first command; CPU):
  python -m launch.main --config=configs/quickstart.py:compare --workdir=/tmp/quickstart
trains the same recipe twice, 300 steps each, with a deterministic softmax head (DET) in
/tmp/quickstart/det and a HET-XL head (R = 3 factors, S = 32 train / 100 eval samples,
temperature learnt in [0.05, 5.0], printed with each progress line) in /tmp/quickstart/hetxl,
and ends with a table of both runs' test accuracy, NLL and ECE (`launch.runs`).
Expected (measured 2026-11-30, BENCHMARKS.md "Quickstart"): on the 360 held-out digits DET
accuracy 0.9917, NLL 0.016, ECE 0.005; HET-XL accuracy 0.9944, NLL 0.017, ECE 0.006, learnt
temperature 2.37; 91-100 s on the 2 loaded cores (about 35-40 s expected unloaded). Then
`python -m launch.main --mode=eval --workdir=/tmp/quickstart` prints the same numbers.

Without `:compare`, one DET run of 600 steps in the workdir itself:
  python -m launch.main --config=configs/quickstart.py --workdir=/tmp/qs
Expected: accuracy 0.9917, NLL 0.020, ECE 0.006 (BENCHMARKS.md).
Variants: `:runlocal` (a few steps, for tests), `:temperature` (DET with a learnt bounded
temperature), `:data=DIR` (the same small convnet on any prepared dataset: classes, channels,
size and pixel statistics read from DIR/metadata.json; a quick first model on your own data);
they combine with `:compare`.
"""
from configs import base, schema


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, runlocal=False, temperature=False, data='', compare=False)
  if not args.compare:
    return _recipe(args, num_steps=600)
  # Two runs of one recipe, half as long each; only the head differs (`launch.runs`).
  return base.ConfigDict({'runs': {'det': _recipe(args, num_steps=300),
                                   'hetxl': _recipe(args, num_steps=300, hetxl=True)}})


def _recipe(args: base.ConfigDict, num_steps: int, hetxl: bool = False) -> base.ConfigDict:
  c = schema.base_config()
  c.dataset.name = 'digits'        # 8x8 gray
  c.dataset.num_classes = 10
  if args.data:                    # classes, channels, size: from the data
    base.prepared_dataset(c, '', args.data)
    c.dataset.num_classes = 0
  c.input.batch_size = 64
  c.input.eval_batch_size = 128
  c.model.backbone = 'convnet'
  c.model.head = 'softmax'
  c.model.head_kwargs.learn_temperature = args.temperature
  if hetxl:
    base.hetxl_head(c, num_factors=3, train_mc_samples=32, eval_mc_samples=100, mc_chunk_size=32,
                    **base.LEARNT_TEMPERATURE)
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  c.train.num_steps = num_steps
  c.train.log_every = 100
  c.train.eval_every = 300
  c.train.checkpoint_every = 300
  if args.runlocal:
    base.runlocal(c)
  return c
