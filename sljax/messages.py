"""The messages that cross the cut, as pytrees, and their wire bytes.

Each message is a frozen `flax.struct.dataclass` whose array fields are what travels. On the wire
a message is one msgpack map (flax.serialization's encoding of arrays):

    {"sljax": PROTOCOL_VERSION, "kind": "<class name>", "body": {<field>: <array or nil>, ...}}

The byte count reported by every step is the length of exactly these bytes. It depends only on
the shapes and dtypes of the fields, so it is computed once per shape at trace time (`wire_size`)
and is exact, not an estimate: a test checks it against `len(to_bytes(msg))`.
"""

from __future__ import annotations

import functools
import reprlib
from typing import Any, TypeVar

import jax
import msgpack
import numpy as np
from flax import serialization, struct

PROTOCOL_VERSION = 1

M = TypeVar("M")


class MessageError(ValueError):
  """A message that cannot be accepted: malformed, truncated, oversized, or not what was expected."""


@struct.dataclass
class SmashedData:
  """Uplink: activations at the cut, with the labels in vanilla split learning.

  In U-shaped split learning and in inference `labels` is None and no label bytes are sent.
  """

  activations: Any
  labels: Any = None


@struct.dataclass
class CutGradient:
  """Downlink: d loss / d activations at the (first) cut."""

  grad: Any


@struct.dataclass
class BodyOutput:
  """U-shaped downlink: the server body's output, sent to the client's tail."""

  activations: Any


@struct.dataclass
class TailGradient:
  """U-shaped uplink: d loss / d body output, computed by the client's tail."""

  grad: Any


@struct.dataclass
class Prediction:
  """Inference downlink in vanilla split learning: the server's outputs (e.g. logits)."""

  logits: Any


@struct.dataclass
class ModelWeights:
  """Either direction, in SplitFed and FedAvg: a half's (or the whole model's) parameters for averaging."""

  params: Any


@struct.dataclass
class ClientHalf:
  """Either direction, in sequential (relay) split learning over a network: the client half as it
  is handed from one client to the next through the server (`sljax.transport`).

  Everything the next client needs to continue exactly where the last one stopped: the params,
  the model state (e.g. batch statistics), the client optimizer's state and the uplink codec's
  state (e.g. an error-feedback residual).
  """

  params: Any
  model_state: Any
  opt_state: Any
  codec_state: Any = ()


MESSAGE_TYPES = {
    cls.__name__: cls
    for cls in (SmashedData, CutGradient, BodyOutput, TailGradient, Prediction, ModelWeights, ClientHalf)
}


def to_bytes(message: Any) -> bytes:
  """Serializes a message (with its kind and the protocol version) to bytes.

  Args:
    message: one of the message types of this module (`SmashedData`, `CutGradient`, ...).

  Returns:
    One msgpack map, `{"sljax": PROTOCOL_VERSION, "kind": <class name>, "body": {<field>: ...}}`.

  Raises:
    TypeError: `message` is not a message type.

  Example:
    >>> import numpy as np
    >>> up = SmashedData(np.ones((32, 16), np.float32), np.zeros((32,), np.int32))
    >>> data = to_bytes(up)
    >>> len(data), wire_size(up)  # 2048 bytes of activations, 128 of labels, 83 of framing
    (2259, 2259)
    >>> from_bytes(up, data).activations.shape
    (32, 16)
  """
  kind = type(message).__name__
  if kind not in MESSAGE_TYPES:
    raise TypeError(f"message: expected one of {sorted(MESSAGE_TYPES)}, got {kind}")
  body = serialization.to_state_dict(jax.device_get(message))
  return serialization.msgpack_serialize({"sljax": PROTOCOL_VERSION, "kind": kind, "body": body})


def from_bytes(template: M, data: bytes, *, max_bytes: int | None = None) -> M:
  """Restores a message from bytes, checking it against `template`.

  Args:
    template: a message of the expected kind whose fields have the expected shapes and dtypes
      (arrays or `jax.ShapeDtypeStruct`s); None fields must be absent on the wire.
    data: the bytes.
    max_bytes: reject larger payloads before decoding.

  Returns:
    The message, of the template's kind, with numpy arrays as its fields.

  Raises:
    MessageError: the bytes are oversized, malformed or truncated, carry another protocol version
      or kind, or a field's shape or dtype differs from the template's. The message names what was
      expected and what came.

  Example:
    >>> import numpy as np
    >>> data = to_bytes(SmashedData(np.ones((32, 16), np.float32), np.zeros((32,), np.int32)))
    >>> from_bytes(SmashedData(np.ones((32, 8), np.float32), np.zeros((32,), np.int32)), data)
    Traceback (most recent call last):
    ...
    sljax.messages.MessageError: SmashedData: field activations: expected shape (32, 8) float32, got (32, 16) float32
  """
  kind = type(template).__name__
  if max_bytes is not None and len(data) > max_bytes:
    raise MessageError(f"{kind}: message of {len(data)} bytes exceeds the maximum of {max_bytes} bytes")
  try:
    envelope = _restore(data)
  except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
    raise MessageError(f"{kind}: malformed or truncated message ({len(data)} bytes): {e or type(e).__name__}") from None
  if not isinstance(envelope, dict) or set(envelope) != {"sljax", "kind", "body"}:
    raise MessageError(f"{kind}: malformed message: expected a map with keys sljax, kind, body")
  if type(envelope["sljax"]) is not int or envelope["sljax"] != PROTOCOL_VERSION:
    raise MessageError(f"{kind}: protocol version {_short(envelope['sljax'])} is not supported; expected "
                       f"{PROTOCOL_VERSION}")
  if envelope["kind"] != kind:
    raise MessageError(f"message: expected kind {kind}, got {_short(envelope['kind'])}")
  body = envelope["body"]
  expected = serialization.to_state_dict(template)
  _check_body(kind, expected, body, path="")
  return serialization.from_state_dict(template, body)


