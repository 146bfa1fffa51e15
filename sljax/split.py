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

A stage made by `sequential` or `cut` has named layers: its params (and model state) are a tuple
with one entry per layer, and `stage.layer_names`, `stage.get_layer(params, name)` and
`stage.set_layer(params, name, value)` read and write them by name.

For vertical split learning, `vertical_model` joins several bottoms, one per party, with a `Merge`
(`sljax.merges`) and a top: a `VerticalModel`, whose `init` and `apply` take a tuple of per-party
inputs and whose `compose()` is the whole model as one stage.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
from flax import linen, nnx

PyTree = Any


class InputShapeError(ValueError):
  """A stage was given an input of a shape it cannot take.

  Raise it from a layer that knows the shape it takes (the layers of `sljax.models` do): the
  protocols' `init` then reports it against the argument and the part of the model, e.g.
  "x: the client half expects shape (B, features), got (2, 8, 8) float32".

  Args:
    expected: the shape the stage takes, in words, e.g. "(B, height, width, channels)".
    got: the shape and dtype it was given, e.g. "(2, 64) float32".
  """

  def __init__(self, expected: str, got: str):
    super().__init__(f"expected shape {expected}, got {got}")
    self.expected = expected
    self.got = got


def describe(x: Any) -> str:
  """Shape and dtype of an array (or a `jax.ShapeDtypeStruct`) as error messages write them: "(2, 64) float32"."""
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None:
    return type(x).__name__
  return f"{tuple(shape)} {np.dtype(dtype).name}"


class Stage(NamedTuple):
  """One part of a split model: pure `init` and `apply`, and optionally a name and named layers.

  `name` is the stage's name as a layer of a stack (`sequential`, `cut`). `layers` are the named
  stages of a stack, one per entry of its params tuple: read and write their params by name with
  `get_layer` and `set_layer`.

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
  name: str | None = None
  layers: tuple[Stage, ...] = ()

  @property
  def layer_names(self) -> tuple[str, ...]:
    """The names of the layers of a stack, in order: the params tuple has one entry per name."""
    return tuple(layer.name for layer in self.layers)

  def get_layer(self, params: PyTree, name: str) -> PyTree:
    """The params (or model state) of the layer called `name`.

    `name` is one of `layer_names`, or the name of a layer nested in one of them when exactly
    one nested layer has it (e.g. a layer of the client half in `model.compose()`).

    Example:
      >>> import jax, jax.numpy as jnp, sljax
      >>> model = sljax.cut(sljax.models.mlp(hidden=(32, 32)), 1)
      >>> model.server.layer_names
      ('hidden_1', 'output')
      >>> params, _ = model.server.init(jax.random.key(0), jnp.ones((2, 32)))
      >>> model.server.get_layer(params, "output")["kernel"].shape
      (32, 10)
    """
    return _walk(self, params, self._path(name))

  def set_layer(self, params: PyTree, name: str, value: PyTree) -> PyTree:
    """New params (or model state) with the layer called `name` replaced by `value`.

    Nothing is mutated. `value` must have the structure, shapes and dtypes of the params it
    replaces (the optimizer state was built for them).

    Example:
      >>> import jax, jax.numpy as jnp, sljax
      >>> model = sljax.cut(sljax.models.mlp(hidden=(32,)), 1)
      >>> params, _ = model.server.init(jax.random.key(0), jnp.ones((2, 32)))
      >>> zeros = jax.tree.map(jnp.zeros_like, model.server.get_layer(params, "output"))
      >>> params = model.server.set_layer(params, "output", zeros)
      >>> float(jnp.abs(params[0]["kernel"]).sum())
      0.0
    """
    path = self._path(name)
    want, got = _signature(_walk(self, params, path)), _signature(value)
    if want != got:
      raise ValueError(f"value: expected params like those of layer {name!r}, {want}, got {got}")
    return _replace_at(params, path, value)

  def _path(self, name: str) -> tuple[int, ...]:
    """Indices from the stage's params down to the layer `name`: the shallowest match, if unique."""
    found = _layer_paths(self)
    if not found:
      raise ValueError(f"name: this stage has no named layers (stacks made by sequential or cut have), got {name!r}")
    matches = [path for n, path in found if n == name]
    if matches:
      depth = min(len(p) for p in matches)
      shallowest = [p for p in matches if len(p) == depth]
      if len(shallowest) == 1:
        return shallowest[0]
      raise ValueError(f"name: {name!r} names {len(shallowest)} nested layers; use the name of the layer holding it")
    raise ValueError(f"name: expected one of {tuple(n for n, _ in found)}, got {name!r}")


