"""A small ResNet-style CNN with batch norm (He et al., 2016), as a stack of named layers to cut.

The stack: `stem` (conv 3x3, batch norm, ReLU), one residual block per entry of `channels`
(`block_0`, `block_1`, ...; every block after the first halves the height and width), `pool`
(global average pooling to (B, channels)), `output` (dense). Each layer is a cut point, so the
smashed data shrinks from a full-resolution feature map after `stem` to a vector after `pool`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sljax.models.layers import _ConvBlock, _expect_rank, _Output
from sljax.split import InputShapeError, Stage, describe, function_stage, linen_stage

_IMAGE = ("height", "width", "channels")


class _ResidualBlock(nn.Module):
  """conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN, plus the input (through a 1x1 conv and BN where
  the shape changes), then ReLU; on (B, H, W, C) images."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    _expect_rank(x, _IMAGE)
    strides = (self.stride, self.stride)
    y = nn.Conv(self.features, (3, 3), strides=strides, padding="SAME", use_bias=False)(x)
    y = nn.BatchNorm(use_running_average=not train)(y)
    y = jax.nn.relu(y)
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides=strides, use_bias=False, name="shortcut_conv")(x)
      x = nn.BatchNorm(use_running_average=not train, name="shortcut_bn")(x)
    return jax.nn.relu(x + y)


def global_average_pool(x: jax.Array) -> jax.Array:
  """The mean over every axis but the batch and the channels: (B, ..., C) -> (B, C)."""
  if x.ndim < 3:
    raise InputShapeError("(B, ..., channels) with at least one spatial axis", describe(x))
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def resnet(*, channels: Sequence[int] = (16, 32, 64), num_classes: int = 10) -> list[Stage]:
  """A small ResNet-style CNN with batch norm for (B, H, W, C) images, one residual block per stage.

  Layers: `stem` (conv 3x3 with `channels[0]` filters, BN, ReLU), `block_0` ... `block_{n-1}`
  (a residual block with `channels[i]` filters; blocks after the first have stride 2), `pool`
  (global average pooling, no params), `output` (dense to `num_classes`). With the defaults on
  8x8 digits the feature maps are 8x8x16 (stem, block_0), 4x4x32, 2x2x64, then 64 after the pool.

  Batch statistics are model state (`PartyState.model_state`), updated in training steps.

  Args:
    channels: the filters of each residual block, one block per entry; `channels[0]` also the stem's.
    num_classes: the outputs of the last layer (logits).

  Returns:
    The layers, a list of named `Stage`s: cut it with `sljax.cut`.

  Raises:
    ValueError: `channels` is empty or holds a non-positive entry.

  Example:
    >>> import sljax
    >>> layers = sljax.models.resnet(channels=(8, 16))
    >>> [name for _, name in sljax.models.cut_points(layers)]
    ['stem', 'block_0', 'block_1', 'pool']
    >>> sljax.cut(layers, 2).server.layer_names
    ('block_1', 'pool', 'output')
  """
  channels = tuple(channels)
  if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
    raise ValueError(f"channels: expected a non-empty sequence of positive ints, got {channels}")
  blocks = [linen_stage(_ResidualBlock(c, 1 if i == 0 else 2), name=f"block_{i}") for i, c in enumerate(channels)]
  return ([linen_stage(_ConvBlock(channels[0], (3, 3), batch_norm=True), name="stem")] + blocks
          + [function_stage(global_average_pool, name="pool"), linen_stage(_Output(num_classes), name="output")])