# What an array's ext data may hold (docs/protocol.md, 2.3), and how deep a message may nest.
_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                     "uint32", "uint64", "bool"})
MAX_DEPTH = 64


def _restore(data: bytes) -> Any:
  """msgpack bytes to a tree of maps and arrays, strictly: an array is an ext of type 1 holding
  exactly [shape, dtype, data] with `data` of the size they say; any other ext stays an `ExtType`
  (refused where an array is expected); maps have string keys; no value nests deeper than
  `MAX_DEPTH`. Unlike `flax.serialization.msgpack_restore`, nothing is reassembled from chunks.

  Raises:
    ValueError: naming what is wrong.
  """
  value = msgpack.unpackb(data, ext_hook=_array, raw=False, strict_map_key=True)
  if nesting_depth(value, limit=MAX_DEPTH) > MAX_DEPTH:
    raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
  return value


def _array(code: int, data: bytes) -> Any:
  """msgpack's ext hook: type 1 (flax's ndarray) as an array, checked; other types as they came."""
  if code != 1:
    return msgpack.ExtType(code, data)
  fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
  if not isinstance(fields, list) or len(fields) != 3:
    raise ValueError(f"an array (ext type 1) must hold [shape, dtype, data], got {_short(fields)}")
  shape, dtype, buffer = fields
  if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
    raise ValueError(f"an array's shape must be a list of non-negative ints, got {_short(shape)}")
  if dtype not in _DTYPES:
    raise ValueError(f"an array's dtype must be one of {sorted(_DTYPES)}, got {_short(dtype)}")
  dtype = jax.numpy.dtype(dtype)
  size = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if not isinstance(buffer, bytes) or len(buffer) != size:
    got = f"{len(buffer)} bytes" if isinstance(buffer, bytes) else type(buffer).__name__
    raise ValueError(f"an array of shape {tuple(shape)} {dtype} holds {size} bytes of data, got {got}")
  return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def nesting_depth(value: Any, *, limit: int) -> int:
  """How deep maps and lists nest in `value` (a scalar: 0), counted up to `limit + 1` at most,
  without recursion (a hostile value may nest thousands of levels)."""
  deepest, todo = 0, [(value, 0)]
  while todo:
    v, depth = todo.pop()
    if isinstance(v, (dict, list, tuple)):
      depth += 1
      deepest = max(deepest, depth)
      if depth > limit:
        return depth
      todo.extend((x, depth) for x in (v.values() if isinstance(v, dict) else v))
  return deepest


def _short(value: Any, limit: int = 80) -> str:
  """A bounded repr of something a peer sent."""
  text = reprlib.repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _check_body(kind: str, expected: Any, got: Any, path: str) -> None:
  if isinstance(expected, dict):
    if not isinstance(got, dict) or set(got) != set(expected):
      have = sorted(got) if isinstance(got, dict) else type(got).__name__
      raise MessageError(f"{kind}: field {path or '<root>'}: expected fields {sorted(expected)}, got {have}")
    for name in expected:
      _check_body(kind, expected[name], got[name], f"{path}.{name}" if path else name)
    return
  if expected is None:
    if got is not None:
      raise MessageError(f"{kind}: field {path}: expected no data, got {type(got).__name__}")
    return
  if not isinstance(got, np.ndarray):
    what = f"msgpack ext type {got.code}" if isinstance(got, msgpack.ExtType) else type(got).__name__
    raise MessageError(f"{kind}: field {path}: expected an array (msgpack ext type 1), got {what}")
  want_shape, want_dtype = tuple(expected.shape), np.dtype(expected.dtype)
  if got.shape != want_shape or got.dtype != want_dtype:
    raise MessageError(
        f"{kind}: field {path}: expected shape {want_shape} {want_dtype}, got {got.shape} {got.dtype}"
    )


def wire_size(message: Any) -> int:
  """The exact number of bytes `to_bytes(message)` produces; works on tracers and shape structs.

  Args:
    message: a message whose fields are arrays, tracers or `jax.ShapeDtypeStruct`s.

  Returns:
    The length of its bytes, a Python int: it depends only on the fields' shapes and dtypes.

  Example:
    >>> import jax, numpy as np
    >>> wire_size(CutGradient(jax.ShapeDtypeStruct((32, 16), np.float32)))  # from the shape alone
    2103
  """
  leaves, treedef = jax.tree.flatten(message)
  signature = tuple((tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves)
  return _wire_size(treedef, signature)


@functools.lru_cache(maxsize=1024)
def _wire_size(treedef, signature) -> int:
  zeros = [np.zeros(shape, dtype) for shape, dtype in signature]
  return len(to_bytes(jax.tree.unflatten(treedef, zeros)))


def spec_of(message: Any) -> Any:
  """The message with every array replaced by its `jax.ShapeDtypeStruct` (a template for `from_bytes`)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), message)
