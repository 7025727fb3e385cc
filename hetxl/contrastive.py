"""Contrastive image-text training, deterministic (CLIP / LiT) and HET-XL, and zero-shot logits.

Collier et al. (ICLR 2023) apply HET-XL to contrastive learning: in a batch of B
image-text pairs the B text embeddings play the role of HET-XL's class weights W (a "3.5
billion class" problem at web scale), the noise lives in the image representation space, a
temperature is learnt, and zero-shot classification uses deterministic embeddings. No public
code implements it; this module is built from that description and the HET-XL math
(`hetxl.heads`), and every choice the paper leaves open is a field of `ContrastiveHead`.

Model (the head sits on an image backbone's features phi(x) [B, D], `training.model`):
  image embedding   z_i = Dense(phi(x_i)) in R^E (`image_projection`), zhat = z / ||z||
  text embedding    t_j = text_tower(caption_j) / ||.||   (`backbones.text`)
  DET logits        l_ij = s * zhat_i . t_j + b
  HET-XL logits     l^s_ij = s * n(z_i + V(z_i) eps_R,s + d(z_i) * eps_E,s) . t_j + b,
                    n(v) = v / ||v||, s = 1..S; V, d the HET-XL noise layers (full or
                    parameter-efficient, `hetxl.heads.noise_layers`) on the unnormalised z
  softmax loss      L_i = -1/2 [ log mean_s softmax_j(l^s_i.)_i + log mean_s softmax_k(l^s_.i)_i ]
                    (image->text row and text->image column; S = 1, no noise: CLIP's loss)
  sigmoid loss      L_i = -sum_j log mean_s sigmoid(y_ij l^s_ij), y = +1 on the diagonal, -1 off
                    it (SigLIP, Zhai et al. 2023, whose 1/B normalisation is the trainer's mean)
  Each mean over s is a logsumexp minus log S (`hetxl.mc.mc_log_mean_exp`, chunked over s).
  Padding examples (mask 0) are neither anchors nor negatives; their loss is 0. The arrays are
  global (the batch is sharded over 'data' and jit inserts the all-gathers), so the similarity
  matrix spans the whole global batch, as big_vision's contrastive loss does after its
  all_gather.

Choices the paper does not pin down (fields; defaults and why):
  * noise on the image tower only (`noise='hetxl'`), from the unnormalised image embedding z:
    the paper's "noise in the image representation space"; z plays HET-XL's pre-logits phi.
  * `loss='softmax'` (CLIP/LiT), the loss of the paper's contrastive experiments; 'sigmoid'
    (SigLIP) is offered, with `bias_init=-10` as SigLIP starts.
  * one learnt temperature, never two: `temperature='inverse'` is big_vision's two-tower
    form s = exp(t), t learnt from log(`inverse_temperature_init`=10, big_vision's
    temperature_init), s capped at `max_inverse_temperature`=100 (CLIP's clip);
    `temperature='bounded'` is HET-XL's tau = lower + (upper - lower) sigmoid(p) with s = 1/tau,
    default bounds (0.01, 0.19): tau starts at 0.1 (s = 10, the same start as 'inverse') and s
    stays <= 100 as CLIP's. The HET-XL configs use 'bounded' (the paper's HET-XL temperature),
    the deterministic ones 'inverse' (the CLIP/LiT baseline); only their parametrisation differs.
  * `learn_bias=False` for softmax (a constant shift cancels in both softmaxes), True for
    sigmoid, as big_vision.
  * zero-shot and eval logits use deterministic image embeddings (the paper's test-time rule);
    the MC estimate is used only in the training loss.

Texts (`captions_from`): on a dataset without texts the text of image i is template t_i of
its class name, t_i drawn uniformly per example and step from the 'captions' rng
(`input_pipeline.captions`); `captions` [K, T, ...] holds the text-tower inputs of all K x T
captions. On a captioned dataset (each image has its own text, `input_pipeline.records`
format 3) the text of image i is its own: the batch carries it (`text_input`: byte tokens
[B, L] or the locked encoder's embeddings [B, E_text]) and the head is called with `text=`;
labels then play no part in the loss, so label sets (multi-label data, as every labels-file
dataset is) are accepted. Default 'auto': the dataset's own texts when it has them (it was
prepared with texts to be trained on them), else the templates (exactly the behaviour before
captioned datasets existed); 'dataset' insists (a clear error on data without texts),
'templates' ignores a dataset's texts. Class embeddings for zero-shot are the
templates' normalised text embeddings averaged and renormalised (CLIP's prompt ensembling);
`logits` [B, K] = s * zhat . c_k + b, so softmax(logits) is the zero-shot class probability.
In training the class embeddings use the first template only (a metric: the K x T text
forward pass every step would cost more than a small image tower), without gradient.
"""
import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from backbones.text import build_text_tower
from heads.base import METRICS, Head, HeadOutput
from heads.temperature import BoundedTemperature
from hetxl import mc
from hetxl.heads import RNG_DIAG, RNG_R, low_rank_noise, noise_layers

