"""Pure step functions of one client-server exchange: vanilla and U-shaped split learning.

Vanilla split learning (Gupta & Raskar 2018; Vepakomma et al. 2018), one training step:

    client_forward   x -> smashed = f_c(params_c, x) under jax.vjp      --- SmashedData(smashed, y) -->
    server_step      loss = L(f_s(params_s, smashed), y); update params_s  <-- CutGradient(dL/dsmashed) ---
    client_backward  grads_c = pullback(dL/dsmashed); update params_c

U-shaped split learning keeps the labels on the client: the server runs only the body and the
client runs the tail and the loss, so there are two more legs:

    client_forward    --- SmashedData(smashed) --->         server_forward   (body under jax.vjp)
    client_tail_step  <-- BodyOutput(body) ---; loss with the tail; --- TailGradient(dL/dbody) -->
    server_backward   update params_s        <-- CutGradient(dL/dsmashed) ---
    client_backward   update head and tail params

Every function is pure: state and message in, new state and message out. The pullbacks returned
by `jax.vjp` stay with the party that made them (in the `*Pending` values), never in a message.
The fused `step` calls the same functions one after another, so in simulation the whole exchange
is one jitted program doing exactly the math of the separate calls.

Keys: a step key is split into one key per model part (client, server[, tail]), exactly as
`SplitModel.compose()` splits it, so split training equals centralized training of the composed
model, dropout included.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sljax import codecs as codec_lib
from sljax import messages as msgs
from sljax.split import InputShapeError, SplitModel, describe

PyTree = Any

# Codec randomness (e.g. stochastic rounding) draws from fold_in(step key, CODEC_STREAM), so the
# model parts see the same keys with and without a codec.
CODEC_STREAM = 0x5C0DEC
# Likewise the defense hooks: `client_loss` draws from fold_in(client key, CLIENT_LOSS_STREAM),
# `cut_gradient_transform` from fold_in(server key, CUT_GRADIENT_STREAM).
CLIENT_LOSS_STREAM = 0xC1105
CUT_GRADIENT_STREAM = 0xC7D6AD


class ArraySpec(NamedTuple):
  """Shape (without the leading batch axis) and dtype name of a batched array."""

  shape: tuple[int, ...]
  dtype: str

  @classmethod
  def of(cls, x) -> "ArraySpec":
    return cls(tuple(x.shape[1:]), np.dtype(x.dtype).name)

  def describe(self) -> str:
    return f"(B, {', '.join(map(str, self.shape))}{',' if len(self.shape) == 0 else ''}) {self.dtype}".replace(
        "(B, )", "(B,)"
    )


def check_batch(name: str, x: Any, spec: ArraySpec, *, batch: int | None = None) -> None:
  """Raises a ValueError naming `name` unless `x` is a batch of `spec` (of size `batch`, if given)."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  ok = (
      shape is not None
      and tuple(shape[1:]) == spec.shape
      and len(shape) == len(spec.shape) + 1
      and np.dtype(dtype).name == spec.dtype
      and (batch is None or shape[0] == batch)
  )
  if not ok:
    want = spec.describe() if batch is None else spec.describe().replace("(B", f"({batch}")
    got = f"{tuple(shape)} {np.dtype(dtype).name}" if shape is not None else type(x).__name__
    raise ValueError(f"{name}: expected shape {want}, got {got}")


def check_labels(labels: Any, *, batch: int) -> None:
  """Raises a ValueError unless `labels` is a batch of `batch` integer class labels."""
  shape = getattr(labels, "shape", None)
  dtype = getattr(labels, "dtype", None)
  if shape is None or tuple(shape) != (batch,) or not jnp.issubdtype(dtype, jnp.integer):
    got = f"{tuple(shape)} {np.dtype(dtype).name}" if shape is not None else type(labels).__name__
    raise ValueError(f"labels: expected shape ({batch},) integer class labels, got {got}")


@jax.tree_util.register_pytree_node_class
class Metrics(Mapping):
  """A step's metrics: arrays (loss, accuracy) and static counts (bytes up and down).

  Byte counts depend only on the shapes of the messages, so they are Python ints carried in the
  pytree's structure rather than outputs of the compiled step: they stay exact and cost nothing
  at run time (on a CPU, two extra constant outputs made a small MLP step measurably slower).
  Read it like a dict: `metrics["loss"]`, `metrics["bytes_up"]`, `dict(metrics)`.
  """

  def __init__(self, arrays: Mapping[str, Any], static: Mapping[str, int]):
    self._arrays = dict(arrays)
    self._static = dict(static)

  def __getitem__(self, name: str) -> Any:
    return self._arrays[name] if name in self._arrays else self._static[name]

  def __iter__(self) -> Iterator[str]:
    return iter([*self._arrays, *self._static])

  def __len__(self) -> int:
    return len(self._arrays) + len(self._static)

  def __repr__(self) -> str:
    return f"Metrics({dict(self)})"

  def tree_flatten(self):
    return (self._arrays,), tuple(sorted(self._static.items()))

  @classmethod
  def tree_unflatten(cls, static, children):
    return cls(children[0], dict(static))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (the default loss).

  Args:
    logits: (B, num_classes) outputs.
    labels: (B,) integer labels.

  Returns:
    The mean over the B rows, a scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
    1.3863
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max equals the label.

  Args:
    logits: (B, num_classes) outputs.
    labels: (B,) integer labels.

  Returns:
    The share of the B rows predicted right, a scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(accuracy(jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), jnp.array([0, 1, 1]))), 4)
    0.6667
  """
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


@struct.dataclass
class PartyState:
  """What one party holds: its params, model state (e.g. batch stats) and optimizer state.

  `codec_state` is the state of the codec this party encodes its messages with (e.g. the
  error-feedback residual of `codecs.top_k`); `()` for stateless codecs.

  `input_spec` is static: the shape and dtype of the batches this party accepts, checked at trace
  time so that a bad batch gets an error naming the expected shape instead of an XLA traceback.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  input_spec: ArraySpec = struct.field(pytree_node=False)
  codec_state: PyTree = ()


