"""What every sljax server shares (`ServiceBase`): identities, limits, the lock, checkpoints, the
call pipeline, and the methods that do not depend on the algorithm (Handshake, Status, Predict).

The server itself (`sljax.transport.ConcurrentServer`, and `SplitServer` for sequential SL) is a
shell around a pure coordinator (`sljax.transport.coordinators`). Its `handle(method, request,
...)` is the whole service: it takes the bytes of one call and returns the bytes of its response,
or raises a `TransportError`; it does not know which transport carried the call
(`sljax.transport.serve` puts it behind gRPC, `InProcessTransport` calls it directly).

Training moves in two phases per step, so that a failure anywhere leaves both sides consistent:

  Forward(round, step, smashed)  runs the server's step on the committed state and STAGES the
                                 result; a retry recomputes it bit for bit (the step key is derived
                                 from the run key and the step id, never drawn).
  Commit(round, step)            the client has applied its backward; the server makes the staged
                                 update its state, and checkpoints every `checkpoint_every` commits.

U-shaped split learning (`sljax.u_shaped`: the labels and the loss stay with the client) takes one
more call between the two: `Forward` runs the body's forward and stages its pending backward (the
answer is the body's output), `Backward(round, step, tail gradient)` runs the body's backward with
it and stages the updated server half (the answer is the cut gradient), and `Commit` commits it.

A staged step that is never committed is discarded. After a server restart (from the latest
checkpoint) a client's next `Commit` fails, it asks `Status` and rolls back to the last
checkpointed step (`durable`), so no step is applied twice or lost.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import jax
import msgpack
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from sljax import codecs
from sljax import messages as msgs
from sljax import simulation
from sljax.protocol import ArraySpec, PartyState, UShaped, Vanilla
from sljax.split import SplitModel
from sljax.transport import schedule as sched
from sljax.transport import wire
from sljax.transport.wire import TransportError

logger = logging.getLogger(__name__)

PyTree = Any
_FAILED = grpc.StatusCode.FAILED_PRECONDITION
# The longest a Handover "get" waits for the client's turn before answering "not ready".
MAX_WAIT_SECONDS = 30.0
MAX_SAMPLES = 2**31 - 1  # the most training rows a client may declare (what an int32 count holds)



class ServiceBase:
  """What every sljax server shares: identities, limits, the lock, checkpoints, the call pipeline,
  and the methods that do not depend on the algorithm (Handshake, Status, Predict).

  A subclass calls `_configure(...)`, builds its initial state, passes it through
  `_restore(checkpoint_dir, initial)` and sets `self.state`, `self.schedule` and `self.cut_spec`,
  and calls `_configure_inference(model, sl)`. It implements `_handover`, `_forward`, `_commit` (one per method of the
  service; `_backward` too if it serves U-shaped split learning), `_position(client)`, `_seen(client)` (a call
  from `client` arrived),
  `_expire_if_due()` (leases), `_predict_party(client)` (the server half that serves `client`'s
  inference) and `_staged_dict()` (what is staged, for `snapshot`); `_hello` optionally.
  """

  algorithm = ""
  _no_inference: str | None = None  # why this server answers no Predict (FAILED_PRECONDITION), if it does not
  handoff = "plain"  # how sequential SL's client halves are handed over: "plain" or "sealed"
  _init_key: list[int] | None = None  # sealed: the data of the key the run's init takes
  # The leader's role of the PSI alignment (`sljax.transport.Aligner`), if this server aligns sample IDs.
  aligner = None

  def _configure(self, *, num_clients: int, tokens, certificate_names, sl: Vanilla | UShaped, checkpoint_every: int,
                 lease_seconds: float, max_message_bytes: int, max_predict_batch: int,
                 clock: Callable[[], float], max_abs_value: float | None = wire.DEFAULT_MAX_ABS_VALUE,
                 num_classes: int | str | None = "auto", max_samples: int = MAX_SAMPLES, recorder=None) -> None:
    if not tokens and not certificate_names:
      raise ValueError("tokens, certificate_names: give at least one way to identify clients")
    for name, ids in (("tokens", tokens or {}), ("certificate_names", certificate_names or {})):
      bad = sorted(v for v in ids.values() if not 0 <= v < num_clients)
      if bad:
        raise ValueError(f"{name}: client ids must be in [0, {num_clients}), got {bad}")
    if checkpoint_every < 1:
      raise ValueError(f"checkpoint_every: expected a positive int, got {checkpoint_every}")
    if not lease_seconds > 0:
      raise ValueError(f"lease_seconds: expected a positive number, got {lease_seconds}")
    if max_abs_value is not None and not max_abs_value > 0:
      raise ValueError(f"max_abs_value: expected a positive number or None, got {max_abs_value}")
    if not (num_classes in ("auto", None) or (isinstance(num_classes, int) and num_classes >= 1)):
      raise ValueError(f"num_classes: expected 'auto', None or a positive int, got {num_classes!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or not 1 <= max_samples <= MAX_SAMPLES:
      raise ValueError(f"max_samples: expected an int in [1, {MAX_SAMPLES}], got {max_samples!r}")
    self.max_abs_value = max_abs_value
    self.num_classes = num_classes
    self.max_samples = max_samples
    if recorder is not None and not callable(getattr(recorder, "record", None)):
      raise TypeError(f"recorder: expected a sljax.privacy.transcript.Recorder, got {type(recorder).__name__}")
    self.recorder = recorder
    self._tokens = dict(tokens or {})
    self._certificate_names = dict(certificate_names or {})
    # What the handshake compares with the client's: the codecs' configurations, derived from `sl`.
    self.codecs = wire.codec_fields(sl)
    self.lease_seconds = float(lease_seconds)
    self.max_message_bytes = int(max_message_bytes)
    self.max_predict_batch = int(max_predict_batch)
    self._clock = clock
    self._checkpoint_every = checkpoint_every
    self._cond = threading.Condition()
    self._commits_since_save = 0
    self._manager = None
    self._version = 0

  def _restore(self, checkpoint_dir, initial):
    """The latest checkpoint in `checkpoint_dir` if there is one, else `initial`."""
    if checkpoint_dir is None:
      return initial
    self._manager = simulation.checkpoint_manager(checkpoint_dir)
    latest = self._manager.latest_step()
    if latest is None:
      return initial
    restored = simulation.restore(self._manager, initial, latest)
    self._version = latest
    # host arrays, as a fresh server's state is: orbax restores sharded arrays, whose steps would lower
    # to other programs than the fresh server's and miss the persistent compilation cache
    return jax.tree.map(np.asarray, restored)

  def _save_state(self) -> None:
    if self._manager is not None:
      self._version += 1
      self._manager.save(self._version, args=ocp.args.StandardSave(self.state))
      self._manager.wait_until_finished()  # durable before the caller hears of it
    self._commits_since_save = 0

  # ---- the service ------------------------------------------------------------------------------

  def handle(self, method: str, request: bytes, *, metadata: Mapping[str, str],
             peer_names: Sequence[str] = ()) -> bytes:
    """Serves one call: the request's bytes in, the response's bytes out.

    Raises:
      TransportError: with the status code the caller gets (see docs/protocol.md). A refused
        request leaves the server exactly as it was.
    """
    if method not in wire.REQUESTS:
      raise TransportError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
    if len(request) > self.max_message_bytes:
      raise TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{method}: request of {len(request)} bytes exceeds the maximum of "
                           f"{self.max_message_bytes} bytes")
    client = self._authenticate(metadata, peer_names)
    if method == "Handshake":
      self._check_protocol(request)
    req = wire.decode(method, request)
    if req["client"] != client:
      raise TransportError(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method}: field 'client' is {req['client']}, but the credentials are client {client}'s")
    if method == "Predict":  # takes the lock only to read the server half it runs
      return self._predict(client, req)
    if method == "Align":  # beside training: the aligner's own lock; no lease renewed, no training state touched
      return self._align(client, req)
    with self._cond:
      self._seen(client)
      self._expire_if_due()
      response = getattr(self, f"_{method.lower()}")(client, req)
      if self.recorder is not None:
        self._record(method, client, req, response)
      return response

  def _record(self, method: str, client: int, req: dict, response: bytes) -> None:
    """Into the transcript: the training messages of a served call, as the bytes that crossed the
    wire (the request's message up, the response's down); Handshake, Status and Predict are not."""
    if method not in ("Forward", "Backward", "Handover"):
      return
    step = req["steps"] if method == "Handover" else req["step"]
    if req["message"] is not None:
      self.recorder.record("up", req["round"], step, client, req["message"])
    down = msgpack.unpackb(response, raw=False).get("message")
    if down:  # local-loss SL answers an empty message; a Handover put none
      self.recorder.record("down", req["round"], step, client, down)

  def snapshot(self) -> bytes:
    """The server's state and staged step(s) as bytes: equal bytes, equal state (for tests)."""
    with self._cond:
      return serialization.msgpack_serialize(
          {"state": serialization.to_state_dict(jax.device_get(self.state)),
           "staged": serialization.to_state_dict(jax.device_get(self._staged_dict()))})

  def close(self) -> None:
    """Finishes pending checkpoint writes, and the transcript if the server records one."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
    if self.recorder is not None:
      self.recorder.close()

  # ---- identity ---------------------------------------------------------------------------------------

  def authenticate_metadata(self, metadata: Mapping[str, str]) -> None:
    """What can be checked of a call's credentials before its body is read (`sljax.transport.serve`
    runs it in a gRPC server interceptor): a bearer token must be one of this server's; a call
    without one must be able to present a client certificate (the server knows certificate names;
    mutual TLS checked the certificate before any byte of the call).

    Raises:
      TransportError: UNAUTHENTICATED, with the details `handle` would give.
    """
    if metadata.get(wire.TOKEN_METADATA) is not None or not self._certificate_names:
      self._authenticate(metadata, ())

  def _authenticate(self, metadata: Mapping[str, str], peer_names: Sequence[str]) -> int:
    value = metadata.get(wire.TOKEN_METADATA)
    if value is not None:
      token = value[len("Bearer "):] if value.startswith("Bearer ") else value
      found = None
      for known, client in self._tokens.items():  # compare with every token, in constant time each
        if hmac.compare_digest(known.encode(), token.encode()):
          found = client
      if found is not None:
        return found
      raise TransportError(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not one of this server's")
    for name in peer_names:
      if name in self._certificate_names:
        return self._certificate_names[name]
    if peer_names:
      raise TransportError(grpc.StatusCode.UNAUTHENTICATED,
                           f"no client is registered for the certificate name(s) {sorted(peer_names)}")
    raise TransportError(grpc.StatusCode.UNAUTHENTICATED, f"no credentials: send '{wire.TOKEN_METADATA}: Bearer "
                                                          "<token>' metadata or a client certificate")

  def _check_protocol(self, request: bytes) -> None:
    """Handshake: a client of another protocol version gets FAILED_PRECONDITION, whatever else it sent."""
    try:
      version = msgpack.unpackb(request, raw=False).get("protocol")
    except Exception:  # noqa: BLE001 -- malformed requests are reported by wire.decode
      return
    if isinstance(version, int) and version != msgs.PROTOCOL_VERSION:
      raise TransportError(_FAILED, f"protocol version: expected {msgs.PROTOCOL_VERSION}, got {version}")

  def _cut_spec_of(self, client: int) -> ArraySpec:
    """The cut activations client `client`'s half makes (one spec for all, unless the clients differ)."""
    del client
    return self.cut_spec

  def _codecs_of(self, client: int) -> dict[str, dict[str, Any]]:
    """The codec descriptions client `client` must run (one for all, unless the clients differ)."""
    del client
    return self.codecs

  def _who(self, client: int) -> str:
    """How errors name client `client` (vertical SL: by its party's name)."""
    return f"client {client}"

  def _handshake(self, client: int, req: dict) -> bytes:
    spec = self._cut_spec_of(client)
    if not all(type(d) is int for d in req["cut_shape"]):
      raise wire.invalid(f"Handshake request: field 'cut_shape' must be an array of ints, got "
                         f"{wire.show_configuration(req['cut_shape'], limit=80)}")
    if req["cut_shape"] != list(spec.shape) or req["cut_dtype"] != spec.dtype:
      got = ArraySpec(tuple(req["cut_shape"]), req["cut_dtype"]).describe()
      raise TransportError(_FAILED, f"model signature: the server's half takes cut activations of shape "
                                    f"{spec.describe()} from {self._who(client)}, the client's half makes {got}")
    differ = [f"{link}: the server's is {wire.show_configuration(mine)}, the client's is "
              f"{wire.show_configuration(req[link])}"
              for link, mine in self._codecs_of(client).items() if not wire.same_configuration(req[link], mine)]
    if differ:
      raise TransportError(_FAILED, "codec configuration differs: " + "; ".join(differ))
    asked = req.get("handoff", "plain")
    if asked != self.handoff:
      how = {"plain": "plain (the server relays the client half in the clear)",
             "sealed": "sealed (the clients seal the client half, sljax.privacy.handoff)"}
      raise TransportError(_FAILED, f"handoff: the server's hand-offs are {how[self.handoff]}, the client's are "
                                    f"{how.get(asked, wire.show_configuration(asked, limit=40))}: give both sides "
                                    "the same setting (sealed_handoffs= on the server, handoff_key= on the client)")
    if not 1 <= req["samples"] <= self.max_samples:
      raise wire.invalid(f"Handshake request: field 'samples' must be an int in [1, {self.max_samples}] "
                         f"(max_samples), got {req['samples']}")
    self._hello(client, req)
    return wire.encode({
        "protocol": msgs.PROTOCOL_VERSION, "client": client, "algorithm": self.algorithm, **self.schedule._asdict(),
        "lease_seconds": self.lease_seconds,
        "run_key": [int(v) for v in np.asarray(self.state.key).ravel()], "position": self._position(client),
        **({} if self._init_key is None else {"init_key": self._init_key})})

  def _hello(self, client: int, req: dict) -> None:
    """A handshake that passed its checks; subclasses record what they need."""

  def _status(self, client: int, req: dict) -> bytes:
    del req
    return wire.encode(self._position(client))

  def _align(self, client: int, req: dict) -> bytes:
    if self.aligner is None:
      raise TransportError(grpc.StatusCode.UNIMPLEMENTED, f"Align: this server ({self.algorithm}) holds no sample IDs "
                                                          "to align with (see sljax.transport.Aligner)")
    return self.aligner.serve(client, req)

  def _backward(self, client: int, req: dict) -> bytes:
    del client, req
    raise TransportError(grpc.StatusCode.UNIMPLEMENTED,
                         f"Backward: this server runs {self.algorithm}; only U-shaped split learning has a Backward")

  def _configure_inference(self, model: SplitModel, sl: Vanilla | UShaped) -> None:
    """Predict: the smashed data comes through the uplink codec, as in `Vanilla.predict`; the answer
    is `sched.inference_answer`'s (the logits, or a U-shaped body's output).

    Where the codecs Predict goes through keep the rows apart (none, or `cast`), a batch is padded
    with zero rows to the next power of two and the answer cut back to its rows, so inference runs
    programs for at most log2(max_predict_batch) + 1 batch sizes; otherwise one per batch size."""
    self._uplink = sl.uplink
    self._server_eval = jax.jit(sched.inference_answer(model, sl))
    self._predict_templates: dict[tuple[int, ArraySpec], msgs.SmashedData] = {}
    row_wise = ("identity", "cast")
    self._buckets = codecs.describe(sl.uplink)["name"] in row_wise and (
        not isinstance(sl, UShaped) or codecs.describe(sl.downlink)["name"] in row_wise)
    if self.num_classes == "auto":  # the labels a step may carry: as many classes as the model has outputs
      x1 = jax.ShapeDtypeStruct((1, *self.input_spec.shape), self.input_spec.dtype)
      out = jax.eval_shape(lambda x: sl.predict(sl.init(jax.random.key(0), x), x)[0], x1)
      self.num_classes = int(out.shape[-1]) if len(out.shape) == 2 else None

  def _read(self, template: Any, data: bytes, *, what: str) -> Any:
    """A message from a client, within every limit of this server (size, finite values, magnitude, labels)."""
    return wire.read_message(template, data, what=what, max_bytes=self.max_message_bytes, max_abs=self.max_abs_value,
                             num_classes=self.num_classes)

  def _predict_template(self, batch: int, spec: ArraySpec) -> msgs.SmashedData:
    if (batch, spec) not in self._predict_templates:
      cut = jax.ShapeDtypeStruct((batch, *spec.shape), spec.dtype)
      payload = jax.eval_shape(lambda h: self._uplink.encode(h, self._uplink.init(h), jax.random.key(0))[0], cut)
      self._predict_templates[batch, spec] = msgs.SmashedData(payload)
    return self._predict_templates[batch, spec]

  def _answer(self, client: int, party: PartyState, activations) -> Any:
    """The `Predict` answer (a message) to client `client`'s uplink payload, from the server half `party`."""
    del client
    return self._server_eval(party, activations)

  def _predict(self, client: int, req: dict) -> bytes:
    """Inference on the committed server half. The lock is held only to read it: the message is
    checked and the answer computed (and compiled, for a new batch bucket) without it, so inference
    never holds up training."""
    if self._no_inference is not None:
      raise TransportError(grpc.StatusCode.FAILED_PRECONDITION, f"Predict: this server does no inference "
                                                                f"({self._no_inference})")
    batch = req["batch"]
    if not 1 <= batch <= self.max_predict_batch:
      raise wire.invalid(f"Predict: field 'batch' must be in [1, {self.max_predict_batch}], got {batch}")
    message = self._read(self._predict_template(batch, self._cut_spec_of(client)), req["message"], what="Predict")
    with self._cond:
      self._seen(client)
      self._expire_if_due()
      party = self._predict_party(client)
    payload = message.activations
    if not self._buckets:
      return wire.encode({"message": msgs.to_bytes(jax.device_get(self._answer(client, party, payload)))})
    bucket = 1 << (batch - 1).bit_length()  # the next power of two
    padded = jax.tree.map(lambda a: np.concatenate([a, np.zeros((bucket - batch, *a.shape[1:]), a.dtype)]), payload)
    answer = jax.device_get(self._answer(client, party, padded))
    return wire.encode({"message": msgs.to_bytes(jax.tree.map(lambda a: a[:batch], answer))})
