"""Model halves as pure functions, and the adapters that make them.

Every part of a split model is a `Stage`: a pair of pure functions

    init(key, x) -> (params, model_state)
    apply(params, model_state, x, *, key, train) -> (y, model_state)

`params` are trained; `model_state` holds non-trained variables such as batch statistics, threaded
explicitly. `key` drives dropout and other randomness; it is split the same way by the split
protocols and by `SplitModel.compose`, so split training can be checked against centralized
training of the composed model.

Stages come from Flax Linen modules, Flax NNX modules, plain functions, or by composing other
stages. The Flax specifics (NNX `split`/`merge`, Linen `apply` with mutable collections) live in
this module only, so drift in the Flax API touches one file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen, nnx

PyTree = Any


class Stage(NamedTuple):
  """One part of a split model: pure `init` and `apply`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> s = linen_stage(nn.Dense(3))
    >>> params, state = s.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> y, state = s.apply(params, state, jnp.ones((2, 4)), key=None, train=False)
    >>> y.shape
    (2, 3)
  """

  init: Callable[..., tuple[PyTree, PyTree]]
  apply: Callable[..., tuple[jax.Array, PyTree]]


def function_stage(apply: Callable[..., jax.Array], init: Callable[..., PyTree] | None = None) -> Stage:
  """A stage from plain functions.

  Args:
    apply: `apply(params, x) -> y`, or `apply(x) -> y` when `init` is None (a stage without
      parameters, such as an activation or a reshape).
    init: `init(key, x) -> params`; None for a parameter-free stage.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = function_stage(lambda p, x: x @ p, lambda key, x: jnp.ones((x.shape[-1], 2)))
    >>> p, st = s.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> s.apply(p, st, jnp.ones((1, 3)), key=None, train=True)[0].tolist()
    [[3.0, 3.0]]
  """
  if init is None:

    def init_fn(key, x):
      del key, x
      return {}, {}

    def apply_fn(params, model_state, x, *, key, train):
      del params, key, train
      return apply(x), model_state

  else:

    def init_fn(key, x):
      return init(key, x), {}

    def apply_fn(params, model_state, x, *, key, train):
      del key, train
      return apply(params, x), model_state

  return Stage(init_fn, apply_fn)


def _accepts(fn: Callable, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def linen_stage(module: linen.Module, *, train_kwarg: str | None = "auto") -> Stage:
  """A stage from a Flax Linen module.

  The `params` collection is trained; every other collection (e.g. `batch_stats`) is model state,
  updated in training mode. Dropout draws from the `dropout` RNG stream, fed by the step key.

  Args:
    module: the Linen module.
    train_kwarg: name of the boolean keyword argument of `module.__call__` that switches training
      mode (`train=True` in training, False in inference), None if it has none, or "auto" to use
      `train` when `__call__` takes it.
  """
  if train_kwarg == "auto":
    train_kwarg = "train" if _accepts(module.__call__, "train") else None

  def kwargs(train):
    return {train_kwarg: train} if train_kwarg else {}

  def init(key, x):
    k_params, k_dropout = jax.random.split(key)
    variables = module.init({"params": k_params, "dropout": k_dropout}, x, **kwargs(False))
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables

  def apply(params, model_state, x, *, key, train):
    variables = {"params": params, **model_state}
    rngs = {"dropout": key} if key is not None else {}
    if train and model_state:
      y, new_state = module.apply(variables, x, rngs=rngs, mutable=list(model_state), **kwargs(train))
      return y, dict(new_state)
    return module.apply(variables, x, rngs=rngs, **kwargs(train)), model_state

  return Stage(init, apply)


def nnx_stage(module: nnx.Module) -> Stage:
  """A stage from a Flax NNX module (its current parameters become the initial parameters).

  The module is split once into a static graph, its `nnx.Param` variables (trained), its RNG
  streams, and everything else (e.g. `nnx.BatchStat`, model state). `apply` merges a fresh copy,
  so nothing is mutated. Every RNG stream is reseeded from the step key on each call and the module
  is put in train or eval mode as asked. Params and model state are plain nested dicts.

  `init` ignores its key and input: an NNX module is built already initialised; build it with the
  seed you want.
  """
  graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
  params_template, rest_template = params, rest
  # Every RNG stream the module holds (e.g. "dropout", or "default" for nnx.Rngs(0)) is reseeded.
  streams = sorted({v.tag for _, v in nnx.to_flat_state(rng_state) if isinstance(v, nnx.RngKey)})

  def init(key, x):
    del key, x
    return nnx.to_pure_dict(params_template), nnx.to_pure_dict(rest_template)

  def apply(params, model_state, x, *, key, train):
    # replace_by_pure_dict updates in place: fill fresh copies of the templates.
    p = jax.tree.map(lambda v: v, params_template)
    nnx.replace_by_pure_dict(p, params)
    s = jax.tree.map(lambda v: v, rest_template)
    nnx.replace_by_pure_dict(s, model_state)
    m = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rng_state), s)
    if train:
      m.train()
    else:
      m.eval()
    if streams and key is not None:
      nnx.reseed(m, **{name: jax.random.fold_in(key, i) for i, name in enumerate(streams)})
    y = m(x)
    _, _, _, new_rest = nnx.split(m, nnx.Param, nnx.RngState, ...)
    return y, nnx.to_pure_dict(new_rest)

  return Stage(init, apply)


def as_stage(part: Any) -> Stage:
  """Turns a Stage, Linen module, NNX module or parameter-free function into a Stage."""
  if isinstance(part, Stage):
    return part
  if isinstance(part, linen.Module):
    return linen_stage(part)
  if isinstance(part, nnx.Module):
    return nnx_stage(part)
  if callable(part):
    return function_stage(part)
  raise TypeError(
      f"part: expected a Stage, a flax.linen.Module, a flax.nnx.Module or a function, got {type(part).__name__}"
  )


def sequential(*parts: Any) -> Stage:
  """Composes parts into one stage; params and model state are tuples, one entry per part.

  The step key is split into one key per part, in order.
  """
  stages = tuple(as_stage(p) for p in parts)
  if not stages:
    raise ValueError("parts: expected at least one part, got none")

  def init(key, x):
    params, states = [], []
    for stage, k in zip(stages, jax.random.split(key, len(stages)), strict=True):
      p, s = stage.init(k, x)
      x, _ = stage.apply(p, s, x, key=k, train=False)
      params.append(p)
      states.append(s)
    return tuple(params), tuple(states)

  def apply(params, model_state, x, *, key, train):
    keys = [None] * len(stages) if key is None else jax.random.split(key, len(stages))
    new_states = []
    for stage, p, s, k in zip(stages, params, model_state, keys, strict=True):
      x, s = stage.apply(p, s, x, key=k, train=train)
      new_states.append(s)
    return x, tuple(new_states)

  return Stage(init, apply)


class SplitModel(NamedTuple):
  """The parts of a split model.

  Vanilla split learning has two parts: `client` (before the cut, on the client) and `server`
  (after it). U-shaped split learning adds `tail`, which runs on the client after the server body,
  so the labels never leave the client.

  Example:
    >>> import flax.linen as nn
    >>> model = cut([nn.Dense(16), jax.nn.relu, nn.Dense(10)], 2)
    >>> model.is_u_shaped
    False
  """

  client: Stage
  server: Stage
  tail: Stage | None = None

  @property
  def is_u_shaped(self) -> bool:
    return self.tail is not None

  @property
  def parts(self) -> tuple[Stage, ...]:
    return (self.client, self.server) + ((self.tail,) if self.tail is not None else ())

  def compose(self) -> Stage:
    """The whole model as one stage (for centralized training), with the same key split."""
    return sequential(*self.parts)


def split_model(client: Any, server: Any, tail: Any = None) -> SplitModel:
  """A split model from its parts: Stages, Linen or NNX modules, or parameter-free functions."""
  return SplitModel(as_stage(client), as_stage(server), None if tail is None else as_stage(tail))


def cut(layers: Sequence[Any], k: int, k2: int | None = None) -> SplitModel:
  """Cuts a stack of layers at index `k` (and, for U-shaped split learning, again at `k2`).

  The client holds `layers[:k]`; the server `layers[k:]` (or `layers[k:k2]`, with the client also
  holding the tail `layers[k2:]`). Moving the cut is changing `k`.

  Args:
    layers: the layers in order: Stages, Linen or NNX modules, or parameter-free functions.
    k: the cut layer index, 1 <= k < len(layers).
    k2: for U-shaped, the second cut, k < k2 < len(layers).

  Example:
    >>> import flax.linen as nn
    >>> model = cut([nn.Dense(32), jax.nn.relu, nn.Dense(32), jax.nn.relu, nn.Dense(10)], 2, 4)
    >>> model.is_u_shaped
    True
  """
  n = len(layers)
  if n < 2:
    raise ValueError(f"layers: expected at least 2 layers to cut, got {n}")
  if not 1 <= k <= n - 1:
    raise ValueError(f"k: cut index must be in [1, {n - 1}] for a stack of {n} layers, got {k}")
  if k2 is None:
    return SplitModel(sequential(*layers[:k]), sequential(*layers[k:]))
  if not k < k2 <= n - 1:
    raise ValueError(f"k2: second cut index must be in [{k + 1}, {n - 1}] for k={k} and {n} layers, got {k2}")
  return SplitModel(sequential(*layers[:k]), sequential(*layers[k:k2]), sequential(*layers[k2:]))


def flatten(x: jax.Array) -> jax.Array:
  """Flattens all but the leading (batch) axis."""
  return jnp.reshape(x, (x.shape[0], -1))
