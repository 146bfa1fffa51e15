"""A client half to take to the device: its legs as serialized StableHLO, with its parameters.

The party that owns a client half (a phone, a hospital's server, an embedded board) runs it
without the model's Python code and never receives the server's half. `export_client` writes one
artifact (bytes) holding

- three functions, each exported with `jax.export` (serialized StableHLO, for the platforms
  asked): `infer` (the half in eval mode: smashed data for inference), `forward` (the training
  forward: the smashed data sent up) and `backward` (given the cut gradient, the new params,
  model state and optimizer state);
- the client's state: its params, model state (e.g. batch statistics) and optimizer state, as
  `flax.serialization` state dicts in msgpack (nothing is pickled);
- a description: the input and smashed-data shapes, the layers, the versions.

`load_client` reads it back with nothing but jax, flax.serialization and this module: this file
imports no other part of sljax at load time, so it can be copied to a device that does not have
sljax installed. The legs are pure functions of the state, as the protocol's are:

    dev = load_client(blob)
    smashed, pending = dev.forward(dev.state, x, key)          # send `smashed` (and the labels) up
    state = dev.backward(dev.state, pending, cut_gradient)     # the cut gradient that came down

`forward` and `backward` are the vanilla protocol's own legs (`client_forward`, `client_backward`)
exported as they are. The pullback of `client_forward` is a closure and cannot be serialized, so
the exported `backward` recomputes the forward from `pending` (the batch and the key, kept on the
device) and pulls the cut gradient back through it: the same messages and the same updated state
as the library's legs, at the cost of a second forward pass on the device.

Supported: vanilla split learning without codecs, with or without a `client_loss`. Refused with
an error naming what is not supported: U-shaped protocols and codecs on either link.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

PyTree = Any

__all__ = ["ArtifactError", "ClientDevice", "DevicePending", "DeviceState", "export_client", "load_client",
           "restore_client"]

MAGIC = b"SLJAX-CLIENT\x00"
FORMAT_VERSION = 1
_DIGEST = 32  # sha256
_FUNCTIONS = ("infer", "forward", "backward")


class ArtifactError(ValueError):
  """An artifact that cannot be loaded: not one, corrupted, truncated or of an unknown version."""


class DeviceState(NamedTuple):
  """What the device holds and trains: params, model state and optimizer state.

  Each is a `flax.serialization` state dict (nested dicts with string keys, numpy or jax arrays
  as leaves), so it needs no Python class of the model or the optimizer. `restore_client` turns
  it back into the library's `PartyState`.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree


class DevicePending(NamedTuple):
  """What the device keeps between its forward and its backward: the batch and the step key."""

  x: jax.Array
  key: jax.Array


class ClientDevice(NamedTuple):
  """A loaded client half: its state and its pure legs. Made by `load_client`.

  Attributes:
    state: the state the artifact holds (the client's when it was exported).
    infer: `infer(state, x) -> smashed`: the half in eval mode, for inference.
    forward: `forward(state, x, key) -> (smashed, pending)`: a training step's forward; `smashed`
      goes up (with the labels, in vanilla split learning); `pending` stays on the device.
    backward: `backward(state, pending, cut_gradient) -> state`: the cut gradient that came down
      pulled back through the forward, and one optimizer step.
    input_shape, input_dtype: what `x` must be; `input_shape[0]` is None when any batch size goes.
    smashed_shape, smashed_dtype: the smashed data, and so the cut gradient.
    layer_names: the layers of the half.
    metadata: the artifact's description (versions, platforms, ...), a JSON-able dict.
    functions: the serialized exported functions, by name (`to_bytes` writes them back).
  """

  state: DeviceState
  infer: Callable[..., jax.Array]
  forward: Callable[..., tuple[jax.Array, DevicePending]]
  backward: Callable[..., DeviceState]
  input_shape: tuple[int | None, ...]
  input_dtype: str
  smashed_shape: tuple[int | None, ...]
  smashed_dtype: str
  layer_names: tuple[str, ...]
  metadata: dict
  functions: dict

  def to_bytes(self, state: DeviceState | None = None) -> bytes:
    """The artifact with `state` (the loaded state if None): to persist what the device trained."""
    return _pack(self.metadata, self.functions, self.state if state is None else state)


