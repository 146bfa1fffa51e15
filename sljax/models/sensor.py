"""A small 1-D sensor model: a depthwise-separable CNN (DS-CNN) for (B, L, C) signals.

Shaped like the keyword-spotting DS-CNN of "Hello Edge" (Zhang et al., 2017) and the 1-D CNNs of
human activity recognition: a convolution stem, then blocks of a depthwise convolution (one
filter per channel) and a pointwise 1x1 convolution, each with batch norm and ReLU, then global
average pooling and a dense output. Depthwise-separable blocks keep the parameters and FLOPs
small enough for a microcontroller to hold the first layers. Fits MNIST-1D, (B, 40, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from sljax.models.layers import _ConvBlock, _expect_rank, _Output
from sljax.models.resnet import global_average_pool
from sljax.split import Stage, function_stage, linen_stage

_SIGNAL = ("length", "channels")


class _SeparableBlock(nn.Module):
  """Depthwise conv (stride `stride`) -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU, on (B, L, C)."""

  features: int
  kernel: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    _expect_rank(x, _SIGNAL)
    c = x.shape[-1]
    x = nn.Conv(c, (self.kernel,), strides=(self.stride,), padding="SAME", feature_group_count=c, use_bias=False,
                name="depthwise")(x)
    x = jax.nn.relu(nn.BatchNorm(use_running_average=not train, name="depthwise_bn")(x))
    x = nn.Conv(self.features, (1,), use_bias=False, name="pointwise")(x)
    return jax.nn.relu(nn.BatchNorm(use_running_average=not train, name="pointwise_bn")(x))


def ds_cnn1d(*, stem: int = 16, channels: Sequence[int] = (32, 32, 32), strides: Sequence[int] = (2, 2, 1),
             kernel: int = 5, num_classes: int = 10) -> list[Stage]:
  """A depthwise-separable 1-D CNN for (B, L, C) sensor signals (keyword spotting, activity recognition).

  Layers: `stem` (conv of width `kernel` with `stem` filters, BN, ReLU), `ds_0` ... `ds_{n-1}`
  (depthwise conv with stride `strides[i]`, BN, ReLU, pointwise conv to `channels[i]`, BN, ReLU),
  `pool` (global average pooling over the length, no params), `output` (dense). On MNIST-1D
  (B, 40, 1) with the defaults the signal is 40x16 after the stem, then 20x32, 10x32, 10x32, 32.

  Args:
    stem: the filters of the stem's conv.
    channels: the pointwise filters of each depthwise-separable block, one block per entry.
    strides: the depthwise conv's stride of each block, one per entry of `channels`.
    kernel: the width of the stem's and the depthwise convs' kernels.
    num_classes: the outputs of the last layer (logits).

  Returns:
    The layers, a list of named `Stage`s: cut it with `sljax.cut`.

  Raises:
    ValueError: `strides` and `channels` differ in length.

  Example:
    >>> import sljax
    >>> layers = sljax.models.ds_cnn1d(stem=8, channels=(8, 8), strides=(2, 1))
    >>> [name for _, name in sljax.models.cut_points(layers)]
    ['stem', 'ds_0', 'ds_1', 'pool']
  """
  channels, strides = tuple(channels), tuple(strides)
  if len(strides) != len(channels):
    raise ValueError(f"strides: expected one stride per block of channels={channels}, got {strides}")
  blocks = [linen_stage(_SeparableBlock(c, kernel, s), name=f"ds_{i}")
            for i, (c, s) in enumerate(zip(channels, strides, strict=True))]
  return ([linen_stage(_ConvBlock(stem, (kernel,), batch_norm=True), name="stem")] + blocks
          + [function_stage(global_average_pool, name="pool"), linen_stage(_Output(num_classes), name="output")])
