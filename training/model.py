"""Backbone + head = the classifier every experiment trains."""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from backbones.constraints import constrain_batch
from backbones.registry import build_backbone
from heads.base import Head, HeadOutput
from heads.registry import build_head

BACKBONE_RNG_STREAMS = ('dropout',)   # nn.Dropout (ViT); heads declare theirs (`heads.base.Head`)


class Classifier(nn.Module):
  """Normalises uint8 images on device, runs the backbone, then the head."""
  backbone: nn.Module
  head: nn.Module
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  # How the head reads the pre-logits (`training.mesh.feature_sharding`): None = as they come
  feature_sharding: Optional[jax.sharding.Sharding] = None

  def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Backbone features [B, D] of uint8 images."""
    x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return self.backbone(x, train=train)

  def __call__(self, images: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False, mask: Optional[jax.Array] = None,
               text: Optional[jax.Array] = None) -> HeadOutput:
    """`mask` [B] (1 = real example) goes to heads whose loss couples the examples of a
    batch (`in_batch_loss`, e.g. contrastive); per-example losses are masked by the trainer.
    `text` [B, ...] (the batch's 'text': each example's own text) goes to heads that read it
    (`Head.text_input`)."""
    extra = {'mask': mask} if self.head.in_batch_loss else {}
    if self.head.text_input is not None:
      extra['text'] = text
    x = self.features(images, train=train)
    x = constrain_batch(x, self.feature_sharding)
    return self.head(x, labels, train=train, **extra)


def build_model(config: ml_collections.ConfigDict, *, class_multiple: int = 1,
                feature_sharding: Optional[jax.sharding.Sharding] = None,
                batch_sharding: Optional[jax.sharding.Sharding] = None) -> Classifier:
  """The classifier the config names; a head that pads its classes (`Head.pads_classes`) pads
  them to a multiple of `class_multiple` (`training.experiment.class_multiple`); a backbone
  with an `activation_sharding` field keeps its activations' batch on `batch_sharding`."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  backbone = build_backbone(m.backbone, dtype=dtype, **m.backbone_kwargs.to_dict())
  if batch_sharding is not None and hasattr(backbone, 'activation_sharding'):
    backbone = backbone.clone(activation_sharding=batch_sharding)
  head = build_head(m.head, config.dataset.num_classes, dataset=config.dataset,
                    **m.head_kwargs.to_dict())
  if head.pads_classes and class_multiple > 1:
    head = head.clone(class_multiple=class_multiple)
  why_not = head.label_sets_unsupported
  if config.dataset.multi_label and why_not:
    raise ValueError(f'model.head={m.head!r} cannot train on multi-label data '
                     f'(dataset.multi_label=True): {why_not} Use a softmax/sigmoid, HET or '
                     'HET-XL head.')
  return Classifier(backbone, head, tuple(config.input.mean), tuple(config.input.std),
                    feature_sharding)


def rng_streams(head: Head) -> tuple[str, ...]:
  """Every rng stream a classifier with `head` draws (besides 'params'): the backbone's, then
  the head's own (`Head.rng_streams`)."""
  return BACKBONE_RNG_STREAMS + tuple(s for s in head.rng_streams
                                      if s not in BACKBONE_RNG_STREAMS)


def step_rngs(key: jax.Array, step: jax.Array, head: Head) -> dict:
  """{stream: key} for every stream of `rng_streams(head)`: stream i of step t gets
  fold_in(fold_in(key, t), i), so a resumed run draws the same noise."""
  key = jax.random.fold_in(key, step)
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_streams(head))}