@struct.dataclass
class SplitState:
  """The state of one client-server pair: both parties and the step count."""

  client: PartyState
  server: PartyState
  step: jax.Array

  def advanced(self, client: PartyState, server: PartyState) -> SplitState:
    """The state after one step composed from the legs: the parties they returned, and the step
    count advanced as the fused `step` advances it (the legs act on the parties alone)."""
    return SplitState(client, server, self.step + 1)


@struct.dataclass
class ClientPending:
  """What the client keeps between its forward and its backward: the pullback, never sent.

  The new model state and codec state are applied only by the backward, so a step abandoned
  between the two leaves the client exactly as it was.
  """

  pullback: Any
  model_state: PyTree
  codec_state: PyTree = ()
  sent: PyTree = ()  # the uplink codec's payload: its backward needs the selection it made
  metrics: dict = struct.field(default_factory=dict)  # the client's own: {"client_loss": term} with a client_loss


@struct.dataclass
class ServerPending:
  """What the U-shaped server keeps between its forward and its backward (its codec state, and
  the key its downlink codec takes for the cut gradient, included)."""

  pullback: Any
  model_state: PyTree
  codec_state: PyTree = ()
  codec_key: Any = None
  sent: PyTree = ()  # the downlink codec's payload of the body's output


@struct.dataclass
class TailPending:
  """What the U-shaped client keeps between its tail step and its backward."""

  head: ClientPending
  tail_grads: PyTree
  tail_state: PyTree
  codec_state: PyTree = ()


def apply_update(party: PartyState, grads: PyTree, optimizer: optax.GradientTransformation, model_state) -> PartyState:
  """One optimizer step of a party, with its new model state."""
  updates, opt_state = optimizer.update(grads, party.opt_state, party.params)
  return party.replace(params=optax.apply_updates(party.params, updates), opt_state=opt_state, model_state=model_state)


def _check_hook(name: str, fn: Any, signature: str) -> None:
  if fn is not None and not callable(fn):
    raise TypeError(f"{name}: expected a callable {signature} or None, got {type(fn).__name__}")


