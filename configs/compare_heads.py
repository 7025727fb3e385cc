r"""One backbone and one recipe per dataset, any head: the side-by-side comparison.

  python -m launch.main --config=configs/compare_heads.py:dataset=cifar10,head=hetxl --workdir=...
  python benchmarks/quality.py --dataset=cifar10      # every head, one table (see there)

Arguments: dataset = cifar10 | caltech101 (prepared by `launch.prepare_data`, see README), the
recipe (stem, HET factors) and its default data; data = DIR, any prepared dataset instead (or
`--config.dataset.data_dir=DIR`): classes, channels, stored size, example counts and pixel
statistics come from DIR/metadata.json, after overrides, and so do the LLC bits, the epochs
in steps and the warmup (`training.resolve`). For your own data:
  python -m launch.main --config=configs/compare_heads.py:data=/data/my_ar,head=hetxl,epochs=10 \
      --workdir=/tmp/mine && python -m launch.main --mode=eval --workdir=/tmp/mine
  python -m launch.main --config=configs/compare_heads.py:data=/data/my_ar,compare,cpu,epochs=2 \
      --workdir=/tmp/mine_all     # every head, one table at the end (`launch.runs`)
compare = one run per head (det, het, hetxl, soc, llc: LLC phase 1, its class-code accuracy;
its decodings need phase 2, `llc.evaluate`) in WORKDIR/<head>, then one side-by-side table;
cpu = a recipe a CPU finishes: ResNet-18 at width 0.25 (about 1/16 of the compute; `width=`
overrides it), 100 eval MC samples for het / hetxl instead of 1000, a progress line every 10
steps. The first progress line (after step 1) gives the run's ETA.
head = det | het | hetxl | soc (10 dims) | socN (N dims) | llc (LLC phase 1: the learnt-codebook
classifier; with phase1=DIR, LLC phase 2 from that phase-1 workdir: instance codes);
noise = fraction of training labels flipped, noise_kind = symmetric | class_dependent;
tau = LO:HI, the learnt temperature's bounds for het / hetxl (default 0.05:5.0, start at the
midpoint); tau_lr = M, the temperature's learning-rate multiplier for het / hetxl (default 1;
10 won on frozen features; end to end at 5 epochs it did not help: BENCHMARKS.md "Label
noise on frozen features" and "Label noise end to end");
augment = cifar (default: pad 4 + random crop + horizontal flip) | flip | none, the training
augmentation (a flip changes what handwriting means: use none there; `config derived`
prints the one applied);
epochs; width (ResNet-18 channel multiplier, default 1.0 = the real ResNet-18, 0.25 with cpu);
ood = F holds out a seeded fraction F of the classes (`base.hold_out_classes`; OOD data for
`evaluation.ood`); runlocal.
Recipe: ResNet-18 (CIFAR stem on 32 px CIFAR-10, ImageNet stem on 64 px Caltech-101), Adam 1e-3
with warmup + cosine, batch 128, pad-crop + flip. Heads: HET and HET-XL with R = 6 (CIFAR-10)
or 16 (Caltech-101) factors, S = 100 train / 1000 eval samples, temperature learnt in
[0.05, 5.0]; SOC with 10 dims; LLC with ceil(2 log2 K) bits. These are our choices.
Expected: all heads within a few points of accuracy of DET on clean labels; the differences are
in NLL and ECE. BENCHMARKS.md has the measured table.
"""
from configs import base, schema
from configs import llc_phases as phases

DATASETS = {'cifar10': ('cifar', 6), 'caltech101': ('imagenet', 16)}  # stem, HET factors


COMPARED = ('det', 'het', 'hetxl', 'soc', 'llc')   # `compare`: one run each, side by side
CPU_WIDTH, CPU_EVAL_SAMPLES = 0.25, 100           # `cpu`: ~1/16 of ResNet-18's compute


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, dataset='cifar10', data='', head='det', noise=0.0,
                        noise_kind='symmetric', epochs=30.0, width=(None, float),
                        phase1=(None, str), tau=(None, str), tau_lr=(None, float),
                        ood=(None, float), augment='cifar', cpu=False, compare=False,
                        runlocal=False)
  if args.dataset not in DATASETS:
    raise ValueError(f'dataset must be one of {sorted(DATASETS)}, got {args.dataset!r}')
  if not args.compare:
    return _recipe(args, args.head)
  if args.phase1 is not None or 'head=' in (arg or ''):
    raise ValueError('compare trains every head (LLC phase 1 only): drop head= and phase1=')
  return base.ConfigDict({'runs': {head: _recipe(args, head) for head in COMPARED}})


def _recipe(args: base.ConfigDict, head: str) -> base.ConfigDict:
  stem, factors = DATASETS[args.dataset]
  c = base.small_image_recipe(schema.base_config(), args.dataset, epochs=args.epochs,
                              batch_size=128, stem=stem, data_dir=args.data)
  if args.ood is not None:
    base.hold_out_classes(c, args.ood)
  c.input.num_workers = 1
  c.input.train_augment = args.augment
  c.model.backbone_kwargs.width = args.width or (CPU_WIDTH if args.cpu else 1.0)
  bounds = tuple(float(v) for v in (args.tau or '0.05:5.0').split(':'))
  base.comparison_head(c, head, num_factors=factors, train_samples=100,
                       eval_samples=CPU_EVAL_SAMPLES if args.cpu else 1000, chunk=100,
                       bounds=bounds)
  if args.phase1 is not None:   # LLC phase 2 from that phase-1 workdir
    if head != 'llc':
      raise ValueError('phase1=DIR applies to head=llc only')
    phases.configure(c, {'phase': 2, 'phase1': args.phase1})
  for name in ('tau', 'tau_lr'):
    if getattr(args, name) is not None and head not in ('het', 'hetxl') and not args.compare:
      raise ValueError(f'{name}= applies to head=het or hetxl only')
  if args.tau_lr is not None and head in ('het', 'hetxl'):
    c.optimizer.lr_mults = (('.*temperature.*', args.tau_lr),)
  c.dataset.label_noise = args.noise
  c.dataset.label_noise_kind = args.noise_kind
  c.train.log_every = 10 if args.cpu else 50
  c.train.eval_every = 0
  c.train.eval_every_epochs = 0.0
  if args.runlocal:
    base.runlocal(c)
  return c
