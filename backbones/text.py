"""Text towers for image-text (contrastive) models: inputs [N, ...] -> embeddings [N, out_dim].

  * `TextTransformer`: a small CLIP-style transformer trained from scratch on byte-level token
    ids (`input_pipeline.captions.byte_tokenize`): token + learnt position embeddings, pre-LN
    blocks with a padding mask, final LayerNorm, mean over the non-padding tokens, Dense.
    (CLIP pools the EOS token of a causal transformer; mean pooling over a bidirectional one is
    our choice, as big_vision's text transformer offers with pool_type='gap'.)
  * `LockedText`: a frozen pretrained sentence encoder whose embeddings were computed once
    (`launch.prepare_text`); only a Dense projection to the shared space is learnt (or none,
    `project=False`, when the encoder's dimension is the shared one).
"""
import jax
import jax.numpy as jnp
from flax import linen as nn


class _Block(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(y)))
    return x + y


class TextTransformer(nn.Module):
  """tokens int32 [N, L] (0 = padding) -> float32 [N, out_dim]; an all-padding row gives the
  embedding of the final LayerNorm's bias."""
  out_dim: int
  vocab_size: int = 257
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 512

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    valid = tokens > 0
    x = nn.Embed(self.vocab_size, self.width, name='token_embedding')(tokens)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                     (tokens.shape[-1], self.width), jnp.float32)
    x = x + pos
    mask = nn.make_attention_mask(valid, valid)
    for i in range(self.depth):
      x = _Block(self.num_heads, self.mlp_dim, name=f'block{i}')(x, mask)
    x = nn.LayerNorm(name='final_norm')(x)
    w = valid.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return nn.Dense(self.out_dim, name='projection')(pooled)


class LockedText(nn.Module):
  """Precomputed sentence-encoder embeddings float32 [N, E_text] -> [N, out_dim]."""
  out_dim: int
  project: bool = True

  @nn.compact
  def __call__(self, embeddings: jax.Array) -> jax.Array:
    embeddings = jax.lax.stop_gradient(embeddings.astype(jnp.float32))
    if self.project:
      return nn.Dense(self.out_dim, name='projection')(embeddings)
    if embeddings.shape[-1] != self.out_dim:
      raise ValueError(f'LockedText(project=False) needs the encoder dimension '
                       f'{embeddings.shape[-1]} to equal embed_dim={self.out_dim}')
    return embeddings


def build_text_tower(kind: str, out_dim: int, **kwargs) -> nn.Module:
  """'transformer' (kwargs: width, depth, num_heads, mlp_dim) or 'locked' (kwargs: project)."""
  if kind == 'transformer':
    return TextTransformer(out_dim, **kwargs)
  if kind == 'locked':
    return LockedText(out_dim, **kwargs)
  raise ValueError(f"text_tower must be 'transformer' or 'locked', got {kind!r}")
