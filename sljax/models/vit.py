"""A small Vision Transformer (Dosovitskiy et al., 2021), as a stack of named layers to cut.

The stack: `embed` (non-overlapping patches, a linear projection, a class token and learned
position embeddings), pre-norm encoder blocks `block_0`, `block_1`, ... (multi-head
self-attention and an MLP, each in a residual branch), `pool` (layer norm, then the class token,
or the mean over the tokens), `output` (dense). Cut inside the encoder, the smashed data is the
whole token sequence, (B, tokens, dim); cut after `pool`, one vector per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sljax.models.layers import _expect_rank, _Output
from sljax.split import InputShapeError, Stage, describe, linen_stage

_IMAGE = ("height", "width", "channels")
_TOKENS = ("tokens", "dim")
_POOLS = ("cls", "mean")


class _PatchEmbed(nn.Module):
  """(B, H, W, C) images -> (B, tokens, dim): patches, projection, [class token], positions."""

  patch: int
  dim: int
  class_token: bool

  @nn.compact
  def __call__(self, x):
    _expect_rank(x, _IMAGE)
    if x.shape[1] % self.patch or x.shape[2] % self.patch:
      raise InputShapeError(f"(B, height, width, channels) with height and width multiples of the patch size "
                            f"{self.patch}", describe(x))
    p = (self.patch, self.patch)
    x = nn.Conv(self.dim, p, strides=p, padding="VALID", name="projection")(x)
    b, h, w, d = x.shape
    x = jnp.reshape(x, (b, h * w, d))
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    positions = self.param("positions", nn.initializers.normal(0.02), (1, x.shape[1], d), x.dtype)
    return x + positions


class _EncoderBlock(nn.Module):
  """Pre-norm transformer encoder block on (B, tokens, dim): x + MHSA(LN(x)), then x + MLP(LN(x))."""

  heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    _expect_rank(x, _TOKENS)
    if x.shape[-1] % self.heads:
      raise InputShapeError(f"(B, tokens, dim) with dim a multiple of heads={self.heads}", describe(x))
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True)(y)
    if self.dropout:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim)(y)
    y = jax.nn.gelu(y)
    y = nn.Dense(x.shape[-1])(y)
    if self.dropout:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return x + y


class _Pool(nn.Module):
  """(B, tokens, dim) -> (B, dim): layer norm, then the class token (the first) or the mean over tokens."""

  pool: str

  @nn.compact
  def __call__(self, x):
    _expect_rank(x, _TOKENS)
    x = nn.LayerNorm()(x)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)


def vit(*, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, num_classes: int = 10,
        pool: str = "cls", dropout: float = 0.0) -> list[Stage]:
  """A small Vision Transformer for (B, H, W, C) images, H and W multiples of `patch`.

  Layers: `embed` (patch projection to `dim`, a class token when `pool="cls"`, learned position
  embeddings), `block_0` ... `block_{depth-1}` (pre-norm encoder blocks with `heads` heads and an
  MLP of width `mlp_dim`; `dropout` on both residual branches in training), `pool` (layer norm,
  then the class token or, with `pool="mean"`, the mean over the tokens), `output` (dense).
  On 8x8 digits with `patch=4` the sequence is 4 patches (+1 class token).

  Args:
    patch: the side of the square patches.
    dim: the width of the tokens; `heads` divides it.
    depth: the number of encoder blocks, at least 1.
    heads: the attention heads of each block.
    mlp_dim: the hidden width of each block's MLP.
    num_classes: the outputs of the last layer (logits).
    pool: "cls" (a class token) or "mean" (the mean over the tokens).
    dropout: the dropout rate on the residual branches, in training; 0 for none.

  Returns:
    The layers, a list of named `Stage`s: cut it with `sljax.cut`.

  Raises:
    ValueError: an unknown `pool`, `depth` below 1, or `heads` that does not divide `dim`.

  Example:
    >>> import sljax
    >>> layers = sljax.models.vit(dim=16, depth=2, heads=2, mlp_dim=32)
    >>> [name for _, name in sljax.models.cut_points(layers)]
    ['embed', 'block_0', 'block_1', 'pool']
  """
  if pool not in _POOLS:
    raise ValueError(f"pool: expected one of {_POOLS}, got {pool!r}")
  if depth < 1:
    raise ValueError(f"depth: expected at least 1 encoder block, got {depth}")
  if dim % heads:
    raise ValueError(f"heads: expected a divisor of dim={dim}, got {heads}")
  blocks = [linen_stage(_EncoderBlock(heads, mlp_dim, dropout), name=f"block_{i}") for i in range(depth)]
  return ([linen_stage(_PatchEmbed(patch, dim, pool == "cls"), name="embed")] + blocks
          + [linen_stage(_Pool(pool), name="pool"), linen_stage(_Output(num_classes), name="output")])
