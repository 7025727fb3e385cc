"""The config schema: every field the trainer, evaluators and tools read, its default and meaning.

Configs start from `base_config()`, set what their experiment needs (`configs.base` has the
shared recipes) and return the dict; `launch.main` locks it (`lock_config=True`), so a misspelt
override fails instead of being silently ignored. Values left at 0 / () are derived from the
data after overrides (`training.resolve`).
"""
import ml_collections

ConfigDict = ml_collections.ConfigDict


def base_config() -> ConfigDict:
  """All fields the trainer reads, with defaults."""
  c = ConfigDict()
  c.seed = 0

  c.dataset = ConfigDict()
  c.dataset.name = 'digits'        # digits | arrayrecord | tfds | synthetic
  c.dataset.data_dir = ''          # arrayrecord: prepared dir; tfds: data_dir (optional)
  c.dataset.tfds_name = ''
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  # Facts about the data: 0 = read from the data (a prepared dir's metadata.json, tfds info,
  # the bundled digits) by `training.resolve` before anything is derived from them; a value
  # set here must agree with the data (synthetic data: set them, nothing to read).
  c.dataset.num_classes = 0        # classes trained on (len(classes) when `classes` is set)
  c.dataset.image_size = 0         # stored image side (synthetic: side of generated images)
  c.dataset.channels = 0           # channels the images are decoded to
  c.dataset.train_examples = 0     # examples in train_split (what train.epochs counts)
  c.dataset.classes = ()           # keep only these class ids (relabelled 0..n-1); () = all
  c.dataset.ood_classes = ()       # class ids held out of training, for OOD evaluation
  c.dataset.ood_fraction = 0.0     # > 0: hold out this seeded fraction of the classes (sets
  c.dataset.ood_seed = 0           #   classes / ood_classes once num_classes is known)
  c.dataset.num_examples = 0       # synthetic: examples per split
  c.dataset.label_noise = 0.0      # fraction of training labels flipped (seeded)
  c.dataset.label_noise_kind = 'symmetric'   # symmetric | class_dependent | input_dependent
  c.dataset.label_noise_reference = ''  # input_dependent: .npy [N, K] of a reference model's
                                        # probabilities (evaluation.reference_probs); '' = content rule
  c.dataset.setup_hint = ''        # how to get this dataset, shown when it is missing
  c.dataset.multi_label = False    # each image carries a set of labels (JFT, mosaic)
  c.dataset.max_labels = 0         # multi_label: labels per image at most (padding length L)

  c.input = ConfigDict()
  c.input.batch_size = 128         # global batch, across all processes
  c.input.eval_batch_size = 256
  c.input.train_augment = 'none'   # none | flip | cifar | inception
  c.input.eval_preprocess = 'none' # none | resize | center_crop
  c.input.image_size = 0           # 0: keep the stored size
  c.input.mean = ()                # per channel, in [0, 1]; () = the data's (metadata.json
  c.input.std = ()                 #   pixel_stats of the train split), else 0.5
  c.input.num_workers = 0          # grain mp_prefetch workers per process; 0 = in-process
  c.input.shuffle = True
  # Training reader (input_pipeline.pipeline.choose_reader; the log says which and why):
  # 'global' = an exact global shuffle, every process reading every shard (small data);
  # 'sharded' = each process reads only its own shards, interleaved and window-shuffled
  # (memory and start-up O(shards)); 'auto' = sharded above `sharded_above` train records.
  c.input.reader = 'auto'          # auto | global | sharded
  c.input.sharded_above = 1_000_000
  c.input.shard_streams = 0        # sharded: streams per process; 0 = max(1, num_workers) (a
                                   #   resume keeps the saved count; workers must divide it)
  c.input.shards_interleaved = 16  # sharded: shards each stream reads at once
  c.input.shuffle_window = 1024    # sharded: examples (raw records) each stream shuffles within

  c.model = ConfigDict()
  c.model.backbone = 'convnet'
  c.model.backbone_kwargs = ConfigDict()
  c.model.head = 'softmax'
  c.model.head_kwargs = ConfigDict()
  c.model.dtype = 'float32'        # computation dtype of the backbone
  # Heads that pad their class dimension (`heads.base.Head.pads_classes`) pad K up to a
  # multiple of this, so an odd K splits over the 'model' mesh axis; padded classes are masked
  # out of every probability, loss and prediction. 0 = auto: 128 x the 'model' axis when it is
  # > 1 (each device's share a multiple of the TPU's 128 lanes), else no padding.
  c.model.class_multiple = 0

  c.optimizer = ConfigDict()
  c.optimizer.name = 'adam'        # adam | adamw | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.lr_batch_size = 0    # > 0: learning_rate is per this many images, scaled
                                   #   linearly to input.batch_size
  c.optimizer.schedule = 'cosine'  # cosine | linear | constant (all after a linear warmup)
  c.optimizer.end_learning_rate = 0.0  # schedule='linear': the rate at the last step
  c.optimizer.warmup_steps = 0     # warmup_steps / warmup_epochs: the smaller of those > 0
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0   # decoupled for adamw, coupled (L2 in grads) otherwise
  c.optimizer.grad_clip_norm = 0.0
  # Per-parameter rules on paths like 'backbone/conv1/kernel' (re.fullmatch, first match wins;
  # a rule matching nothing is an error), see training/optimizer.py:
  c.optimizer.frozen = ()          # regexes: never updated, no optimizer state
  c.optimizer.lr_mults = ()        # ((regex, m), ...): update (decay included) times m; 0 freezes
  c.optimizer.wd_mults = ()        # ((regex, m), ...): weight decay times m
  c.optimizer.decay_all = False    # unmatched params: False = all but bias, norm scale and
                                   # temperature decay; True = all decay (uncertainty-baselines JFT)

  c.train = ConfigDict()
  # Steps or epochs: a step count > 0 wins; 0 takes `*epochs` x (train_examples / batch_size).
  c.train.num_steps = 1000
  c.train.epochs = 0.0
  c.train.log_every = 50
  c.train.eval_every = 0           # 0 (and eval_every_epochs 0): evaluate only at the end
  c.train.eval_every_epochs = 0.0
  c.train.checkpoint_every = 500   # 0 (and checkpoint_every_epochs 0): at the end only
  c.train.checkpoint_every_epochs = 0.0
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.init_from = ''           # workdir whose latest checkpoint, or a big_vision ViT / BiT
                                   # .npz (backbones/pretrained.py), initialises ...
  c.train.init_prefixes = ('backbone',)  # ... these parameter subtrees of a fresh run

  c.eval = ConfigDict()
  c.eval.num_bins = 15             # ECE bins
  c.eval.map_bins = 512            # mAP: per-class histogram bins, uniform in logit(p); with
  c.eval.map_top_k = 64            # the top-k scores of each class kept exactly, mAP agrees with
                                   # scikit-learn's to the 'map_error_bound' it reports
                                   # (evaluation.evaluator.MAP_DOC); memory K x (8 bins + 5 k) B
  c.eval.max_examples = 0          # 0: the whole eval split

  c.mesh = ConfigDict()
  c.mesh.axes = ('data', 'model')  # the batch splits over all; head classes over 'model'
  c.mesh.shape = (-1, 1)           # -1: all remaining devices (per slice with dcn_shape)
  c.mesh.dcn_shape = ()            # multi-slice: slices per axis, e.g. (2, 1, 1) with axes
                                   #   ('replica', 'data', 'model'): JAX's hybrid mesh (HSDP)

  # Parameter sharding (training/sharding.py): ((regex, tactic), ...) on parameter paths such
  # as 'backbone/blocks/MlpBlock_0/Dense_0/kernel' (re.fullmatch, first match wins, unmatched
  # replicated); tactics 'replicate', 'fsdp(axes=("data",), min_size_mb=4)' (FSDP: split
  # the largest dimension it divides; default axes: all but 'replica'), 'shard_dim(dim=0,
  # axes=("data",))'. Head class dimensions are on 'model' whatever the tactic; optimizer
  # moments follow their parameters.
  c.sharding = ConfigDict()
  c.sharding.rules = (('.*', 'replicate'),)
  return c
