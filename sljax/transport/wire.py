"""What a transport carries: the service's method names, its request and response maps, its errors.

Every call of the `sljax.Split` service sends one request and gets one response, both bytes. A
request or response is a msgpack map (written with `flax.serialization.msgpack_serialize`) whose
fields are listed in `REQUESTS` and `RESPONSES`; where it carries an sljax message (smashed data,
cut gradient, prediction, client half), that message is the exact bytes of `sljax.to_bytes`,
nested as a msgpack bin field named "message". docs/protocol.md specifies all of it.

A transport is anything with `call(method, request, *, timeout) -> response`; errors come back as
a `TransportError` carrying a gRPC status code, whichever transport carried the call.
`InProcessTransport` hands the bytes to the server's handler in the same process: the simulation
of a deployment with the network taken out, and the reference the gRPC transport is tested against.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import grpc
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import serialization

from sljax import codecs
from sljax import messages as msgs

SERVICE = "sljax.Split"

# method -> (request fields, response fields); each field -> the Python types it may hold.
_INT = (int,)
_NUM = (int, float)
_BIN = (bytes,)
_POSITION = {"round": _INT, "turn": _INT, "step": _INT, "durable": _INT, "done": (bool,)}
REQUESTS: dict[str, dict[str, tuple[type, ...]]] = {
    "Handshake": {"protocol": _INT, "client": _INT, "cut_shape": (list,), "cut_dtype": (str,), "uplink": (dict,),
                  "downlink": (dict,), "samples": _INT},
    "Status": {"client": _INT},
    "Handover": {"client": _INT, "round": _INT, "op": (str,), "steps": _INT, "wait": _NUM,
                 "message": _BIN + (type(None),)},
    "Forward": {"client": _INT, "round": _INT, "step": _INT, "message": _BIN},
    "Backward": {"client": _INT, "round": _INT, "step": _INT, "message": _BIN},  # U-shaped only
    "Commit": {"client": _INT, "round": _INT, "step": _INT},
    "Predict": {"client": _INT, "batch": _INT, "message": _BIN},
    # Private set intersection of sample IDs (vertical SL, sljax.transport.alignment): PSI payloads, never IDs.
    "Align": {"client": _INT, "op": (str,), "wait": _NUM, "request": _BIN + (type(None),),
              "setup": _BIN + (type(None),), "response": _BIN + (type(None),)},
}
RESPONSES: dict[str, dict[str, tuple[type, ...]]] = {
    "Handshake": {"protocol": _INT, "client": _INT, "algorithm": (str,), "num_clients": _INT, "rounds": _INT,
                  "local_steps": _INT, "batch_size": _INT, "lease_seconds": _NUM, "run_key": (list,),
                  "position": (dict,)},
    "Status": _POSITION,
    "Handover": {"ready": (bool,), "message": _BIN + (type(None),), "position": (dict,)},
    "Forward": {"message": _BIN, "loss": _NUM, "accuracy": _NUM},
    "Backward": {"message": _BIN},
    "Commit": _POSITION,
    "Predict": {"message": _BIN},
    "Align": {"ready": (bool,), "party": (str,), "leader": (str,), "fpr": _NUM, "size": _INT,
              "request": _BIN + (type(None),), "setup": _BIN + (type(None),), "response": _BIN + (type(None),)},
}
# Fields a map may leave out (absent: the default the method's section of docs/protocol.md gives).
# Handshake: "handoff", "plain" (absent) or "sealed", how sequential SL's client halves are handed
# over; "init_key", answered when they are sealed: the data of the key the run's `init` takes.
# Predict (vertical SL): "offset", the index of the call's first sample among the samples to infer;
# "stood_in", the parties whose rows the answer stood in for (absent: none).
OPTIONAL_REQUESTS: dict[str, dict[str, tuple[type, ...]]] = {"Handshake": {"handoff": (str,)},
                                                             "Predict": {"offset": _INT}}
OPTIONAL_RESPONSES: dict[str, dict[str, tuple[type, ...]]] = {"Handshake": {"init_key": (list,)},
                                                              "Predict": {"stood_in": (list,)}}
METHODS = tuple(REQUESTS)

# Metadata key of the bearer token ("authorization: Bearer <token>"), as in HTTP.
TOKEN_METADATA = "authorization"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def method_path(method: str) -> str:
  """The gRPC path of a method, e.g. `/sljax.Split/Forward`."""
  return f"/{SERVICE}/{method}"


class TransportError(RuntimeError):
  """A call that failed, with its gRPC status code and a message for people.

  Raised by the server's handler (and sent back as the call's status) and by every transport on
  the client side, so a client handles the same errors in process and over the network.
  """

  def __init__(self, code: grpc.StatusCode, details: str):
    super().__init__(f"{code.name}: {details}")
    self.code = code
    self.details = details


Handler = Callable[..., bytes]


class Transport(Protocol):
  """How a client reaches the server: one request, one response, both bytes."""

  def call(self, method: str, request: bytes, *, timeout: float | None = None) -> bytes:
    """Calls `method` of the `sljax.Split` service; raises `TransportError` on failure."""
    ...


class InProcessTransport:
  """Calls the server's handler directly, still passing bytes: the network taken out.

  Args:
    handler: `handler(method, request, *, metadata, peer_names) -> response`, e.g.
      `SplitServer.handle`.
    token: this client's bearer token, sent as the `authorization` metadata, as over gRPC.

  Example:
    >>> transport = InProcessTransport(server.handle, token="s3cret")   # doctest: +SKIP
    >>> transport.call("Status", encode({"client": 0}))                # doctest: +SKIP
  """

  def __init__(self, handler: Handler, *, token: str | None = None):
    self._handler = handler
    self._metadata = {} if token is None else {TOKEN_METADATA: f"Bearer {token}"}

  def call(self, method: str, request: bytes, *, timeout: float | None = None) -> bytes:
    del timeout  # the handler runs in this thread; nothing to time out
    if method not in REQUESTS:
      raise TransportError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
    return bytes(self._handler(method, bytes(request), metadata=self._metadata, peer_names=()))

  def close(self) -> None:
    """Nothing to release; here for symmetry with `GrpcTransport`."""


def encode(fields: Mapping[str, Any]) -> bytes:
  """A request or response map as msgpack bytes."""
  return serialization.msgpack_serialize(dict(fields))


def decode(method: str, data: bytes, *, response: bool = False) -> dict[str, Any]:
  """Parses and checks a request (or response) map of `method`.

  Raises:
    TransportError: INVALID_ARGUMENT if the bytes are not a msgpack map with exactly the fields
      of `REQUESTS[method]` (`RESPONSES[method]`), and any of `OPTIONAL_REQUESTS[method]`
      (`OPTIONAL_RESPONSES`), each of an allowed type.
  """
  fields = (RESPONSES if response else REQUESTS)[method]
  optional = (OPTIONAL_RESPONSES if response else OPTIONAL_REQUESTS).get(method, {})
  what = f"{method} {'response' if response else 'request'}"
  try:
    # Plain msgpack, no ext types: a control map never holds arrays.
    value = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
    raise invalid(f"{what}: malformed or truncated msgpack ({len(data)} bytes): {e}") from None
  if msgs.nesting_depth(value, limit=msgs.MAX_DEPTH) > msgs.MAX_DEPTH:
    raise invalid(f"{what}: nested more than {msgs.MAX_DEPTH} levels deep")
  if not isinstance(value, dict) or not set(fields) <= set(value) <= set(fields) | set(optional):
    got = sorted(value) if isinstance(value, dict) else type(value).__name__
    also = f" (and optionally {sorted(optional)})" if optional else ""
    raise invalid(f"{what}: expected a map with fields {sorted(fields)}{also}, got {got}")
  for name, types in {**fields, **optional}.items():
    if name not in value:
      continue
    v = value[name]
    # bool is an int in Python; a field typed int must not take a bool, and the reverse.
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
      want = " or ".join(t.__name__ for t in types)
      raise invalid(f"{what}: field {name!r} must be {want}, got {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v) and name != "loss":
      raise invalid(f"{what}: field {name!r} must be finite, got {v}")
  return value


def codec_fields(sl: Any) -> dict[str, dict[str, Any]]:
  """The Handshake's "uplink" and "downlink" fields: `codecs.describe` of `sl.uplink` and `sl.downlink`.

  Args:
    sl: `sljax.vanilla(...)` or `sljax.u_shaped(...)`.

  Raises:
    ValueError: naming `sl.uplink` or `sl.downlink` if that codec carries no configuration.
  """
  fields = {}
  for link in ("uplink", "downlink"):
    try:
      fields[link] = codecs.describe(getattr(sl, link))
    except ValueError as e:
      raise ValueError(f"sl.{link}: {e}") from None
  return fields


def same_configuration(a: Any, b: Any) -> bool:
  """Whether two codec descriptions (as decoded from msgpack) are equal: maps key by key, arrays
  element by element, numbers by value (`1 == 1.0`), booleans only to booleans, the rest by type
  and value. Recurses only as deep as both are, so a deep request costs no more than the server's
  own description."""
  if isinstance(a, bool) or isinstance(b, bool):
    return isinstance(a, bool) and isinstance(b, bool) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(same_configuration(a[key], b[key]) for key in a)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(same_configuration(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def show_configuration(description: Any, *, limit: int = 400) -> str:
  """A codec description as compact JSON with sorted keys (what `codecs.Codec.config` holds), cut
  to `limit` characters; anything JSON cannot write (a request's bytes) as a bounded repr."""
  try:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
  except (TypeError, ValueError, RecursionError):
    text = reprlib.repr(description)
  return text if len(text) <= limit else text[:limit] + "..."


def invalid(details: str) -> TransportError:
  return TransportError(grpc.StatusCode.INVALID_ARGUMENT, details)


DEFAULT_MAX_ABS_VALUE = 1e6


def read_message(template: Any, data: bytes, *, what: str, max_bytes: int | None = None,
                 max_abs: float | None = None, num_classes: int | None = None) -> Any:
  """`sljax.from_bytes` with the errors a transport returns, and no NaN or Inf let through.

  `max_abs` bounds the magnitude of every floating value (a server's defense against a client that
  sends finite but absurd activations or gradients to poison the shared model); `num_classes`
  bounds the labels a message carries to [0, num_classes).

  Raises:
    TransportError: RESOURCE_EXHAUSTED if `data` exceeds `max_bytes`; INVALID_ARGUMENT if the
      message is malformed, of another kind, protocol version, shape or dtype than `template`,
      holds a NaN or an infinity in a floating field, a value beyond `max_abs`, or a label outside
      [0, num_classes).
  """
  if max_bytes is not None and len(data) > max_bytes:
    raise TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{what}: message of {len(data)} bytes exceeds the maximum of {max_bytes} bytes")
  try:
    message = msgs.from_bytes(template, data)
  except msgs.MessageError as e:
    raise invalid(f"{what}: {e}") from None
  check_finite(message, what=what)
  if max_abs is not None:
    check_bounded(message, max_abs, what=what)
  labels = getattr(message, "labels", None)
  if num_classes is not None and labels is not None:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      bad = labels[(labels < 0) | (labels >= num_classes)]
      raise invalid(f"{what}: field labels holds {bad.size} label(s) outside [0, {num_classes}) (the model has "
                    f"{num_classes} outputs), e.g. {int(bad[0])}")
  return message


def check_bounded(message: Any, max_abs: float, *, what: str) -> None:
  """Raises INVALID_ARGUMENT naming the first floating field with a value beyond `max_abs` in magnitude."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(message):
    leaf = np.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size and float(np.abs(leaf).max()) > max_abs:
      raise invalid(f"{what}: field {jax.tree_util.keystr(path).lstrip('.')} holds a value of magnitude "
                    f"{float(np.abs(leaf).max()):.3g}, beyond the server's bound of {max_abs:g} (max_abs_value)")


def check_finite(message: Any, *, what: str) -> None:
  """Raises INVALID_ARGUMENT naming the first floating field that holds a NaN or an infinity."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(message):
    leaf = np.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and not np.isfinite(leaf).all():
      bad = int((~np.isfinite(leaf)).sum())
      raise invalid(f"{what}: field {jax.tree_util.keystr(path).lstrip('.')} holds {bad} NaN or infinite value(s)")