def _device_state(client: Any) -> DeviceState:
  """A `PartyState`'s params, model state and optimizer state as state dicts."""
  return DeviceState(*(serialization.to_state_dict(t) for t in (client.params, client.model_state, client.opt_state)))


def _pack(metadata: dict, functions: dict, state: DeviceState) -> bytes:
  payload = serialization.msgpack_serialize({
      "format": FORMAT_VERSION,
      "metadata": json.dumps(metadata, sort_keys=True),
      "functions": {name: bytes(functions[name]) for name in _FUNCTIONS},
      "state": {"params": _numpy(state.params), "model_state": _numpy(state.model_state),
                "opt_state": _numpy(state.opt_state)},
  })
  return MAGIC + hashlib.sha256(payload).digest() + payload


def _numpy(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, tree)


def export_client(sl: Any, client: Any, x: Any, *, any_batch: bool = True,
                  platforms: Sequence[str] | None = None) -> bytes:
  """The client half of a vanilla protocol and its state, as a self-contained artifact.

  Args:
    sl: a protocol made by `sljax.vanilla`, without codecs.
    client: the client's `PartyState` (e.g. `state.client` after `sl.init` or training).
    x: an example input batch (an array or a `jax.ShapeDtypeStruct`); only its shape and dtype
      are read.
    any_batch: export for any batch size (a symbolic batch axis); False fixes `x.shape[0]`.
    platforms: the platforms to export for, e.g. ("cpu", "cuda"); None is jax's default backend.

  Returns:
    The artifact's bytes: `load_client` reads them. It holds the client's half only.

  Raises:
    ValueError: for what cannot be exported (U-shaped protocols, codecs), or an `x` the half
      does not take.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8, 8)), 1),
    ...                    client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
    >>> x = jnp.ones((4, 64))
    >>> state = sl.init(jax.random.key(0), x)
    >>> dev = load_client(export_client(sl, state.client, x))
    >>> smashed, pending = dev.forward(dev.state, x, jax.random.key(1))
    >>> smashed.shape, dev.smashed_shape
    ((4, 8), (None, 8))
  """
  # Imported here, not at the top: a device loads this file with jax and flax only (module docstring).
  from sljax import codecs, messages, protocol

  _check_exportable(sl, client, codecs, protocol)
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None or len(shape) == 0:
    raise ValueError(f"x: expected an example batch (an array or jax.ShapeDtypeStruct with a batch axis), got "
                     f"{type(x).__name__ if shape is None else f'{tuple(shape)} {np.dtype(dtype).name}'}")
  protocol.check_batch("x", x, client.input_spec)
  batch = jax.export.symbolic_shape("batch")[0] if any_batch else shape[0]
  x_spec = jax.ShapeDtypeStruct((batch, *shape[1:]), dtype)
  key_spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  state = _device_state(client)

  # Each function takes the state as a plain tuple of state dicts: what jax.export can serialize.
  def forward_leg(s, x, key):
    # The labels ride in the uplink message but never enter the client's computation.
    labels = jnp.zeros(x.shape[:1], jnp.int32)
    return sl.client_forward(restore_client(client, DeviceState(*s)), x, labels, key)

  def infer(s, x):
    return sl.client_infer(restore_client(client, DeviceState(*s)), x).activations

  def forward(s, x, key):
    return forward_leg(s, x, key)[0].activations

  def backward(s, x, key, cut_gradient):
    _, pending = forward_leg(s, x, key)  # the pullback cannot be serialized: recompute it here
    updated = sl.client_backward(restore_client(client, DeviceState(*s)), pending, messages.CutGradient(cut_gradient))
    return tuple(_device_state(updated))

  state_spec = tuple(jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tuple(state)))
  smashed = jax.eval_shape(forward, state_spec, x_spec, key_spec)
  exported = {name: jax.export.export(jax.jit(fn), platforms=platforms)(*specs) for name, fn, specs in (
      ("infer", infer, (state_spec, x_spec)),
      ("forward", forward, (state_spec, x_spec, key_spec)),
      ("backward", backward, (state_spec, x_spec, key_spec, smashed)),
  )}
  metadata = {
      "format": FORMAT_VERSION,
      "jax_version": jax.__version__,
      "platforms": list(exported["infer"].platforms),
      "input": {"shape": [None if any_batch else shape[0], *map(int, shape[1:])], "dtype": np.dtype(dtype).name},
      "smashed": {"shape": [None if any_batch else shape[0], *map(int, smashed.shape[1:])],
                  "dtype": np.dtype(smashed.dtype).name},
      "key_impl": str(jax.random.key_impl(jax.random.key(0))),
      "layer_names": list(sl.model.client.layer_names),
      "client_loss": sl.client_loss is not None,
  }
  return _pack(metadata, {name: e.serialize() for name, e in exported.items()}, state)