RNG_CAPTIONS = 'captions'   # the template of each training caption
_MASKED = -1e9      # logit of a padding example: exp() underflows to 0 in every softmax


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def class_embeddings(embed_texts: Callable[[jax.Array], jax.Array], table: jax.Array) -> jax.Array:
  """Zero-shot class embeddings [K, E] of a caption table [K, T, ...] (CLIP's prompt
  ensembling): each caption's normalised text embedding, averaged over the T templates,
  renormalised. `embed_texts` maps text-tower inputs [N, ...] to embeddings [N, E]."""
  k, t = table.shape[:2]
  emb = l2_normalize(embed_texts(table.reshape(k * t, *table.shape[2:]))).reshape(k, t, -1)
  return l2_normalize(emb.mean(axis=1))


def contrastive_loss(sample_fn: Callable[[jax.Array], jax.Array], num_samples: int,
                     mask: jax.Array, *, loss: str = 'softmax',
                     chunk_size: Optional[int] = None) -> jax.Array:
  """Per-example in-batch contrastive loss [B] (0 for padding), MC-averaged over samples.

  sample_fn(idx [C]) -> logits [B, C, B]: entry (i, c, j) is the logit of image i (in its
  sample idx[c]) with text j; pair (i, i) is the positive. mask [B]: 1 for real examples.
  loss 'softmax': the mean of the image->text and text->image cross-entropies of example i,
  each of the MC-mean softmax probability; 'sigmoid': sum over texts j of -log of the MC-mean
  sigmoid(+-l_ij). See the module docstring for the formulas.
  """
  valid = mask > 0
  batch = mask.shape[0]
  if loss == 'softmax':
    def log_fn(u):
      i2t = jax.nn.log_softmax(jnp.where(valid[None, None, :], u, _MASKED), axis=-1)
      t2i = jax.nn.log_softmax(jnp.where(valid[:, None, None], u, _MASKED), axis=0)
      return i2t, t2i
    i2t, t2i = mc.mc_log_mean_exp(sample_fn, log_fn, num_samples, chunk_size)
    per_example = -0.5 * (jnp.diagonal(i2t) + jnp.diagonal(t2i))
  elif loss == 'sigmoid':
    sign = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    log_fn = lambda u: (jax.nn.log_sigmoid(sign[:, None, :] * u),)
    (log_p,) = mc.mc_log_mean_exp(sample_fn, log_fn, num_samples, chunk_size)
    per_example = -jnp.sum(jnp.where(valid[None, :], log_p, 0.0), axis=-1)
  else:
    raise ValueError(f"contrastive loss must be 'softmax' or 'sigmoid', got {loss!r}")
  return jnp.where(valid, per_example, 0.0)