def _layer_paths(stage: Stage, prefix: tuple[int, ...] = ()) -> list[tuple[str, tuple[int, ...]]]:
  """(name, path) of every named layer under `stage`, depth first, in order."""
  out = []
  for i, layer in enumerate(stage.layers):
    out.append((layer.name, prefix + (i,)))
    out.extend(_layer_paths(layer, prefix + (i,)))
  return out


def _walk(stage: Stage, params: PyTree, path: tuple[int, ...]) -> PyTree:
  """The params at `path` under a stack's params, checked to hold one entry per layer at each step."""
  for i in path:
    if not isinstance(params, tuple) or len(params) != len(stage.layers):
      if isinstance(params, dict):
        got = f"a dict with keys {sorted(params)}"
      elif isinstance(params, tuple):
        got = f"a tuple of {len(params)}"
      else:
        got = describe(params)
      raise ValueError(f"params: expected a tuple with one entry per layer of {stage.layer_names}, got {got}")
    stage, params = stage.layers[i], params[i]
  return params


def _replace_at(params: PyTree, path: tuple[int, ...], value: PyTree) -> PyTree:
  if not path:
    return value
  i = path[0]
  return params[:i] + (_replace_at(params[i], path[1:], value),) + params[i + 1:]


def _signature(tree: PyTree) -> str:
  """The leaves of a pytree by path with their shapes and dtypes, for error messages."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return "{" + ", ".join(f"{jax.tree_util.keystr(path)}: {describe(leaf)}" for path, leaf in leaves) + "}"


def function_stage(apply: Callable[..., jax.Array], init: Callable[..., PyTree] | None = None, *,
                   name: str | None = None) -> Stage:
  """A stage from plain functions.

  Args:
    apply: `apply(params, x) -> y`, or `apply(x) -> y` when `init` is None (a stage without
      parameters, such as an activation or a reshape).
    init: `init(key, x) -> params`; None for a parameter-free stage.
    name: its name as a layer of a stack (see `sequential`).

  Returns:
    A `Stage` without model state (`{}`) that ignores the key and the train flag.

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

  return Stage(init_fn, apply_fn, name)