def _check_exportable(sl, client, codecs, protocol) -> None:
  if not isinstance(sl, protocol.Vanilla):
    raise ValueError(f"sl: expected a vanilla protocol (sljax.vanilla); the export of a U-shaped client (head and "
                     f"tail) is not supported yet, got {type(sl).__name__}")
  for link in ("uplink", "downlink"):
    description = codecs.describe(getattr(sl, link))
    if description != {"name": "identity"}:
      raise ValueError(f"sl: the exported client supports no codec yet; expected no {link} codec, got "
                       f"{json.dumps(description, sort_keys=True)}")
  if not isinstance(client, protocol.PartyState):
    raise TypeError(f"client: expected the client's PartyState (state.client), got {type(client).__name__}")


def restore_client(client: Any, state: DeviceState) -> Any:
  """The library's `PartyState` for the client with the device's `state` (e.g. after training on it).

  Args:
    client: the client's `PartyState` the artifact was exported from (its structure is the template).
    state: a `DeviceState` from a `ClientDevice`.

  Returns:
    `client` with the params, model state and optimizer state of `state`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8, 8)), 1),
    ...                    client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
    >>> x = jnp.ones((4, 64))
    >>> state = sl.init(jax.random.key(0), x)
    >>> dev = load_client(export_client(sl, state.client, x))
    >>> smashed, pending = dev.forward(dev.state, x, jax.random.key(1))
    >>> trained = dev.backward(dev.state, pending, jnp.ones_like(smashed))
    >>> client = restore_client(state.client, trained)
    >>> type(client).__name__, jax.tree.structure(client.params) == jax.tree.structure(state.client.params)
    ('PartyState', True)
    >>> any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(client.params), jax.tree.leaves(state.client.params)))
    True
  """
  return client.replace(params=serialization.from_state_dict(client.params, state.params),
                        model_state=serialization.from_state_dict(client.model_state, state.model_state),
                        opt_state=serialization.from_state_dict(client.opt_state, state.opt_state))