class ContrastiveHead(Head):
  """Two-tower head: image projection + text tower + (HET-XL) contrastive loss.

  Called as every head, `head(features [B, D], labels [B] or None, *, train, mask=None,
  text=None)` -> `HeadOutput(logits [B, K] zero-shot class logits, loss [B] or None)`.
  `labels` pick each image's caption class, unless the head reads each image's own text
  (`text_input` set): then `text` [B, *text_input.shape] holds those texts (required when
  `labels` are given) and labels may be sets [B, L]. `mask` [B] (padding = 0) keeps padding
  out of the in-batch loss (`in_batch_loss`: `training.model.Classifier` passes it). Build
  with `from_dataset`, which makes the caption table of the configured classes and resolves
  `captions_from`. Sows 'temperature' or 'inverse_temperature' into 'head_metrics'.
  """
  num_classes: int
  captions: Any                           # [K, T, L] int32 tokens or [K, T, E_text] float32
  embed_dim: int = 128
  text_tower: str = 'transformer'
  text_kwargs: Any = None                 # backbones.text.build_text_tower kwargs
  noise: str = 'none'                     # 'none' (DET) | 'hetxl'
  num_factors: int = 8
  parameter_efficient: bool = False
  train_mc_samples: int = 16
  mc_chunk_size: Optional[int] = None
  loss: str = 'softmax'                   # 'softmax' | 'sigmoid'
  temperature: str = 'inverse'            # 'inverse' | 'bounded'
  inverse_temperature_init: float = 10.0
  max_inverse_temperature: float = 100.0
  temperature_bounds: Tuple[float, float] = (0.01, 0.19)
  learn_bias: Optional[bool] = None       # None: True for sigmoid, False for softmax
  bias_init: float = 0.0
  # How `from_dataset` built `captions` (kept for the record; not read after that):
  templates: Optional[Tuple[str, ...]] = None    # None: input_pipeline.captions.TEMPLATES
  context_length: int = 32                       # byte tokens per caption ('transformer')
  text_embeddings: str = ''                      # 'locked': file; '' = <data_dir>/text_embeddings.npz
  # Each training image's text: 'auto' | 'dataset' | 'templates' (module docstring);
  # `from_dataset` resolves 'auto' and sets `text_input` when the texts are the dataset's own.
  captions_from: str = 'auto'
  text_input: Any = None                         # input_pipeline.captions.TextInput or None

  link = 'softmax'      # softmax(logits) is the zero-shot class probability, whatever `loss`
  rng_streams = (RNG_DIAG, RNG_R, RNG_CAPTIONS)
  sows = {METRICS: ('temperature', 'inverse_temperature')}
  in_batch_loss = True

  @property
  def label_sets_unsupported(self) -> Optional[str]:
    if self.text_input is not None:
      return None       # each image's own text: labels are not in the loss
    return ('its captions are built from one class name per image (a label set has no single '
            "caption); a captioned dataset's own texts have none of this limit.")

  @classmethod
  def from_dataset(cls, dataset: ml_collections.ConfigDict, num_classes: int,
                   **kwargs) -> 'ContrastiveHead':
    """The head with the caption table of `dataset`'s classes (names from its metadata) and,
    when training reads each image's own text (`captions_from`), its `text_input`. Raises
    ValueError when `captions_from='dataset'` and the dataset has no texts."""
    from input_pipeline import captions
    get = lambda name: kwargs.get(name, getattr(cls, name))
    templates = tuple(get('templates') or captions.TEMPLATES)
    table = captions.caption_table(
        captions.dataset_class_names(dataset), get('text_tower'), templates,
        get('context_length'),
        get('text_embeddings') or captions.embeddings_path(dataset.data_dir))
    source = get('captions_from')
    if source not in ('auto', 'dataset', 'templates'):
      raise ValueError(f"model.head_kwargs.captions_from must be 'auto', 'dataset' or "
                       f"'templates', got {source!r}")
    has_text = captions.dataset_has_text(dataset)
    if source == 'dataset' and not has_text:
      raise ValueError(
          "model.head_kwargs.captions_from='dataset' trains on each image's own text, but "
          f'{dataset.name} dataset {dataset.data_dir or dataset.name!r} has none. Prepare a '
          'captioned dataset from a labels file with a text column (launch.prepare_data '
          '--source=folder --labels_file=FILE.csv with the header path,labels,text), or set '
          "captions_from='templates' (or 'auto') to caption images by their class names.")
    source = 'dataset' if source == 'dataset' or (source == 'auto' and has_text) else 'templates'
    text_input = (captions.text_input(dataset, get('text_tower'), get('context_length'))
                  if source == 'dataset' else None)
    if text_input is not None and text_input.kind == 'embeddings' and (
        text_input.dim != table.shape[-1]):
      raise ValueError(
          f"{text_input.embeddings_file} holds {text_input.dim}-dim embeddings of the images' "
          f'texts but the class prompts\' embeddings are {table.shape[-1]}-dim: write both with '
          'the same encoder (re-run python -m launch.prepare_text on the dataset).')
    return cls(num_classes=num_classes, captions=table,
               **{**kwargs, 'templates': templates, 'captions_from': source,
                  'text_input': text_input})

  def _check(self):
    if self.noise not in ('none', 'hetxl'):
      raise ValueError(f"noise must be 'none' or 'hetxl', got {self.noise!r}")
    if self.temperature not in ('inverse', 'bounded'):
      raise ValueError(f"temperature must be 'inverse' or 'bounded', got {self.temperature!r}")
    if self.train_mc_samples < 1:
      raise ValueError(f'train_mc_samples must be >= 1, got {self.train_mc_samples}')
    if np.shape(self.captions)[0] != self.num_classes:
      raise ValueError(f'the caption table has {np.shape(self.captions)[0]} classes, the '
                       f'dataset {self.num_classes}')

  def _scale_and_bias(self) -> Tuple[jax.Array, jax.Array]:
    if self.temperature == 'bounded':
      scale = 1.0 / BoundedTemperature(self.temperature_bounds, name='temperature')()
    else:
      t = self.param('log_inverse_temperature', nn.initializers.constant(
          math.log(self.inverse_temperature_init)), (), jnp.float32)
      scale = jnp.minimum(jnp.exp(t), self.max_inverse_temperature)
      self.sow(METRICS, 'inverse_temperature', scale)
    learn_bias = self.loss == 'sigmoid' if self.learn_bias is None else self.learn_bias
    bias = (self.param('bias', nn.initializers.constant(self.bias_init), (), jnp.float32)
            if learn_bias else jnp.float32(self.bias_init))
    return scale, bias

  @nn.compact
  def __call__(self, features: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False, mask: Optional[jax.Array] = None,
               text: Optional[jax.Array] = None) -> HeadOutput:
    self._check()
    batch = features.shape[0]
    z = nn.Dense(self.embed_dim, name='image_projection')(features.astype(jnp.float32))
    noise_scales = (noise_layers(self.embed_dim, self.embed_dim, self.num_factors,
                                 self.parameter_efficient) if self.noise == 'hetxl' else None)
    scale, bias = self._scale_and_bias()
    zhat = l2_normalize(z)
    table = jnp.asarray(self.captions)
    text_tower = build_text_tower(self.text_tower, self.embed_dim, name='text',
                                  **dict(self.text_kwargs or {}))

    if train and labels is not None:
      classes = jax.lax.stop_gradient(class_embeddings(text_tower, table[:, :1]))
    else:
      classes = class_embeddings(text_tower, table)
    logits = scale * zhat @ classes.T + bias
    if labels is None:
      if noise_scales is not None:
        noise_scales(z, jnp.float32)   # creates the noise parameters at init
      return HeadOutput(logits, None)

    texts = l2_normalize(text_tower(self._batch_texts(table, labels, text)))      # [B, E]
    mask = jnp.ones((batch,), jnp.float32) if mask is None else mask

    if noise_scales is None:
      pair = scale * zhat @ texts.T + bias
      sample_fn, num_samples = (lambda idx: pair[:, None, :]), 1
    else:
      sample_fn, num_samples = self._hetxl_samples(z, noise_scales(z, jnp.float32), texts,
                                                   scale, bias, train)
    loss = contrastive_loss(sample_fn, num_samples, mask, loss=self.loss,
                            chunk_size=self.mc_chunk_size)
    return HeadOutput(logits, loss)

  def _batch_texts(self, table: jax.Array, labels: jax.Array,
                   text: Optional[jax.Array]) -> jax.Array:
    """The text-tower inputs [B, ...] of this batch's texts: each image's own (`text`), or
    template t_i of class labels[i], t_i uniform per example."""
    if self.text_input is not None:
      if text is None:
        raise ValueError("ContrastiveHead reads each image's own text (text_input is set): "
                         "call it with text= [B, ...], the batch's 'text'")
      return text
    batch = labels.shape[0]
    if self.has_rng(RNG_CAPTIONS):
      t = jax.random.randint(self.make_rng(RNG_CAPTIONS), (batch,), 0, table.shape[1])
    else:
      t = jnp.zeros((batch,), jnp.int32)
    return table[labels, t]

  def _hetxl_samples(self, z, scales, texts, scale, bias, train):
    """sample_fn(idx) -> [B, C, B] logits of the noisy image embeddings n(z + eps_s)."""
    batch, dim, R = z.shape[0], z.shape[1], self.num_factors
    num_samples = self.train_mc_samples
    key_diag = self.noise_key(RNG_DIAG, train)
    eps_r = (mc.normal_upfront(self.noise_key(RNG_R, train), batch, num_samples, R, False)
             if R else None)

    def sample_fn(idx):
      eps = scales.d[:, None, :] * mc.normal_per_sample(key_diag, idx, batch, dim, False)
      if R:
        eps = eps + low_rank_noise(scales, mc.take_samples(eps_r, idx), jnp.float32)
      noisy = l2_normalize(z[:, None, :] + eps)                                    # [B, C, E]
      return scale * jnp.einsum('bce,ne->bcn', noisy, texts) + bias
    return sample_fn, num_samples