def _takes_key(fn: Callable) -> bool:
  """Whether a `client_loss` takes a key: a third positional parameter, or one named `key`."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # some builtins have no signature: called without a key
    return False
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
  return len(positional) >= 3 or any(p.name == "key" for p in params)


def _client_term(client_loss: Callable, x, smashed, key) -> jax.Array:
  """`client_loss` on (x, smashed), checked to be a float scalar at trace time."""
  if _takes_key(client_loss):
    term = client_loss(x, smashed, jax.random.fold_in(key, CLIENT_LOSS_STREAM))
  else:
    term = client_loss(x, smashed)
  shape, dtype = getattr(term, "shape", None), getattr(term, "dtype", None)
  if shape != () or not jnp.issubdtype(dtype, jnp.floating):
    got = f"shape {shape} {dtype}" if shape is not None else type(term).__name__
    raise ValueError(f"client_loss: expected a float scalar, got {got}")
  return term


def _feed_term_cotangent(vjp_fn, one, g_cut):
  return vjp_fn((g_cut, one))


def _client_vjp(stage, client_loss: Callable | None, params, model_state, x, key):
  """The client's part under `jax.vjp`: (smashed, pullback, new model state, metrics).

  With a `client_loss`, the vjp is over (smashed, term) and the pullback feeds it (g_cut, 1): the
  client's gradient is pullback(g_cut) plus the term's gradient, in one backward pass. Wrapped in
  a `Partial`, the pullback keeps its one-argument form and stays a pytree (it crosses `jit`).
  """

  def forward(p):
    return stage.apply(p, model_state, x, key=key, train=True)

  if client_loss is None:
    smashed, pullback, new_state = jax.vjp(forward, params, has_aux=True)
    return smashed, pullback, new_state, {}

  def with_term(p):
    smashed, new_state = forward(p)
    return (smashed, _client_term(client_loss, x, smashed, key)), new_state

  (smashed, term), vjp_fn, new_state = jax.vjp(with_term, params, has_aux=True)
  pullback = jax.tree_util.Partial(_feed_term_cotangent, vjp_fn, jnp.ones_like(term))
  return smashed, pullback, new_state, {"client_loss": term}


def _transform_cut_gradient(transform: Callable, grad, labels, key):
  """`cut_gradient_transform` on the cut gradient, checked to keep its shape and dtype."""
  out = transform(grad, labels, jax.random.fold_in(key, CUT_GRADIENT_STREAM))
  want = jax.tree.map(lambda a: (a.shape, a.dtype), grad)
  got = jax.tree.map(lambda a: (getattr(a, "shape", None), getattr(a, "dtype", None)), out)
  if got != want:
    raise ValueError(f"cut_gradient_transform: expected a gradient like its input {want}, got {got}")
  return out


def _check_split_model(model) -> None:
  """Raises a TypeError unless `model` is a `SplitModel`."""
  if not isinstance(model, SplitModel):
    raise TypeError(f"model: expected a SplitModel (sljax.cut(layers, k), sljax.split_model(...)), got "
                    f"{type(model).__name__}")


def _check_optimizers(**optimizers) -> None:
  """Raises a TypeError naming the argument that is not an optax transformation."""
  for name, opt in optimizers.items():
    if not isinstance(opt, optax.GradientTransformation):
      raise TypeError(f"{name}: expected an optax.GradientTransformation (e.g. optax.adam(1e-3)), got "
                      f"{type(opt).__name__}")


def _fresh_encode(codec: codec_lib.Codec, value, key, stream: int):
  """`value` through `codec` from a fresh state (inference keeps no codec state), its randomness
  from fold_in(key, stream), key(0) if `key` is None."""
  key = jax.random.key(0) if key is None else key
  return codec.encode(value, codec.init(value), jax.random.fold_in(key, stream))[0]


def _init_parties(model: SplitModel, key, x, client_optimizer, server_optimizer, *, loss) -> SplitState:
  """Initialises every part on an example batch (see `_init_parts` for the checks).

  Runs as one jitted program (eager initialisation of a CNN takes seconds on a CPU).
  """
  return jax.jit(lambda key, x: _init_parties_traced(model, key, x, client_optimizer, server_optimizer, loss))(
      key, jnp.asarray(x)
  )


def _init_parties_traced(model: SplitModel, key, x, client_optimizer, server_optimizer, loss) -> SplitState:
  parts_vars = _init_parts(model, key, x, loss)
  (pc, sc, spec_c), (ps, ss, spec_s) = parts_vars[:2]
  if model.is_u_shaped:
    pt, st, _ = parts_vars[2]
    pc, sc = {"head": pc, "tail": pt}, {"head": sc, "tail": st}
  client = PartyState(pc, sc, client_optimizer.init(pc), spec_c)
  server = PartyState(ps, ss, server_optimizer.init(ps), spec_s)
  return SplitState(client, server, jnp.zeros((), jnp.int32))


_ROLES = ("client", "server", "tail")


def _init_parts(model: SplitModel, key, x, loss) -> list[tuple[PyTree, PyTree, ArraySpec]]:
  """(params, model state, input spec) of every part, initialised on the example batch `x`.

  The key is split into one key per part, as `SplitModel.compose()` splits it, so the split
  protocols and `centralized` start from the same parameters. Checked here, at trace time, with
  errors that name the argument and the shapes: `x` has a batch axis; each part takes what the
  one before it outputs; the loss takes the last part's outputs with a batch of integer labels
  and returns a scalar (a model given inputs of the wrong rank fails here, not deep in the loss).
  """
  if jnp.ndim(x) == 0:
    raise ValueError(f"x: expected a batch of examples with a leading batch axis, got {describe(x)}")
  keys = jax.random.split(key, len(model.parts))
  parts_vars = []
  h = x
  for i, (part, k) in enumerate(zip(model.parts, keys)):
    try:
      p, s = part.init(k, h)
      out, _ = part.apply(p, s, h, key=None, train=False)
    except InputShapeError as e:
      if i == 0 and e.got == describe(h):
        raise ValueError(f"x: the {_ROLES[i]} half expects shape {e.expected}, got {e.got}") from None
      if i > 0 and e.got == describe(h):
        raise ValueError(f"mismatched halves: the {_ROLES[i - 1]} part outputs shape {e.got}, "
                         f"but the {_ROLES[i]} part expects shape {e.expected}") from None
      raise _part_error(i, h, e) from None  # from a layer inside the part: say what it got
    except Exception as e:  # noqa: BLE001 -- re-raised with the shapes that did not fit
      raise _part_error(i, h, e) from None
    parts_vars.append((p, s, ArraySpec.of(h)))
    h = out
  _check_loss(loss, x, h)
  return parts_vars


def _part_error(i: int, h, e: Exception) -> ValueError:
  if i == 0:
    return ValueError(f"x: the client half cannot take input of shape {describe(h)}: {e}")
  return ValueError(f"mismatched halves: the {_ROLES[i - 1]} part outputs shape {describe(h)}, "
                    f"which the {_ROLES[i]} part cannot take: {e}")


def _check_loss(loss: Callable, x, out) -> None:
  """Raises a ValueError unless `loss(out, labels)` with (B,) integer labels is a scalar."""
  batch = jnp.shape(x)[0]
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  outputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), out)
  try:
    value = jax.eval_shape(loss, outputs, labels)
  except Exception as e:  # noqa: BLE001 -- re-raised with the shapes the loss was given
    default = loss is softmax_cross_entropy
    want = f" (the default loss expects outputs of shape ({batch}, num_classes))" if default else ""
    raise ValueError(f"x: the model maps input of shape {describe(x)} to outputs of shape {describe(out)}, "
                     f"which the loss cannot take with labels of shape ({batch},) int32{want}: {e}") from None
  if getattr(value, "shape", None) != ():
    raise ValueError(f"loss: expected a scalar, got {describe(value)} for outputs of shape {describe(out)} "
                     f"and labels of shape ({batch},) int32")


class Vanilla(NamedTuple):
  """Vanilla split learning: pure legs and their fused composition. Built by `vanilla`.

  Training legs: `client_forward`, `server_step`, `client_backward` (fused: `step`). Inference
  legs: `client_infer`, `server_infer` (fused: `predict`).

  The last fields are the configuration it was built with (the codecs as used: identity when
  none was given; the defense hooks as given, None when none), for code that composes the legs
  differently, e.g. a multi-client server.
  """

  init: Callable[..., SplitState]
  client_forward: Callable[..., tuple[msgs.SmashedData, ClientPending]]
  server_step: Callable[..., tuple[PartyState, msgs.CutGradient, dict]]
  client_backward: Callable[..., PartyState]
  step: Callable[..., tuple[SplitState, dict]]
  predict: Callable[..., tuple[jax.Array, dict]]
  client_infer: Callable[..., msgs.SmashedData]
  server_infer: Callable[..., msgs.Prediction]
  model: SplitModel
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  uplink: codec_lib.Codec
  downlink: codec_lib.Codec
  client_loss: Callable[..., jax.Array] | None = None
  cut_gradient_transform: Callable[..., Any] | None = None


def vanilla(
    model: SplitModel,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    uplink: codec_lib.Codec | None = None,
    downlink: codec_lib.Codec | None = None,
    client_loss: Callable[..., jax.Array] | None = None,
    cut_gradient_transform: Callable[[Any, jax.Array, jax.Array], Any] | None = None,
) -> Vanilla:
  """Vanilla split learning: labels go up with the smashed data.

  Args:
    model: a two-part `SplitModel` (client, server).
    client_optimizer: optax transformation for the client half.
    server_optimizer: optax transformation for the server half.
    loss: `loss(outputs, labels) -> scalar`, computed on the server.
    uplink: codec applied by the client to the smashed data (`sljax.codecs`); the server
      differentiates with respect to the decoded activations. None sends them as they are.
    downlink: codec applied by the server to the cut gradient; the client feeds the decoded
      gradient to its pullback. None sends it as it is.
    client_loss: `client_loss(x, smashed) -> scalar`, or `(x, smashed, key)`, a term the client
      adds to its own objective, e.g. a distance-correlation penalty (NoPeek). It sees the
      smashed data before the uplink codec. The client's gradient becomes pullback(cut gradient)
      plus the term's gradient wrt its params, taken in the same backward pass; the server never
      sees the term. Reported as metrics["client_loss"] (in `ClientPending.metrics` on the legs).
      Its key, when it takes one, is fold_in(client key, CLIENT_LOSS_STREAM).
    cut_gradient_transform: `fn(grad, labels, key) -> grad` applied by the server to the cut
      gradient after computing it and before the downlink codec, e.g. a label-protection
      perturbation (max-norm, Marvell). Pure and jittable; it must keep the gradient's shape and
      dtype. Its key is fold_in(server key, CUT_GRADIENT_STREAM).

  Returns:
    A `Vanilla` trainer: `init(key, x)`, `step(state, (x, y), key)`, `predict(state, x)`, and the
    legs they fuse.

  Stateful codecs (error feedback) size their state from the batch given to `init`: initialise
  with a batch of the training batch size. Error feedback keeps a residual per batch row; rows
  hold different examples from step to step, so on smashed data or cut gradients it mixes
  examples (measured: top-k with error feedback on the uplink trains far worse than without;
  see experiments/benchmarks/codecs.py). Use it where the quantity is summed over steps.

  The client maps the decoded cut gradient back through its uplink codec
  (`sljax.codecs.cotangent`) before its pullback: through a sparsifier exactly (masked to the
  coordinates it sent and rescaled like them, so the client follows the gradient of the loss the
  server computed on what it received), through a quantizer or a cast straight (the usual
  estimator for rounding).

  Example:
    >>> import flax.linen as nn, optax
    >>> model = cut([nn.Dense(16), jax.nn.relu, nn.Dense(10)], 2)
    >>> sl = vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
    >>> x, y = jnp.ones((4, 8)), jnp.zeros((4,), jnp.int32)
    >>> state = sl.init(jax.random.key(0), x)
    >>> state, metrics = jax.jit(sl.step)(state, (x, y), jax.random.key(1))
    >>> int(metrics["bytes_up"]) > 4 * 16 * 4
    True

    A penalty on the smashed data, and noise on the cut gradient the server sends:

    >>> noisy = lambda g, labels, key: g + 1e-3 * jax.random.normal(key, g.shape, g.dtype)
    >>> sl = vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1),
    ...              client_loss=lambda x, h: 0.1 * jnp.mean(h**2), cut_gradient_transform=noisy)
    >>> state, metrics = jax.jit(sl.step)(state, (x, y), jax.random.key(1))
    >>> sorted(metrics)
    ['accuracy', 'bytes_down', 'bytes_up', 'client_loss', 'loss']
  """
  _check_split_model(model)
  _check_optimizers(client_optimizer=client_optimizer, server_optimizer=server_optimizer)
  if model.is_u_shaped:
    raise ValueError("model: vanilla split learning takes a two-part model; this one has a tail (use u_shaped)")
  _check_hook("client_loss", client_loss, "(x, smashed[, key]) -> scalar")
  _check_hook("cut_gradient_transform", cut_gradient_transform, "(grad, labels, key) -> grad")
  up_codec = uplink or codec_lib.identity()
  down_codec = downlink or codec_lib.identity()

  def init(key, x) -> SplitState:
    """Both parties' initial state, as `model.compose()` would initialise the whole model.

    Args:
      key: PRNG key, split among the parts as `SplitModel.compose()` splits it.
      x: an example batch (B, *input shape): the shapes the parties accept, and the batch size
        the codecs' states are sized for (give one of the training batch size).

    Returns:
      A `SplitState`: client and server `PartyState`s and the step count 0.
    """
    state = _init_parties(model, key, x, client_optimizer, server_optimizer, loss=loss)
    cut = jax.ShapeDtypeStruct((x.shape[0], *state.server.input_spec.shape), state.server.input_spec.dtype)
    return state.replace(client=state.client.replace(codec_state=up_codec.init(cut)),
                         server=state.server.replace(codec_state=down_codec.init(cut)))

  def client_forward(client: PartyState, x, labels, key) -> tuple[msgs.SmashedData, ClientPending]:
    """The client's first leg: its half forward under `jax.vjp`, the smashed data through the uplink codec.

    Args:
      client: the client's `PartyState`.
      x: a batch of inputs (B, *input shape), checked against `client.input_spec`.
      labels: integer labels (B,), sent up with the smashed data.
      key: the client's key of this step (its half's randomness, e.g. dropout; the codec's is
        fold_in(key, CODEC_STREAM)).

    Returns:
      The message to send, `SmashedData(activations, labels)`, and the `ClientPending` the client
      keeps for `client_backward` (the pullback, its new model and codec states): never sent.
    """
    check_batch("x", x, client.input_spec)
    check_labels(labels, batch=x.shape[0])
    smashed, pullback, model_state, metrics = _client_vjp(model.client, client_loss, client.params,
                                                          client.model_state, x, key)
    payload, codec_state = up_codec.encode(smashed, client.codec_state, jax.random.fold_in(key, CODEC_STREAM))
    return msgs.SmashedData(payload, labels), ClientPending(pullback, model_state, codec_state, payload, metrics)

  def server_step(server: PartyState, message: msgs.SmashedData, key) -> tuple[PartyState, msgs.CutGradient, dict]:
    """The server's leg: the loss on the decoded smashed data, its update, and the cut gradient.

    Args:
      server: the server's `PartyState`.
      message: the client's `SmashedData` (activations through the uplink codec, and labels).
      key: the server's key of this step (its half's randomness; the downlink codec's is
        fold_in(key, CODEC_STREAM), `cut_gradient_transform`'s fold_in(key, CUT_GRADIENT_STREAM)).

    Returns:
      The updated server, the message to send back, `CutGradient(d loss / d smashed)` (after
      `cut_gradient_transform` and the downlink codec), and metrics `loss` and `accuracy`.
    """
    activations = up_codec.decode(message.activations)
    check_batch("message.activations", activations, server.input_spec)

    def objective(params, h):
      out, model_state = model.server.apply(params, server.model_state, h, key=key, train=True)
      return loss(out, message.labels), (out, model_state)

    (value, (out, model_state)), (g_params, g_smashed) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        server.params, activations
    )
    if cut_gradient_transform is not None:
      g_smashed = _transform_cut_gradient(cut_gradient_transform, g_smashed, message.labels, key)
    payload, codec_state = down_codec.encode(g_smashed, server.codec_state, jax.random.fold_in(key, CODEC_STREAM))
    metrics = {"loss": value, "accuracy": accuracy(out, message.labels)}
    server = apply_update(server, g_params, server_optimizer, model_state).replace(codec_state=codec_state)
    return server, msgs.CutGradient(payload), metrics

  def client_backward(client: PartyState, pending: ClientPending, message: msgs.CutGradient) -> PartyState:
    """The client's last leg: the decoded cut gradient through its pullback, and its update.

    Args:
      client: the client's `PartyState`, as it was at `client_forward`.
      pending: what `client_forward` returned to keep.
      message: the server's `CutGradient`.

    Returns:
      The updated client (params, optimizer, model and codec states).
    """
    (grads,) = pending.pullback(codec_lib.cotangent(up_codec, pending.sent, down_codec.decode(message.grad)))
    return apply_update(client, grads, client_optimizer, pending.model_state).replace(codec_state=pending.codec_state)

  def step(state: SplitState, batch, key) -> tuple[SplitState, dict]:
    """One training step, the three legs fused: `client_forward`, `server_step`, `client_backward`.

    Args:
      state: the `SplitState`.
      batch: `(x, labels)`, shapes (B, *input shape) and (B,).
      key: the step key, split into the client's and the server's.

    Returns:
      The state advanced by one step, and `Metrics`: `loss`, `accuracy` (and `client_loss` with a
      `client_loss` hook), and the exact wire bytes `bytes_up`, `bytes_down` of the two messages.
    """
    x, labels = batch
    k_client, k_server = jax.random.split(key, 2)
    up, pending = client_forward(state.client, x, labels, k_client)
    server, down, metrics = server_step(state.server, up, k_server)
    client = client_backward(state.client, pending, down)
    metrics = Metrics({**metrics, **pending.metrics},
                      {"bytes_up": msgs.wire_size(up), "bytes_down": msgs.wire_size(down)})
    return state.advanced(client, server), metrics

  def client_infer(client: PartyState, x, key=None) -> msgs.SmashedData:
    """Inference, the client's leg: its half in eval mode, through the uplink codec, no labels.

    The codec starts from a fresh state (no error feedback at inference); its randomness is
    fold_in(key, CODEC_STREAM), with key(0) if `key` is None.

    Args:
      client: the client's `PartyState`.
      x: a batch of inputs (B, *input shape).
      key: the codec's randomness, or None.

    Returns:
      The message to send, `SmashedData(activations)` without labels.
    """
    check_batch("x", x, client.input_spec)
    smashed, _ = model.client.apply(client.params, client.model_state, x, key=None, train=False)
    return msgs.SmashedData(_fresh_encode(up_codec, smashed, key, CODEC_STREAM))

  def server_infer(server: PartyState, message: msgs.SmashedData) -> msgs.Prediction:
    """Inference, the server's leg: its half in eval mode on the decoded smashed data.

    Args:
      server: the server's `PartyState`.
      message: the client's `SmashedData` from `client_infer`.

    Returns:
      The message to send back, `Prediction(logits)`.
    """
    activations = up_codec.decode(message.activations)
    check_batch("message.activations", activations, server.input_spec)
    out, _ = model.server.apply(server.params, server.model_state, activations, key=None, train=False)
    return msgs.Prediction(out)

  def predict(state: SplitState, x, key=None) -> tuple[jax.Array, dict]:
    """Collaborative inference: `client_infer` then `server_infer`; the outputs and the bytes."""
    up = client_infer(state.client, x, key)
    down = server_infer(state.server, up)
    return down.logits, Metrics({}, {"bytes_up": msgs.wire_size(up), "bytes_down": msgs.wire_size(down)})

  return Vanilla(init=init, client_forward=client_forward, server_step=server_step, client_backward=client_backward,
                 step=step, predict=predict, client_infer=client_infer, server_infer=server_infer, model=model,
                 client_optimizer=client_optimizer, server_optimizer=server_optimizer, loss=loss, uplink=up_codec,
                 downlink=down_codec, client_loss=client_loss, cut_gradient_transform=cut_gradient_transform)


class UShaped(NamedTuple):
  """U-shaped split learning: pure legs and their fused composition. Built by `u_shaped`; the last
  fields are its configuration, as in `Vanilla`.

  Inference legs: `client_infer` (head), `server_infer` (body), `client_tail_infer` (tail);
  fused: `predict`.
  """

  init: Callable[..., SplitState]
  client_forward: Callable[..., tuple[msgs.SmashedData, ClientPending]]
  server_forward: Callable[..., tuple[msgs.BodyOutput, ServerPending]]
  client_tail_step: Callable[..., tuple[msgs.TailGradient, TailPending, dict]]
  server_backward: Callable[..., tuple[PartyState, msgs.CutGradient]]
  client_backward: Callable[..., PartyState]
  step: Callable[..., tuple[SplitState, dict]]
  predict: Callable[..., tuple[jax.Array, dict]]
  client_infer: Callable[..., msgs.SmashedData]
  server_infer: Callable[..., msgs.BodyOutput]
  client_tail_infer: Callable[..., jax.Array]
  model: SplitModel
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  uplink: codec_lib.Codec
  downlink: codec_lib.Codec
  client_loss: Callable[..., jax.Array] | None = None


def u_shaped(
    model: SplitModel,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    uplink: codec_lib.Codec | None = None,
    downlink: codec_lib.Codec | None = None,
    client_loss: Callable[..., jax.Array] | None = None,
) -> UShaped:
  """U-shaped split learning: the labels and the loss stay on the client.

  The client holds the head (`model.client`) and the tail (`model.tail`); its params are
  `{"head": ..., "tail": ...}` under one client optimizer. The server holds the body.

  `uplink` encodes both messages the client sends (the smashed data and the gradient at the
  body's output), `downlink` both the server sends (the body's output and the cut gradient); each
  message keeps its own codec state (`codec_state` of the client: {"smashed", "tail_grad"}; of the
  server: {"body", "cut_grad"}). A gradient at an encoded activation is mapped back through that
  activation's codec (`sljax.codecs.cotangent`) by its sender, as in `vanilla`.

  `client_loss(x, smashed[, key]) -> scalar` is a term the client adds to its objective on the
  head's smashed data, as in `vanilla`; reported as metrics["client_loss"] (by `client_tail_step`).
  A label-protecting `cut_gradient_transform` has no place here: the labels never leave the client.

  Args:
    model: a three-part `SplitModel` (client head, server body, client tail): `cut(layers, k, k2)`.
    client_optimizer: optax transformation for the client's head and tail together.
    server_optimizer: optax transformation for the server's body.
    loss: `loss(outputs, labels) -> scalar`, computed on the client.
    uplink: codec of the messages the client sends; None sends them as they are.
    downlink: codec of the messages the server sends; None sends them as they are.
    client_loss: `client_loss(x, smashed[, key]) -> scalar`, a term of the client's objective.

  Returns:
    A `UShaped` trainer: `init(key, x)`, `step(state, (x, y), key)`, `predict(state, x)`, and the
    legs they fuse.

  Example:
    >>> import flax.linen as nn, optax
    >>> model = cut([nn.Dense(16), nn.Dense(16), nn.Dense(10)], 1, 2)
    >>> sl = u_shaped(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1),
    ...               client_loss=lambda x, h: 0.1 * jnp.mean(h**2))
    >>> x, y = jnp.ones((4, 8)), jnp.zeros((4,), jnp.int32)
    >>> state = sl.init(jax.random.key(0), x)
    >>> state, metrics = jax.jit(sl.step)(state, (x, y), jax.random.key(1))
    >>> float(metrics["client_loss"]) >= 0
    True
  """
  _check_split_model(model)
  _check_optimizers(client_optimizer=client_optimizer, server_optimizer=server_optimizer)
  if not model.is_u_shaped:
    raise ValueError("model: U-shaped split learning takes a three-part model (cut(layers, k, k2))")
  _check_hook("client_loss", client_loss, "(x, smashed[, key]) -> scalar")

  up_codec = uplink or codec_lib.identity()
  down_codec = downlink or codec_lib.identity()

  def init(key, x) -> SplitState:
    """Both parties' initial state (the client's params `{"head", "tail"}`), as in `Vanilla.init`.

    Args:
      key: PRNG key, split among the head, body and tail as `SplitModel.compose()` splits it.
      x: an example batch (B, *input shape); the codecs' states are sized for its batch size.

    Returns:
      A `SplitState`: the client (head and tail) and the server (body), and the step count 0.
    """
    state = _init_parties(model, key, x, client_optimizer, server_optimizer, loss=loss)
    b = x.shape[0]
    cut = jax.ShapeDtypeStruct((b, *state.server.input_spec.shape), state.server.input_spec.dtype)
    body = jax.eval_shape(lambda p, s, h: model.server.apply(p, s, h, key=None, train=False)[0],
                          state.server.params, state.server.model_state, cut)
    return state.replace(
        client=state.client.replace(codec_state={"smashed": up_codec.init(cut), "tail_grad": up_codec.init(body)}),
        server=state.server.replace(codec_state={"body": down_codec.init(body), "cut_grad": down_codec.init(cut)}))

  def client_forward(client: PartyState, x, key) -> tuple[msgs.SmashedData, ClientPending]:
    """The client's first leg: the head forward under `jax.vjp`, through the uplink codec; no labels.

    Args:
      client: the client's `PartyState` (head and tail).
      x: a batch of inputs (B, *input shape).
      key: the head's key of this step (the codec's is fold_in(key, CODEC_STREAM)).

    Returns:
      The message to send, `SmashedData(activations)` (no labels: they stay on the client), and
      the `ClientPending` kept for `client_tail_step` and `client_backward`.
    """
    check_batch("x", x, client.input_spec)
    smashed, pullback, model_state, metrics = _client_vjp(model.client, client_loss, client.params["head"],
                                                          client.model_state["head"], x, key)
    payload, codec_state = up_codec.encode(smashed, client.codec_state["smashed"],
                                           jax.random.fold_in(key, CODEC_STREAM))
    return msgs.SmashedData(payload), ClientPending(pullback, model_state, codec_state, payload, metrics)

  def server_forward(server: PartyState, message: msgs.SmashedData, key) -> tuple[msgs.BodyOutput, ServerPending]:
    """The server's first leg: the body forward under `jax.vjp` on the decoded smashed data.

    Args:
      server: the server's `PartyState` (the body).
      message: the client's `SmashedData`.
      key: the body's key of this step (the downlink codec's is fold_in(key, CODEC_STREAM)).

    Returns:
      The message to send, `BodyOutput(activations)` through the downlink codec, and the
      `ServerPending` kept for `server_backward` (the body's pullback): never sent.
    """
    activations = up_codec.decode(message.activations)
    check_batch("message.activations", activations, server.input_spec)

    def f(params, h):
      return model.server.apply(params, server.model_state, h, key=key, train=True)

    body, pullback, model_state = jax.vjp(f, server.params, activations, has_aux=True)
    codec_key = jax.random.fold_in(key, CODEC_STREAM)
    payload, body_codec = down_codec.encode(body, server.codec_state["body"], codec_key)
    codec_state = {**server.codec_state, "body": body_codec}
    return msgs.BodyOutput(payload), ServerPending(pullback, model_state, codec_state, jax.random.fold_in(codec_key, 1),
                                                   payload)

  def client_tail_step(
      client: PartyState, pending: ClientPending, message: msgs.BodyOutput, labels, key
  ) -> tuple[msgs.TailGradient, TailPending, dict]:
    """The client's middle leg: the tail and the loss on the decoded body output, with its labels.

    Args:
      client: the client's `PartyState`.
      pending: what `client_forward` returned to keep.
      message: the server's `BodyOutput`.
      labels: integer labels (B,); they never leave the client.
      key: the tail's key of this step (the uplink codec's is fold_in(key, CODEC_STREAM)).

    Returns:
      The message to send, `TailGradient(d loss / d body output)` through the uplink codec; the
      `TailPending` kept for `client_backward` (the tail's gradients, the head's pending); and
      metrics `loss`, `accuracy` (and `client_loss` with a `client_loss` hook).
    """
    body = down_codec.decode(message.activations)
    check_labels(labels, batch=body.shape[0])

    def objective(params, h):
      out, model_state = model.tail.apply(params, client.model_state["tail"], h, key=key, train=True)
      return loss(out, labels), (out, model_state)

    (value, (out, tail_state)), (g_tail, g_body) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        client.params["tail"], body
    )
    metrics = {"loss": value, "accuracy": accuracy(out, labels), **pending.metrics}
    payload, tail_codec = up_codec.encode(g_body, client.codec_state["tail_grad"],
                                          jax.random.fold_in(key, CODEC_STREAM))
    codec_state = {"smashed": pending.codec_state, "tail_grad": tail_codec}
    return msgs.TailGradient(payload), TailPending(pending, g_tail, tail_state, codec_state), metrics

  def server_backward(
      server: PartyState, pending: ServerPending, message: msgs.TailGradient
  ) -> tuple[PartyState, msgs.CutGradient]:
    """The server's last leg: the decoded tail gradient through the body's pullback, and its update.

    Args:
      server: the server's `PartyState`, as it was at `server_forward`.
      pending: what `server_forward` returned to keep.
      message: the client's `TailGradient`.

    Returns:
      The updated server, and the message to send, `CutGradient(d loss / d smashed)` through the
      downlink codec.
    """
    g_body = codec_lib.cotangent(down_codec, pending.sent, up_codec.decode(message.grad))
    g_params, g_smashed = pending.pullback(g_body)
    payload, cut_codec = down_codec.encode(g_smashed, pending.codec_state["cut_grad"], pending.codec_key)
    updated = apply_update(server, g_params, server_optimizer, pending.model_state)
    return updated.replace(codec_state={**pending.codec_state, "cut_grad": cut_codec}), msgs.CutGradient(payload)

  def client_backward(client: PartyState, pending: TailPending, message: msgs.CutGradient) -> PartyState:
    """The client's last leg: the cut gradient through the head's pullback; head and tail updated.

    Args:
      client: the client's `PartyState`, as it was at `client_forward`.
      pending: what `client_tail_step` returned to keep.
      message: the server's `CutGradient`.

    Returns:
      The updated client: head and tail params under the one client optimizer, model and codec states.
    """
    (g_head,) = pending.head.pullback(codec_lib.cotangent(up_codec, pending.head.sent, down_codec.decode(message.grad)))
    grads = {"head": g_head, "tail": pending.tail_grads}
    updated = apply_update(client, grads, client_optimizer,
                           {"head": pending.head.model_state, "tail": pending.tail_state})
    return updated.replace(codec_state=pending.codec_state)

  def step(state: SplitState, batch, key) -> tuple[SplitState, dict]:
    """One training step, the five legs fused: `client_forward`, `server_forward`, `client_tail_step`,
    `server_backward`, `client_backward`.

    Args:
      state: the `SplitState`.
      batch: `(x, labels)`, shapes (B, *input shape) and (B,); the labels stay on the client.
      key: the step key, split into the head's, the body's and the tail's.

    Returns:
      The state advanced by one step, and `Metrics`: `loss`, `accuracy` (and `client_loss`), and
      the exact wire bytes up (smashed data and tail gradient) and down (body output and cut gradient).
    """
    x, labels = batch
    k_head, k_body, k_tail = jax.random.split(key, 3)
    up1, head_pending = client_forward(state.client, x, k_head)
    down1, server_pending = server_forward(state.server, up1, k_body)
    up2, tail_pending, metrics = client_tail_step(state.client, head_pending, down1, labels, k_tail)
    server, down2 = server_backward(state.server, server_pending, up2)
    client = client_backward(state.client, tail_pending, down2)
    metrics = Metrics(metrics, {
        "bytes_up": msgs.wire_size(up1) + msgs.wire_size(up2),
        "bytes_down": msgs.wire_size(down1) + msgs.wire_size(down2),
    })
    return state.advanced(client, server), metrics

  def client_infer(client: PartyState, x, key=None) -> msgs.SmashedData:
    """Inference, the head's leg: in eval mode, through the uplink codec from a fresh state, its
    randomness fold_in(key, CODEC_STREAM) (key(0) if None), as `Vanilla.client_infer`.

    Args:
      client: the client's `PartyState`.
      x: a batch of inputs (B, *input shape).
      key: the codec's randomness, or None.

    Returns:
      The message to send, `SmashedData(activations)`.
    """
    check_batch("x", x, client.input_spec)
    smashed, _ = model.client.apply(client.params["head"], client.model_state["head"], x, key=None, train=False)
    return msgs.SmashedData(_fresh_encode(up_codec, smashed, key, CODEC_STREAM))

  def server_infer(server: PartyState, message: msgs.SmashedData, key=None) -> msgs.BodyOutput:
    """Inference, the body's leg: in eval mode on the decoded smashed data; its output through the
    downlink codec from a fresh state, its randomness fold_in(key, CODEC_STREAM + 1) (key(0) if None).

    Args:
      server: the server's `PartyState`.
      message: the client's `SmashedData` from `client_infer`.
      key: the codec's randomness, or None.

    Returns:
      The message to send back, `BodyOutput(activations)`.
    """
    activations = up_codec.decode(message.activations)
    check_batch("message.activations", activations, server.input_spec)
    body, _ = model.server.apply(server.params, server.model_state, activations, key=None, train=False)
    return msgs.BodyOutput(_fresh_encode(down_codec, body, key, CODEC_STREAM + 1))

  def client_tail_infer(client: PartyState, message: msgs.BodyOutput) -> jax.Array:
    """Inference, the tail's leg: the outputs of the tail in eval mode on the decoded body output.

    Args:
      client: the client's `PartyState`.
      message: the server's `BodyOutput` from `server_infer`.

    Returns:
      The model's outputs (B, ...), e.g. logits; they never leave the client.
    """
    body = down_codec.decode(message.activations)
    out, _ = model.tail.apply(client.params["tail"], client.model_state["tail"], body, key=None, train=False)
    return out

  def predict(state: SplitState, x, key=None) -> tuple[jax.Array, dict]:
    """Collaborative inference through both codecs: `client_infer`, `server_infer`, then
    `client_tail_infer`, each codec from a fresh state; the outputs and the bytes."""
    up = client_infer(state.client, x, key)
    down = server_infer(state.server, up, key)
    out = client_tail_infer(state.client, down)
    return out, Metrics({}, {"bytes_up": msgs.wire_size(up), "bytes_down": msgs.wire_size(down)})

  return UShaped(init=init, client_forward=client_forward, server_forward=server_forward,
                 client_tail_step=client_tail_step, server_backward=server_backward, client_backward=client_backward,
                 step=step, predict=predict, client_infer=client_infer, server_infer=server_infer,
                 client_tail_infer=client_tail_infer, model=model, client_optimizer=client_optimizer,
                 server_optimizer=server_optimizer, loss=loss, uplink=up_codec, downlink=down_codec,
                 client_loss=client_loss)


class Centralized(NamedTuple):
  """The composed model trained in one place: the reference for split training. Built by `centralized`."""

  init: Callable[..., PartyState]
  step: Callable[..., tuple[PartyState, dict]]
  predict: Callable[..., tuple[jax.Array, dict]]


def centralized(
    model: SplitModel,
    *,
    optimizer: optax.GradientTransformation,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Centralized:
  """Centralized training of `model.compose()`: params are a tuple with one entry per part.

  With the same optimizer on both halves (any element-wise optax transformation, e.g. sgd or
  adam), split training follows this exactly; the tests hold it to that.

  Args:
    model: the split model whose parts are trained as one (`SplitModel.compose()`).
    optimizer: the optax optimizer of the whole model.
    loss: `loss(outputs, labels) -> scalar`, as for the split protocols.

  Returns:
    A `Centralized`: `init(key, x)`, `step(state, (x, labels), key)` and `predict(state, x)`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sljax
    >>> model = sljax.cut(sljax.models.mlp(hidden=(16,)), 1)
    >>> x, y = jnp.ones((4, 8)), jnp.array([0, 1, 2, 3])
    >>> whole = centralized(model, optimizer=optax.sgd(0.1))
    >>> sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
    >>> _, whole_metrics = jax.jit(whole.step)(whole.init(jax.random.key(0), x), (x, y), jax.random.key(1))
    >>> _, split_metrics = jax.jit(sl.step)(sl.init(jax.random.key(0), x), (x, y), jax.random.key(1))
    >>> bool(jnp.allclose(whole_metrics["loss"], split_metrics["loss"]))  # split equals centralized
    True
  """
  _check_split_model(model)
  _check_optimizers(optimizer=optimizer)
  whole = model.compose()

  @jax.jit
  def init(key, x) -> PartyState:
    """The whole model's initial state: params and model state a tuple with one entry per part.

    Args:
      key: PRNG key, split among the parts as `SplitModel.compose()` splits it.
      x: an example batch (B, *input shape).

    Returns:
      One `PartyState` holding the whole model.
    """
    # The parts one by one, as `whole.init` would (same keys), with the checks of the split protocols.
    parts_vars = _init_parts(model, key, x, loss)
    params, model_state = tuple(p for p, _, _ in parts_vars), tuple(s for _, s, _ in parts_vars)
    return PartyState(params, model_state, optimizer.init(params), ArraySpec.of(x))

  def step(state: PartyState, batch, key) -> tuple[PartyState, dict]:
    """One training step of the whole model on `batch = (x, labels)`; `key` split among the parts.

    Returns:
      The updated state, and `Metrics`: `loss`, `accuracy`, and `bytes_up`, `bytes_down` (0).
    """
    x, labels = batch
    check_batch("x", x, state.input_spec)
    check_labels(labels, batch=x.shape[0])

    def objective(params):
      out, model_state = whole.apply(params, state.model_state, x, key=key, train=True)
      return loss(out, labels), (out, model_state)

    (value, (out, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    metrics = Metrics({"loss": value, "accuracy": accuracy(out, labels)}, {"bytes_up": 0, "bytes_down": 0})
    return apply_update(state, grads, optimizer, model_state), metrics

  def predict(state: PartyState, x) -> tuple[jax.Array, dict]:
    """Inference in eval mode: the outputs (B, ...) on `x`, and `Metrics` of 0 bytes."""
    check_batch("x", x, state.input_spec)
    out, _ = whole.apply(state.params, state.model_state, x, key=None, train=False)
    return out, Metrics({}, {"bytes_up": 0, "bytes_down": 0})

  return Centralized(init, step, predict)