def load_client(artifact: bytes) -> ClientDevice:
  """Loads an artifact made by `export_client`: the client half's legs and state.

  Needs jax and flax.serialization only, not the model's code nor the rest of sljax.

  Args:
    artifact: the bytes `export_client` (or `ClientDevice.to_bytes`) wrote.

  Returns:
    The `ClientDevice`: the state the artifact holds and the half's pure legs.

  Raises:
    ArtifactError: if `artifact` is not an sljax client artifact, is truncated or corrupted (its
      sha256 does not match), or was written by a newer format version.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8, 8)), 1),
    ...                    client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
    >>> x = jnp.ones((4, 64))
    >>> dev = load_client(export_client(sl, sl.init(jax.random.key(0), x).client, x))
    >>> dev.layer_names, dev.input_shape, dev.infer(dev.state, x).shape
    (('hidden_0',), (None, 64), (4, 8))
  """
  if not isinstance(artifact, (bytes, bytearray, memoryview)):
    raise TypeError(f"artifact: expected bytes, got {type(artifact).__name__}")
  artifact = bytes(artifact)
  if not artifact.startswith(MAGIC):
    raise ArtifactError(f"artifact: not an sljax client artifact (expected it to start with {MAGIC!r}, got "
                        f"{artifact[:len(MAGIC)]!r})")
  digest, payload = artifact[len(MAGIC):len(MAGIC) + _DIGEST], artifact[len(MAGIC) + _DIGEST:]
  if hashlib.sha256(payload).digest() != digest:
    raise ArtifactError(f"artifact: corrupted or truncated (its sha256 does not match its {len(payload)} bytes of "
                        f"contents)")
  try:
    contents = serialization.msgpack_restore(payload)
    version = contents["format"]
  except Exception as e:  # noqa: BLE001 -- any failure to parse is a bad artifact
    raise ArtifactError(f"artifact: cannot be read: {e}") from None
  if version != FORMAT_VERSION:
    raise ArtifactError(f"artifact: format version {version}, this sljax reads version {FORMAT_VERSION}")
  metadata = json.loads(contents["metadata"])
  functions = {name: contents["functions"][name] for name in _FUNCTIONS}
  try:
    exported = {name: jax.export.deserialize(bytearray(blob)) for name, blob in functions.items()}
  except Exception as e:  # noqa: BLE001 -- e.g. a serialization version this jax does not read
    raise ArtifactError(f"artifact: its functions (exported with jax {metadata.get('jax_version')}) cannot be read "
                        f"by jax {jax.__version__}: {e}") from None
  calls = {name: jax.jit(e.call) for name, e in exported.items()}
  s = contents["state"]
  state = DeviceState(s["params"], s["model_state"], s["opt_state"])
  input_shape, input_dtype = tuple(metadata["input"]["shape"]), metadata["input"]["dtype"]

  def check_x(x):
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    ok = (shape is not None and len(shape) == len(input_shape) and np.dtype(dtype).name == input_dtype
          and all(want is None or want == got for want, got in zip(input_shape, shape, strict=True)))
    if not ok:
      want = "(" + ", ".join("B" if d is None else str(d) for d in input_shape) + f") {input_dtype}"
      got = f"{tuple(shape)} {np.dtype(dtype).name}" if shape is not None else type(x).__name__
      raise ValueError(f"x: expected shape {want}, got {got}")

  def check_key(key):
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if not typed or key.shape != () or str(jax.random.key_impl(key)) != metadata["key_impl"]:
      got = f"{tuple(key.shape)} {dtype}" if dtype is not None else type(key).__name__
      raise ValueError(f"key: expected one typed PRNG key of the {metadata['key_impl']} implementation "
                       f"(jax.random.key(seed)), got {got}")

  def infer(state: DeviceState, x) -> jax.Array:
    check_x(x)
    return calls["infer"](tuple(state), x)

  def forward(state: DeviceState, x, key) -> tuple[jax.Array, DevicePending]:
    check_x(x)
    check_key(key)
    return calls["forward"](tuple(state), x, key), DevicePending(x, key)

  def backward(state: DeviceState, pending: DevicePending, cut_gradient) -> DeviceState:
    return DeviceState(*calls["backward"](tuple(state), pending.x, pending.key, cut_gradient))

  return ClientDevice(state=state, infer=infer, forward=forward, backward=backward, input_shape=input_shape,
                      input_dtype=input_dtype, smashed_shape=tuple(metadata["smashed"]["shape"]),
                      smashed_dtype=metadata["smashed"]["dtype"], layer_names=tuple(metadata["layer_names"]),
                      metadata=metadata, functions=functions)
