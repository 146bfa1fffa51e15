"""Layer stacks for the demo, the tests and the benchmarks (Flax Linen blocks).

Every layer is named (`hidden_0`, `conv_0`, `output`, ...) and checks the rank of its input, so a
model given inputs of the wrong rank fails at `init` with the shape it expects
(`sljax.split.InputShapeError`) instead of deep inside Flax or the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from flax import linen as nn

from sljax.split import InputShapeError, Stage, cut, describe, flatten, function_stage, linen_stage, sequential

_FEATURES = ("features",)


def _expect_rank(x, dims: tuple[str, ...]) -> None:
  """Raises InputShapeError unless `x` is a batch with one axis per name in `dims`."""
  if x.ndim != len(dims) + 1:
    raise InputShapeError(f"(B, {', '.join(dims)})", describe(x))


class _DenseBlock(nn.Module):
  """Dense -> [BatchNorm] -> ReLU -> [Dropout], on (B, features)."""

  features: int
  dropout: float = 0.0
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    _expect_rank(x, _FEATURES)
    x = nn.Dense(self.features)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = jax.nn.relu(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


class _Output(nn.Dense):
  """The output layer: a Dense on (B, features) (its params are a Dense's: kernel, bias)."""

  def __call__(self, inputs):
    _expect_rank(inputs, _FEATURES)
    return super().__call__(inputs)


class _ConvBlock(nn.Module):
  """Conv -> [BatchNorm] -> ReLU -> [max-pool 2] (2-D on (B, H, W, C) images, 1-D on (B, L, C) signals)."""

  features: int
  kernel: tuple[int, ...] = (3, 3)
  pool: bool = False
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    _expect_rank(x, ("height", "width", "channels") if len(self.kernel) == 2 else ("length", "channels"))
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
  """An MLP on (B, features) as a stack: one layer per hidden block, then the output layer.

  `cut(mlp(hidden=(128, 128)), 1)` is the digits model of the benchmarks: client 64->128 ReLU,
  server 128->128 ReLU->10. The layers are named `hidden_0`, `hidden_1`, ..., `output`.

  Args:
    hidden: the width of each hidden block (dense, then ReLU).
    num_classes: the outputs of the last layer (logits).
    dropout: the dropout rate after each hidden block's ReLU, in training; 0 for none.
    batch_norm: batch norm between each hidden block's dense layer and its ReLU (its statistics
      are model state).

  Returns:
    The layers, a list of named `Stage`s: cut it with `sljax.cut`.

  Example:
    >>> import sljax
    >>> model = sljax.cut(sljax.models.mlp(hidden=(128, 128)), 1)
    >>> model.client.layer_names, model.server.layer_names
    (('hidden_0',), ('hidden_1', 'output'))
  """
  blocks = [linen_stage(_DenseBlock(h, dropout, batch_norm), name=f"hidden_{i}") for i, h in enumerate(hidden)]
  return blocks + [linen_stage(_Output(num_classes), name="output")]


def cnn(*, channels: Sequence[int] = (16, 32), hidden: int = 64, num_classes: int = 10,
        dropout: float = 0.0, batch_norm: bool = False) -> list[Stage]:
  """A small 2-D CNN for (B, H, W, C) images: conv blocks (the last one pools), dense, output.

  For 8x8 digits with the defaults: conv 16, conv 32 + pool -> 4x4x32, dense 64, dense 10. The
  layers are named `conv_0`, `conv_1`, ..., `hidden` (flatten, then dense), `output`.

  Args:
    channels: output channels of each conv block (3x3 kernels); the last block pools 2x2.
    hidden: width of the dense layer before the output.
    num_classes: width of the output layer (logits).
    dropout: dropout rate of the dense layer.
    batch_norm: batch norm after each conv and dense layer (its statistics are model state).

  Returns:
    The stack of layers (Stages), to `cut`.

  Example:
    >>> import jax, jax.numpy as jnp, sljax
    >>> model = sljax.cut(sljax.models.cnn(), 1)  # the first conv block on the client
    >>> model.client.layer_names, model.server.layer_names
    (('conv_0',), ('conv_1', 'hidden', 'output'))
    >>> params, state = model.compose().init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
    >>> model.compose().apply(params, state, jnp.ones((2, 8, 8, 1)), key=None, train=False)[0].shape
    (2, 10)
  """
  convs = [linen_stage(_ConvBlock(c, (3, 3), pool=i == len(channels) - 1, batch_norm=batch_norm), name=f"conv_{i}")
           for i, c in enumerate(channels)]
  return convs + [_flat_hidden(_DenseBlock(hidden, dropout, batch_norm)),
                  linen_stage(_Output(num_classes), name="output")]


def cnn1d(*, channels: Sequence[int] = (32, 32), hidden: int = 64, num_classes: int = 10,
          kernel: int = 5) -> list[Stage]:
  """A small 1-D CNN for (B, L, C) signals such as MNIST-1D: conv blocks with pooling, dense, output.

  The layers are named as in `cnn`.

  Args:
    channels: output channels of each conv block; every block pools by 2.
    hidden: width of the dense layer before the output.
    num_classes: width of the output layer (logits).
    kernel: the convolutions' kernel size.

  Returns:
    The stack of layers (Stages), to `cut`.

  Example:
    >>> import jax, jax.numpy as jnp, sljax
    >>> model = sljax.cut(sljax.models.cnn1d(channels=(8, 8)), 2)  # both conv blocks on the client
    >>> params, state = model.client.init(jax.random.key(0), jnp.ones((2, 40, 1)))
    >>> model.client.apply(params, state, jnp.ones((2, 40, 1)), key=None, train=False)[0].shape  # smashed data
    (2, 10, 8)
  """
  convs = [linen_stage(_ConvBlock(c, (kernel,), pool=True), name=f"conv_{i}") for i, c in enumerate(channels)]
  return convs + [_flat_hidden(_DenseBlock(hidden)), linen_stage(_Output(num_classes), name="output")]


def _flat_hidden(block: nn.Module) -> Stage:
  """The `hidden` layer of the CNNs: flatten, then a dense block (its params: (flatten's, dense's))."""
  return sequential(function_stage(flatten, name="flatten"), linen_stage(block, name="dense"), name="hidden")



class CutPoint(NamedTuple):
  """A place to cut a stack: `cut(layers, index)` puts the layers up to and including `name` on the client."""

  index: int
  name: str


def cut_points(layers: Sequence[Any]) -> list[CutPoint]:
  """The valid cuts of a stack of layers: `(index, name)` for index 1 .. len(layers) - 1.

  `name` is the last layer on the client at that cut ("cut after `name`"): a layer's own name,
  else `layer_<i>`, as `cut` names them.

  Args:
    layers: the stack of layers (`Stage`s), at least two.

  Returns:
    A list of `CutPoint(index, name)`, one per valid cut, in order.

  Example:
    >>> import sljax
    >>> sljax.models.cut_points(sljax.models.mlp(hidden=(32, 32)))
    [CutPoint(index=1, name='hidden_0'), CutPoint(index=2, name='hidden_1')]
  """
  names = cut(layers, 1).layer_names  # `cut` names the layers (and refuses a stack too short to cut)
  return [CutPoint(k, names[k - 1]) for k in range(1, len(names))]
