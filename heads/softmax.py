"""The deterministic (DET) head: one Dense layer, optionally with a learnt bounded temperature."""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from heads.base import METRICS, Head, HeadOutput, class_sharded, link_loss
from heads.temperature import BoundedTemperature


class SoftmaxHead(Head):
  """logits = (phi W + b) / tau. `tau` is 1, a fixed float, or learnt within `temperature_bounds`.

  W [D, padded_classes], b [padded_classes]: the class dimension is padded (`Head.pads_classes`)
  and the padded logits masked out."""
  num_classes: int
  link: str = 'softmax'
  pads_classes = True
  sows = {METRICS: ('temperature',)}     # with learn_temperature
  label_smoothing: float = 0.0
  temperature: float = 1.0
  learn_temperature: bool = False
  temperature_bounds: Tuple[float, float] = (0.3, 3.0)
  bias_init: float = 0.0
  kernel_init_zero: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *,
               train: bool = False) -> HeadOutput:
    kernel_init = (nn.initializers.zeros if self.kernel_init_zero
                   else nn.initializers.lecun_normal())
    logits = nn.Dense(
        self.padded_classes, dtype=self.dtype, name='loc_layer',
        kernel_init=class_sharded(kernel_init, num_classes=self.num_classes),
        bias_init=class_sharded(nn.initializers.constant(self.bias_init), ndim=1,
                                num_classes=self.num_classes),
    )(x).astype(jnp.float32)
    if self.learn_temperature:
      logits = logits / BoundedTemperature(self.temperature_bounds, name='temperature')()
    elif self.temperature != 1.0:
      logits = logits / self.temperature
    logits = self.mask_padded(logits)
    loss = None if labels is None else link_loss(self.link, logits, labels, self.label_smoothing,
                                                 self.num_classes)
    return HeadOutput(logits, loss)