def _accepts(fn: Callable, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def linen_stage(module: linen.Module, *, train_kwarg: str | None = "auto", name: str | None = None) -> Stage:
  """A stage from a Flax Linen module.

  The `params` collection is trained; every other collection (e.g. `batch_stats`) is model state,
  updated in training mode. Dropout draws from the `dropout` RNG stream, fed by the step key.

  Args:
    module: the Linen module.
    train_kwarg: name of the boolean keyword argument of `module.__call__` that switches training
      mode (`train=True` in training, False in inference), None if it has none, or "auto" to use
      `train` when `__call__` takes it.
    name: its name as a layer of a stack (see `sequential`).

  Returns:
    The `Stage`: `init(key, x) -> (params, model_state)` and `apply(params, model_state, x, *, key, train)`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     return nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
    >>> stage = linen_stage(Block(), name="block")  # `train` is found and switched
    >>> params, state = stage.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> sorted(state)  # batch statistics: model state, not trained
    ['batch_stats']
    >>> y, state = stage.apply(params, state, jnp.ones((4, 3)), key=None, train=True)
    >>> y.shape
    (4, 8)
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

  return Stage(init, apply, name)


def nnx_stage(module: nnx.Module | Callable[..., nnx.Module], *, name: str | None = None) -> Stage:
  """A stage from a Flax NNX module constructor, or from a built NNX module.

  Given a constructor (a callable taking `rngs: nnx.Rngs` and returning the module), `init(key, x)`
  builds the module with `nnx.Rngs(key)`: the key decides the initial parameters, as for every
  other kind of stage, so two init keys give two different models. Given a built module, its
  current parameters are the initial parameters and `init` ignores its key (a seed sweep over init
  keys would train the same model every time): use that form to start from parameters you made.

  The module is split into a static graph, its `nnx.Param` variables (trained), its RNG streams,
  and everything else (e.g. `nnx.BatchStat`, model state). `apply` merges a fresh copy, so nothing
  is mutated. Every RNG stream is reseeded from the step key on each call and the module is put in
  train or eval mode as asked. Params and model state are plain nested dicts.

  A constructor is not a module, so `cut` and `split_model` would take it for a parameter-free
  function: wrap it in `nnx_stage` there.

  Args:
    module: a constructor `module(rngs=nnx.Rngs(...)) -> nnx.Module`, e.g.
      `lambda rngs: nnx.Linear(64, 32, rngs=rngs)` or `functools.partial(MyModule, 64, 32)`; or a
      built `nnx.Module`.
    name: its name as a layer of a stack (see `sequential`).

  Returns:
    A `Stage` whose params are the module's `nnx.Param` variables and whose model state is the
    rest of its variables but its RNG streams, as plain nested dicts.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> s = nnx_stage(lambda rngs: nnx.Linear(4, 3, rngs=rngs))
    >>> a, _ = s.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> b, _ = s.init(jax.random.key(1), jnp.ones((2, 4)))
    >>> bool(jnp.allclose(a["kernel"], b["kernel"]))
    False
  """
  if isinstance(module, nnx.Module):
    make, built = None, module
  elif callable(module):
    make = module
    # The structure without the arrays: nothing is initialised until `init` gets its key.
    built = nnx.eval_shape(lambda: _construct(make, nnx.Rngs(0)))
  else:
    raise TypeError(f"module: expected a flax.nnx.Module or a constructor taking rngs, got {type(module).__name__}")
  graphdef, params_template, rng_state, rest_template = nnx.split(built, nnx.Param, nnx.RngState, ...)
  # Every RNG stream the module holds (e.g. "dropout", or "default" for nnx.Rngs(0)) is reseeded.
  streams = sorted({v.tag for _, v in nnx.to_flat_state(rng_state) if isinstance(v, nnx.RngKey)})

  def init(key, x):
    del x
    if make is None:
      return nnx.to_pure_dict(params_template), nnx.to_pure_dict(rest_template)
    _, params, _, rest = nnx.split(_construct(make, nnx.Rngs(key)), nnx.Param, nnx.RngState, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

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
    # A constructed module's RNG state is only a shape until reseeded: without a step key it gets a
    # fixed one (a built module keeps its own).
    if key is None and make is not None:
      key = jax.random.key(0)
    if streams and key is not None:
      nnx.reseed(m, **{stream: jax.random.fold_in(key, i) for i, stream in enumerate(streams)})
    y = m(x)
    _, _, _, new_rest = nnx.split(m, nnx.Param, nnx.RngState, ...)
    return y, nnx.to_pure_dict(new_rest)

  return Stage(init, apply, name)


def _construct(make: Callable[..., Any], rngs: nnx.Rngs) -> nnx.Module:
  module = make(rngs=rngs)
  if not isinstance(module, nnx.Module):
    raise TypeError(f"module: expected a constructor that returns a flax.nnx.Module, got one returning "
                    f"{describe(module)}")
  return module


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


def sequential(*parts: Any, name: str | None = None) -> Stage:
  """Composes parts into one stack; params and model state are tuples, one entry per part.

  Each part is a layer of the stack, named by its own `name` or, if it has none, `layer_<i>` by its
  position; `layer_names`, `get_layer` and `set_layer` of the stack use these names. The step key
  is split into one key per part, in order.

  Args:
    *parts: Stages, Linen or NNX modules, or parameter-free functions, in order.
    name: the stack's own name as a layer of a bigger stack.

  Returns:
    The stack, a `Stage` whose `layers` are the parts (as Stages) and `layer_names` their names.

  Raises:
    ValueError: no parts.

  Example:
    >>> import jax, flax.linen as nn
    >>> s = sequential(linen_stage(nn.Dense(8), name="embed"), jax.nn.relu, nn.Dense(2))
    >>> s.layer_names
    ('embed', 'layer_1', 'layer_2')
  """
  stages = _named(tuple(as_stage(p) for p in parts))
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

  return Stage(init, apply, name, stages)


def _named(stages: tuple[Stage, ...], start: int = 0) -> tuple[Stage, ...]:
  """The stages, those without a name named `layer_<start + i>`; names must be distinct strings."""
  named = tuple(s if s.name is not None else s._replace(name=f"layer_{start + i}") for i, s in enumerate(stages))
  names = [s.name for s in named]
  for n in names:
    if not isinstance(n, str):
      raise TypeError(f"name: expected a layer name (str), got {type(n).__name__}")
    if names.count(n) > 1:
      raise ValueError(f"layers: expected distinct layer names, got {tuple(names)} ({n!r} more than once)")
  return named


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
    >>> model.client.layer_names, model.server.layer_names
    (('layer_0', 'layer_1'), ('layer_2',))
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

  @property
  def layer_names(self) -> tuple[str, ...]:
    """The names of the layers of every part, in order (see `Stage.layer_names`)."""
    return tuple(n for part in self.parts for n in part.layer_names)

  def compose(self) -> Stage:
    """The whole model as one stage (for centralized training), with the same key split.

    Its layers are the parts, named "client", "server" (and "tail"); `get_layer` on it also finds
    the layers inside them: `model.compose().get_layer(central_params, "output")`.
    """
    roles = ("client", "server", "tail")
    return sequential(*(part._replace(name=role) for part, role in zip(self.parts, roles)))


def split_model(client: Any, server: Any, tail: Any = None) -> SplitModel:
  """A split model from its parts: Stages, Linen or NNX modules, or parameter-free functions.

  Args:
    client: the client's part, before the cut.
    server: the server's part, after the cut (in U-shaped split learning, the body between the cuts).
    tail: in U-shaped split learning, the client's last part; None otherwise.

  Returns:
    A `SplitModel` of Stages (`as_stage` of each part).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = split_model(nn.Sequential([nn.Dense(16), nn.relu]), nn.Dense(10))
    >>> params, state = model.compose().init(jax.random.key(0), jnp.ones((2, 8)))
    >>> model.compose().apply(params, state, jnp.ones((2, 8)), key=None, train=False)[0].shape
    (2, 10)
  """
  return SplitModel(as_stage(client), as_stage(server), None if tail is None else as_stage(tail))


def cut(layers: Sequence[Any], k: int, k2: int | None = None) -> SplitModel:
  """Cuts a stack of layers at index `k` (and, for U-shaped split learning, again at `k2`).

  The client holds `layers[:k]`; the server `layers[k:]` (or `layers[k:k2]`, with the client also
  holding the tail `layers[k2:]`). Moving the cut is changing `k`.

  Every layer keeps its name across cuts: a Stage's own `name`, else `layer_<i>` by its index in
  `layers`. Each part lists its own (`model.client.layer_names`) and reads and writes its params
  by name (`model.client.get_layer(params, name)`).

  Args:
    layers: the layers in order: Stages, Linen or NNX modules, or parameter-free functions.
    k: the cut layer index, 1 <= k < len(layers).
    k2: for U-shaped, the second cut, k < k2 < len(layers).

  Returns:
    A `SplitModel`: `client` and `server` stacks, and the client's `tail` when `k2` is given.

  Raises:
    ValueError: fewer than 2 layers, or a cut index out of range.

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
  layers = _named(tuple(as_stage(layer) for layer in layers))
  if k2 is None:
    return SplitModel(sequential(*layers[:k]), sequential(*layers[k:]))
  if not k < k2 <= n - 1:
    raise ValueError(f"k2: second cut index must be in [{k + 1}, {n - 1}] for k={k} and {n} layers, got {k2}")
  return SplitModel(sequential(*layers[:k]), sequential(*layers[k:k2]), sequential(*layers[k2:]))


def flatten(x: jax.Array) -> jax.Array:
  """Flattens all but the leading (batch) axis."""
  return jnp.reshape(x, (x.shape[0], -1))


# Several bottoms joined by a merge: the model side of vertical split learning.


class Merge(NamedTuple):
  """How the label party joins the bottoms' outputs (the smashed data) into the top's input.

  A stage on a tuple of arrays, one per bottom (`init(key, hs)`, `apply(params, model_state, hs,
  *, key, train)`), with `check(hs, names)`, which raises a ValueError naming the party and the
  shapes when the outputs cannot be merged. `VerticalModel` calls `check` at trace time before
  every `init` and `apply` of the merge. Made by the factories in `sljax.merges`; `vertical_model`
  also takes a `Stage` or a function of the tuple, unchecked.
  """

  init: Callable[..., tuple[PyTree, PyTree]]
  apply: Callable[..., tuple[jax.Array, PyTree]]
  name: str
  check: Callable[[Sequence[Any], Sequence[str]], None]


def _no_check(hs, names) -> None:
  del hs, names


def as_merge(merge: Any) -> Merge:
  """Turns a Merge, a Stage on the tuple of bottom outputs, or a function of it into a Merge."""
  if isinstance(merge, Merge):
    return merge
  if isinstance(merge, Stage) or callable(merge):
    stage = as_stage(merge)
    return Merge(stage.init, stage.apply, stage.name or "merge", _no_check)
  raise TypeError(f"merge: expected a Merge (sljax.merges), a Stage or a function of the tuple of bottom outputs, "
                  f"got {type(merge).__name__}")


# Layer names of `VerticalModel.compose()` other than the parties'.
_LABEL, _MERGE, _TOP = "label", "merge", "top"


class VerticalModel(NamedTuple):
  """Several bottoms, one per party, joined by a merge and a top: vertical split learning's model.

  Party p runs `bottoms[p]` on its own feature columns `xs[p]`; the label party merges the
  bottoms' outputs (`merge`) and runs `top` on the result. `names` are the parties' names (error
  messages and `compose()`'s layers use them). `label_party`, if set, names the bottom the label
  party holds itself (features of its own): its smashed data never crosses the network.

  `init(key, xs)` and `apply(params, model_state, xs, *, key, train)` are those of a `Stage` on the
  tuple of per-party inputs. Params and model state are tuples with one entry per party, in
  order, then the label party's `(merge, top)`.

  Keys: the key is split into P + 1 keys, `jax.random.split(key, P + 1)`: bottom p takes key p,
  the label party the last, which it splits in two (merge, then top) as `sequential` does. The
  split legs (`sljax.vertical_sl`) split a step key the same way, so split training equals
  centralized training of `compose()`, dropout included.

  Built by `vertical_model`.
  """

  bottoms: tuple[Stage, ...]
  merge: Merge
  top: Stage
  names: tuple[str, ...]
  label_party: str | None = None

  @property
  def num_parties(self) -> int:
    return len(self.bottoms)

  @property
  def label_stage(self) -> Stage:
    """What the label party runs on the tuple of smashed data: the merge, then the top.

    A stack with layers "merge" and "top": its params are `(merge_params, top_params)`.
    """
    names, merge = self.names, self.merge

    def init(key, hs):
      merge.check(hs, names)
      return merge.init(key, hs)

    def apply(params, model_state, hs, *, key, train):
      merge.check(hs, names)
      return merge.apply(params, model_state, hs, key=key, train=train)

    return sequential(Stage(init, apply, _MERGE), self.top._replace(name=_TOP), name=_LABEL)

  def check_inputs(self, xs: Any) -> tuple:
    """`xs` as a tuple, checked to hold one batch per party, all with the same number of examples."""
    n = self.num_parties
    if not isinstance(xs, (tuple, list)):
      raise ValueError(f"xs: expected a tuple of {n} inputs, one per party {self.names}, got {describe(xs)}")
    if len(xs) != n:
      raise ValueError(f"xs: expected a tuple of {n} inputs, one per party {self.names}, got {len(xs)} inputs")
    for i, x in enumerate(xs):
      if jnp.ndim(x) == 0:
        raise ValueError(f"xs[{i}]: party {self.names[i]!r} expects a batch with a leading batch axis, "
                         f"got {describe(x)}")
    batch = jnp.shape(xs[0])[0]
    for i, x in enumerate(xs[1:], 1):
      if jnp.shape(x)[0] != batch:
        raise ValueError(f"xs[{i}]: every party holds the same examples in the same order; party "
                         f"{self.names[i]!r} has {describe(x)}, party {self.names[0]!r} {describe(xs[0])}")
    return tuple(xs)

  def init(self, key, xs) -> tuple[tuple, tuple]:
    """Params and model state of every part, on an example batch per party (checked, see `check_inputs`)."""
    xs = self.check_inputs(xs)
    keys = jax.random.split(key, self.num_parties + 1)
    params, states, hs = [], [], []
    for i, (bottom, k, x) in enumerate(zip(self.bottoms, keys[:-1], xs, strict=True)):
      try:
        p, s = bottom.init(k, x)
        h, _ = bottom.apply(p, s, x, key=None, train=False)
      except InputShapeError as e:
        raise ValueError(f"xs[{i}]: the bottom of party {self.names[i]!r} expects shape {e.expected}, "
                         f"got {e.got}") from None
      except Exception as e:  # noqa: BLE001 -- re-raised naming the party and its input
        raise ValueError(f"xs[{i}]: the bottom of party {self.names[i]!r} cannot take input of shape {describe(x)}: "
                         f"{e}") from None
      params.append(p)
      states.append(s)
      hs.append(h)
    label = self.label_stage
    hs = tuple(hs)
    # The merge's errors name the parties (Merge.check); the top's are said against the merge's output.
    k_merge, k_top = jax.random.split(keys[-1], 2)  # as `sequential` splits the label stage's key
    merge_stage, top = label.layers
    p_merge, s_merge = merge_stage.init(k_merge, hs)
    merged, _ = merge_stage.apply(p_merge, s_merge, hs, key=None, train=False)
    try:
      p_top, s_top = top.init(k_top, merged)
    except InputShapeError as e:
      raise ValueError(f"mismatched parts: the merge ({self.merge.name}) outputs shape {describe(merged)}, but the "
                       f"top expects shape {e.expected}") from None
    except Exception as e:  # noqa: BLE001 -- re-raised with the shape the top was given
      raise ValueError(f"mismatched parts: the merge ({self.merge.name}) outputs shape {describe(merged)}, which "
                       f"the top cannot take: {e}") from None
    return tuple(params) + ((p_merge, p_top),), tuple(states) + ((s_merge, s_top),)

  def apply(self, params, model_state, xs, *, key, train) -> tuple[jax.Array, tuple]:
    """The whole model on the tuple of per-party inputs: the bottoms, the merge, the top."""
    xs = self.check_inputs(xs)
    n = self.num_parties
    keys = [None] * (n + 1) if key is None else jax.random.split(key, n + 1)
    hs, states = [], []
    for bottom, p, s, x, k in zip(self.bottoms, params[:n], model_state[:n], xs, keys[:n], strict=True):
      h, s = bottom.apply(p, s, x, key=k, train=train)
      hs.append(h)
      states.append(s)
    out, label_state = self.label_stage.apply(params[n], model_state[n], tuple(hs), key=keys[n], train=train)
    return out, tuple(states) + (label_state,)

  def compose(self) -> Stage:
    """The whole model as one stage on the tuple of per-party inputs (centralized training), same key split.

    Its layers are the parties, by name, then "label" (holding "merge" and "top"); `get_layer`
    finds the layers inside them too: `model.compose().get_layer(params, "merge")`.
    """
    layers = tuple(b._replace(name=n) for b, n in zip(self.bottoms, self.names, strict=True)) + (self.label_stage,)
    return Stage(self.init, self.apply, None, layers)


def vertical_model(bottoms: Sequence[Any], merge: Any, top: Any, *, names: Sequence[str] | None = None,
                   label_party: str | None = None) -> VerticalModel:
  """A model with one bottom per party, joined by a merge and a top (vertical split learning).

  Args:
    bottoms: one per party, in order: Stages (e.g. `cut(layers, k).client` or `sequential(...)`),
      Linen or NNX modules, or functions. Party p's bottom takes its own columns `xs[p]`.
    merge: how the label party joins the bottoms' outputs: `sljax.merges.concat()`, `sum()`,
      `mean()`, `attention()`, or a Stage/function of the tuple of outputs (unchecked). A learned
      merge's params live with the top, on the label party.
    top: what the label party runs on the merged outputs, up to the model's outputs.
    names: the parties' names, distinct strings other than "label", "merge" and "top";
      `party_<p>` by default.
    label_party: the name of the bottom the label party holds itself, if it holds features of its
      own; None if it holds only the labels.

  Returns:
    A `VerticalModel`: its `init(key, xs)` and `apply(params, state, xs, ...)` take one input per
    party; `compose()` gives the whole model as one stack.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, sljax
    >>> model = sljax.vertical_model([nn.Dense(8), nn.Dense(4)], sljax.merges.concat(), nn.Dense(10),
    ...                              names=["bank", "shop"])
    >>> xs = (jnp.ones((2, 5)), jnp.ones((2, 3)))
    >>> params, state = model.init(jax.random.key(0), xs)
    >>> model.apply(params, state, xs, key=None, train=False)[0].shape
    (2, 10)
    >>> model.compose().get_layer(params, "top")["kernel"].shape
    (12, 10)
  """
  # A Stage is a tuple too: a single stage is not a list of bottoms.
  if isinstance(bottoms, (Stage, Merge)) or not isinstance(bottoms, Sequence):
    raise TypeError(f"bottoms: expected a list with one bottom per party, got {type(bottoms).__name__}")
  if not bottoms:
    raise ValueError("bottoms: expected at least one bottom, got none")
  stages = tuple(as_stage(b) for b in bottoms)
  if names is None:
    names = tuple(f"party_{i}" for i in range(len(stages)))
  else:
    names = tuple(names)
    if len(names) != len(stages):
      raise ValueError(f"names: expected one name per bottom ({len(stages)}), got {len(names)}: {names}")
    for n in names:
      if not isinstance(n, str):
        raise TypeError(f"names: expected party names (str), got {type(n).__name__}")
      if n in (_LABEL, _MERGE, _TOP):
        raise ValueError(f"names: {n!r} names a part of the label party; expected other names, got {names}")
      if names.count(n) > 1:
        raise ValueError(f"names: expected distinct party names, got {names} ({n!r} more than once)")
  if label_party is not None and label_party not in names:
    raise ValueError(f"label_party: expected None or one of the parties {names}, got {label_party!r}")
  return VerticalModel(stages, as_merge(merge), as_stage(top), names, label_party)
