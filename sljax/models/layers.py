"""Layer stacks for the demo, the tests and the benchmarks (Flax Linen blocks)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from sljax.split import Stage, flatten, function_stage, linen_stage, sequential


class _DenseBlock(nn.Module):
  """Dense -> [BatchNorm] -> ReLU -> [Dropout]."""

  features: int
  dropout: float = 0.0
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.features)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = jax.nn.relu(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


class _ConvBlock(nn.Module):
  """Conv -> [BatchNorm] -> ReLU -> [max-pool 2] (2-D for images, 1-D for signals)."""

  features: int
  kernel: tuple[int, ...] = (3, 3)
  pool: bool = False
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, self.kernel, padding="SAME")(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = jax.nn.relu(x)
    if self.pool:
      window = (2,) * len(self.kernel)
      x = nn.max_pool(x, window, strides=window)
    return x


def mlp(*, hidden: Sequence[int] = (128, 128), num_classes: int = 10, dropout: float = 0.0,
        batch_norm: bool = False) -> list[Stage]:
  """An MLP as a stack: one layer per hidden block, then the output layer.

  `cut(mlp(hidden=(128, 128)), 1)` is the digits model of the benchmarks: client 64->128 ReLU,
  server 128->128 ReLU->10.
  """
  blocks = [linen_stage(_DenseBlock(h, dropout, batch_norm)) for h in hidden]
  return blocks + [linen_stage(nn.Dense(num_classes))]


def cnn(*, channels: Sequence[int] = (16, 32), hidden: int = 64, num_classes: int = 10,
        dropout: float = 0.0, batch_norm: bool = False) -> list[Stage]:
  """A small 2-D CNN for (H, W, C) images: conv blocks (the last one pools), dense, output.

  For 8x8 digits with the defaults: conv 16, conv 32 + pool -> 4x4x32, dense 64, dense 10.
  """
  convs = [linen_stage(_ConvBlock(c, (3, 3), pool=i == len(channels) - 1, batch_norm=batch_norm))
           for i, c in enumerate(channels)]
  return convs + [sequential(function_stage(flatten), linen_stage(_DenseBlock(hidden, dropout, batch_norm))),
                  linen_stage(nn.Dense(num_classes))]


def cnn1d(*, channels: Sequence[int] = (32, 32), hidden: int = 64, num_classes: int = 10,
          kernel: int = 5) -> list[Stage]:
  """A small 1-D CNN for (L, C) signals such as MNIST-1D: conv blocks with pooling, dense, output."""
  convs = [linen_stage(_ConvBlock(c, (kernel,), pool=True)) for c in channels]
  return convs + [sequential(function_stage(flatten), linen_stage(_DenseBlock(hidden))),
                  linen_stage(nn.Dense(num_classes))]

