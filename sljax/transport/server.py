"""The server of split learning over a network: sequential (relay) split learning, and vanilla
split learning as its one-client case, each with vanilla or U-shaped legs.

`SplitServer.handle(method, request, ...)` is the whole service: it takes the bytes of one call
and returns the bytes of its response, or raises a `TransportError`. It does not know which
transport carried the call; `sljax.transport.serve` puts it behind gRPC and `InProcessTransport`
calls it directly.

What the server holds (`ServerState`, all of it in every checkpoint): the server half, the client
half as last handed over, the position in the schedule (round, turn, steps committed in this
turn), the run key, and the outcome of each client's last turn. Training moves in two phases per
step, so that a failure anywhere leaves both sides consistent:

  Forward(round, step, smashed)  runs `server_step` on the committed state and STAGES the result;
                                 a retry recomputes it bit for bit (the step key is derived from
                                 the run key and the step id, never drawn).
  Commit(round, step)            the client has applied its backward; the server makes the staged
                                 update its state, and checkpoints every `checkpoint_every` commits.

U-shaped split learning (`sljax.u_shaped`: the labels and the loss stay with the client) takes one
more call between the two: `Forward` runs `server_forward` and stages its pending backward (the
answer is the body's output), `Backward(round, step, tail gradient)` runs `server_backward` with it
and stages the updated server half (the answer is the cut gradient), and `Commit` commits it.

A staged step that is never committed is discarded. A client that stops talking for
`lease_seconds` loses its turn: its staged step is discarded, the client half goes on to the next
client as it was last handed over, and the server keeps the steps it committed. After a server
restart (from the latest checkpoint) a client's next `Commit` fails, it asks `Status` and rolls
back to the last checkpointed step (`durable`), so no step is applied twice or lost.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, struct

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


@struct.dataclass
class ServerState:
  """Everything the server holds; a checkpoint saves all of it.

  Attributes:
    server: the server half.
    client_half: the client half as last handed over (at the start of the current turn).
    round, turn, step: the position: round `round`, client `turn`'s turn, `step` steps of it
      committed. Training is over when `round` equals the schedule's rounds.
    key: the run key data (uint32): data order and step keys derive from it.
    last_round, last_steps, last_completed: (K,) per client, its last finished turn: the round,
      the steps committed, and whether it handed the client half back (False: it was dropped).
  """

  server: PartyState
  client_half: PartyState
  round: np.ndarray
  turn: np.ndarray
  step: np.ndarray
  key: np.ndarray
  last_round: np.ndarray
  last_steps: np.ndarray
  last_completed: np.ndarray


class _Staged(NamedTuple):
  """A step forwarded and not yet committed. U-shaped: `pending` is the body's pullback, and
  `server` is None until `Backward` has run."""

  round: int
  client: int
  step: int
  server: PartyState | None
  pending: Any = None


def _int(x) -> int:
  return int(np.asarray(x))


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

  def _configure(self, *, num_clients: int, tokens, certificate_names, sl: Vanilla | UShaped, checkpoint_every: int,
                 lease_seconds: float, max_message_bytes: int, max_predict_batch: int,
                 clock: Callable[[], float], max_abs_value: float | None = wire.DEFAULT_MAX_ABS_VALUE,
                 num_classes: int | str | None = "auto", max_samples: int = MAX_SAMPLES) -> None:
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
    with self._cond:
      self._seen(client)
      self._expire_if_due()
      return getattr(self, f"_{method.lower()}")(client, req)

  def snapshot(self) -> bytes:
    """The server's state and staged step(s) as bytes: equal bytes, equal state (for tests)."""
    with self._cond:
      return serialization.msgpack_serialize(
          {"state": serialization.to_state_dict(jax.device_get(self.state)),
           "staged": jax.device_get(self._staged_dict())})

  def close(self) -> None:
    """Finishes pending checkpoint writes."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()

  # ---- identity ---------------------------------------------------------------------------------------

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

  def _handshake(self, client: int, req: dict) -> bytes:
    spec = self._cut_spec_of(client)
    if req["cut_shape"] != list(spec.shape) or req["cut_dtype"] != spec.dtype:
      got = ArraySpec(tuple(req["cut_shape"]), req["cut_dtype"]).describe() if all(
          isinstance(d, int) for d in req["cut_shape"]) else repr(req["cut_shape"])
      raise TransportError(_FAILED, f"model signature: the server's half takes cut activations of shape "
                                    f"{spec.describe()} from client {client}, the client's half makes {got}")
    differ = [f"{link}: the server's is {wire.show_configuration(mine)}, the client's is "
              f"{wire.show_configuration(req[link])}"
              for link, mine in self.codecs.items() if not wire.same_configuration(req[link], mine)]
    if differ:
      raise TransportError(_FAILED, "codec configuration differs: " + "; ".join(differ))
    if not 1 <= req["samples"] <= self.max_samples:
      raise wire.invalid(f"Handshake request: field 'samples' must be an int in [1, {self.max_samples}] "
                         f"(max_samples), got {req['samples']}")
    self._hello(client, req)
    return wire.encode({
        "protocol": msgs.PROTOCOL_VERSION, "client": client, "algorithm": self.algorithm, **self.schedule._asdict(),
        "lease_seconds": self.lease_seconds,
        "run_key": [int(v) for v in np.asarray(self.state.key).ravel()], "position": self._position(client)})

  def _hello(self, client: int, req: dict) -> None:
    """A handshake that passed its checks; subclasses record what they need."""

  def _status(self, client: int, req: dict) -> bytes:
    del req
    return wire.encode(self._position(client))

  def _backward(self, client: int, req: dict) -> bytes:
    del client, req
    raise TransportError(grpc.StatusCode.UNIMPLEMENTED,
                         f"Backward: this server runs {self.algorithm}; only U-shaped split learning has a Backward")

  def _configure_inference(self, model: SplitModel, sl: Vanilla | UShaped) -> None:
    """Predict: the smashed data comes through the uplink codec, as in `Vanilla.predict`; the answer
    is `sched.inference_answer`'s (the logits, or a U-shaped body's output)."""
    self._uplink = sl.uplink
    self._server_eval = jax.jit(sched.inference_answer(model, sl))
    self._predict_templates: dict[tuple[int, ArraySpec], msgs.SmashedData] = {}
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

  def _answer(self, client: int, activations) -> Any:
    """The `Predict` answer (a message) to client `client`'s uplink payload."""
    return self._server_eval(self._predict_party(client), activations)

  def _predict(self, client: int, req: dict) -> bytes:
    batch = req["batch"]
    if not 1 <= batch <= self.max_predict_batch:
      raise wire.invalid(f"Predict: field 'batch' must be in [1, {self.max_predict_batch}], got {batch}")
    message = self._read(self._predict_template(batch, self._cut_spec_of(client)), req["message"], what="Predict")
    answer = self._answer(client, message.activations)
    return wire.encode({"message": msgs.to_bytes(jax.device_get(answer))})


class SplitServer(ServiceBase):
  """The server's side of sequential split learning, behind any transport.

  Both parties build the same `sljax.vanilla(model, ...)` (same optimizers, codecs and loss); the
  server runs `server_step` only, the clients `client_forward` and `client_backward`. With
  `sljax.u_shaped(model, ...)` (a three-part model) the server runs `server_forward` and
  `server_backward`, the clients the head and the tail, and the handshake names the algorithm
  "sequential_sl_u". The handshake refuses a client whose uplink or downlink codec configuration
  (`sljax.codecs.describe`, derived from its `sl`) differs from the server's.

  Args:
    model: the split model.
    sl: `sljax.vanilla(model, ...)`, or `sljax.u_shaped(model, ...)`.
    schedule: clients, rounds, steps per turn, batch size.
    input_spec: shape (without the batch axis) and dtype of the clients' inputs; the server
      initialises both halves from `key` as `sequential_sl.init` does, and hands the client half
      to client 0.
    key: the run's PRNG key (the key given to `sequential_sl(...).init` in simulation).
    tokens: bearer token -> client id.
    certificate_names: TLS client certificate common name -> client id (with mutual TLS).
    checkpoint_dir: where to checkpoint (orbax); a server started on a directory holding a
      checkpoint resumes from it.
    checkpoint_every: checkpoint after every this many commits (and at every change of turn).
    lease_seconds: a client silent for this long during its turn loses the turn.
    max_message_bytes: requests larger than this are refused (RESOURCE_EXHAUSTED).
    max_predict_batch: the largest batch a Predict call may carry.
    clock: seconds, monotonic; tests pass a fake one.
    max_abs_value: the largest magnitude a floating value in a client's message may have (activations,
      gradients, weights); a message beyond it is refused (INVALID_ARGUMENT) before it touches the
      state, so no client can turn the server half into infinities. None: no bound.
    num_classes: labels in a client's message must lie in [0, num_classes): "auto" takes the width
      of the model's (B, C) output; None: unchecked (a loss that reads its labels otherwise).
    max_samples: the most training rows a client may declare in its handshake (SplitFed's FedAvg
      weighs clients by them: set it to the largest plausible client, so none can dominate).

  Example:
    >>> server = SplitServer(model, sl, schedule=Schedule(2, 3, 4, 32), input_spec=ArraySpec((64,), "float32"),
    ...                      key=jax.random.key(0), tokens={"t0": 0, "t1": 1})     # doctest: +SKIP
    >>> running = sljax.transport.serve(server.handle, address="127.0.0.1:0")       # doctest: +SKIP
  """

  def __init__(
      self,
      model: SplitModel,
      sl: Vanilla | UShaped,
      *,
      schedule: sched.Schedule,
      input_spec: ArraySpec,
      key: jax.Array,
      tokens: Mapping[str, int] | None = None,
      certificate_names: Mapping[str, int] | None = None,
      checkpoint_dir: str | os.PathLike | None = None,
      checkpoint_every: int = 1,
      lease_seconds: float = 120.0,
      max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
      max_predict_batch: int = 4096,
      clock: Callable[[], float] = time.monotonic,
      max_abs_value: float | None = wire.DEFAULT_MAX_ABS_VALUE,
      num_classes: int | str | None = "auto",
      max_samples: int = MAX_SAMPLES,
  ):
    self.schedule = schedule.check()
    self._configure(num_clients=schedule.num_clients, tokens=tokens, certificate_names=certificate_names, sl=sl,
                    checkpoint_every=checkpoint_every, lease_seconds=lease_seconds,
                    max_message_bytes=max_message_bytes, max_predict_batch=max_predict_batch, clock=clock,
                    max_abs_value=max_abs_value, num_classes=num_classes, max_samples=max_samples)

    k_model, run_key = sched.split_run_key(key)
    # U-shaped: both codec states (error feedback) are per row, so build them on a whole batch.
    rows = schedule.batch_size if isinstance(sl, UShaped) else 1
    x = jnp.zeros((rows, *input_spec.shape), input_spec.dtype)
    init = jax.jit(sl.init)(k_model, x)  # the same numbers as sl.init; compiled once per process, not per server
    k = schedule.num_clients
    initial = ServerState(
        init.server, init.client, _i32(0), _i32(0), _i32(0), run_key,
        np.full((k,), -1, np.int32), np.zeros((k,), np.int32), np.zeros((k,), bool))
    self.input_spec = init.client.input_spec
    self.cut_spec = init.server.input_spec

    b = schedule.batch_size
    x_struct = jax.ShapeDtypeStruct((b, *input_spec.shape), input_spec.dtype)
    y_struct = jax.ShapeDtypeStruct((b,), jnp.int32)
    self._u_shaped = isinstance(sl, UShaped)
    if self._u_shaped:
      self.algorithm = "sequential_sl_u"
      self._smashed_template, _, self._tail_grad_template, _ = sched.u_shaped_messages(sl, init, x_struct, y_struct)
      self._server_forward, self._server_backward = jax.jit(sl.server_forward), jax.jit(sl.server_backward)
    else:
      self._smashed_template = jax.eval_shape(sl.client_forward, init.client, x_struct, y_struct,
                                              jax.random.key(0))[0]
      algo = sched.algorithm("sequential_sl", sl, schedule, input_spec)  # the simulation's keys and server step
      self._server_step = jax.jit(algo.schedule.server_step)
      _, self._server_key = sched.leg_keys(algo)
    self._half_template = msgs.spec_of(sched.to_message(init.client))
    self._configure_inference(model, sl)

    self._staged: _Staged | None = None
    initial = self._restore(checkpoint_dir, initial)
    if self._version:
      logger.info("resumed from checkpoint %d at round %d, turn %d, step %d", self._version,
                  _int(initial.round), _int(initial.turn), _int(initial.step))
    self.state = initial
    self._durable = _int(initial.step)
    # The first turn's lease starts with the first call from any client, not when the server starts.
    self._deadline = float("inf")
    if self._manager is not None and self._manager.latest_step() is None:
      self._save()
    # Compile the server step now, so the first step of training does not wait for XLA.
    zeros = lambda template: jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), template)  # noqa: E731
    if self._u_shaped:
      _, pending = self._server_forward(self.state.server, zeros(self._smashed_template),
                                        sched.u_shaped_step_keys(self.state.key, 0, 0, 0)[1])
      jax.block_until_ready(self._server_backward(self.state.server, pending, zeros(self._tail_grad_template)))
    else:
      jax.block_until_ready(self._server_step(self.state.server, zeros(self._smashed_template),
                                              self._server_key(self.state.key, 0, 0, 0)))

  algorithm = "sequential_sl"

  # ---- position and lease -----------------------------------------------------------------------------

  def _staged_dict(self):
    if self._staged is None:
      return None
    st = self._staged
    return {"position": [st.round, st.client, st.step],
            "server": None if st.server is None else serialization.to_state_dict(st.server),
            # U-shaped: the pending backward's arrays (the pullback's residuals, the codec key's data).
            "pending": [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
                        for v in jax.tree.leaves(st.pending)]}

  def _predict_party(self, client: int) -> PartyState:
    del client
    return self.state.server

  def _seen(self, client: int) -> None:
    del client
    if self._deadline == float("inf"):  # the first turn's lease starts with the first call from any client
      self._renew_lease()

  def _position(self, client: int | None = None) -> dict[str, Any]:
    del client
    s = self.state
    return {"round": _int(s.round), "turn": _int(s.turn), "step": _int(s.step), "durable": self._durable,
            "done": _int(s.round) >= self.schedule.rounds}

  def _where(self) -> str:
    p = self._position()
    if p["done"]:
      return "training is over"
    return f"the server is at round {p['round']}, client {p['turn']}'s turn, {p['step']} step(s) committed"

  def _turn_of(self, client: int, round_: int) -> int:
    """-1, 0 or 1: the turn (round_, client) is over, current, or to come."""
    now = (_int(self.state.round), _int(self.state.turn))
    return (now < (round_, client)) - (now > (round_, client))

  def _renew_lease(self) -> None:
    self._deadline = self._clock() + self.lease_seconds

  def _expire_if_due(self) -> None:
    if self._position()["done"] or self._clock() <= self._deadline:
      return
    s = self.state
    logger.warning("client %d silent for %.1f s: its turn in round %d ends after %d step(s); staged step %s discarded",
                   _int(s.turn), self.lease_seconds, _int(s.round), _int(s.step),
                   None if self._staged is None else self._staged.step)
    self._end_turn(completed=False, client_half=s.client_half)

  def _end_turn(self, *, completed: bool, client_half: PartyState) -> None:
    s, k = self.state, _int(self.state.turn)
    turn, round_ = (k + 1) % self.schedule.num_clients, _int(s.round) + (k + 1) // self.schedule.num_clients
    self.state = s.replace(
        client_half=client_half, round=_i32(round_), turn=_i32(turn), step=_i32(0),
        last_round=_set(s.last_round, k, s.round), last_steps=_set(s.last_steps, k, s.step),
        last_completed=_set(s.last_completed, k, completed))
    self._staged = None
    self._save()
    self._renew_lease()
    self._cond.notify_all()

  def _save(self) -> None:
    self._save_state()
    self._durable = _int(self.state.step)

  # ---- methods --------------------------------------------------------------------------------------

  def _handover(self, client: int, req: dict) -> bytes:
    if req["op"] == "get":
      return self._handover_get(client, req)
    if req["op"] == "put":
      return self._handover_put(client, req)
    raise wire.invalid(f"Handover request: field 'op' must be 'get' or 'put', got {req['op']!r}")

  def _half_bytes(self) -> bytes:
    return msgs.to_bytes(sched.to_message(self.state.client_half))

  def _handover_get(self, client: int, req: dict) -> bytes:
    round_ = req["round"]
    if round_ == self.schedule.rounds:  # the final client half, once training is over
      end = self._clock() + min(req["wait"], MAX_WAIT_SECONDS)
      while not self._position()["done"] and self._clock() < end:
        self._cond.wait(timeout=min(0.25, max(0.0, end - self._clock())))
        self._expire_if_due()
      done = self._position()["done"]
      return wire.encode({"ready": done, "message": self._half_bytes() if done else None,
                          "position": self._position()})
    if not 0 <= round_ < self.schedule.rounds:
      raise TransportError(_FAILED, f"Handover: round {round_} is not in [0, {self.schedule.rounds}]")
    end = self._clock() + min(req["wait"], MAX_WAIT_SECONDS)
    while self._turn_of(client, round_) > 0 and self._clock() < end:
      self._cond.wait(timeout=min(0.25, max(0.0, end - self._clock())))
      self._expire_if_due()
    where = self._turn_of(client, round_)
    if where < 0:
      raise TransportError(_FAILED, f"Handover: client {client}'s turn in round {round_} is over; {self._where()}")
    if where > 0:
      return wire.encode({"ready": False, "message": None, "position": self._position()})
    if _int(self.state.step) > 0:
      raise TransportError(_FAILED, f"Handover: client {client}'s turn is under way ({self._where()}); "
                                    "the client half of this turn is with the client")
    self._renew_lease()
    return wire.encode({"ready": True, "message": self._half_bytes(), "position": self._position()})

  def _handover_put(self, client: int, req: dict) -> bytes:
    round_, where = req["round"], self._turn_of(client, req["round"])
    if where < 0:
      s = self.state
      if _int(s.last_round[client]) == round_ and bool(s.last_completed[client]):
        return wire.encode({"ready": True, "message": None, "position": self._position()})  # a retry
      raise TransportError(_FAILED, f"Handover: client {client}'s turn in round {round_} ended without its "
                                    f"handover (it was dropped); {self._where()}")
    if where > 0:
      raise TransportError(_FAILED, f"Handover: it is not client {client}'s turn in round {round_}; {self._where()}")
    if req["message"] is None:
      raise wire.invalid("Handover put: field 'message' must hold the client half")
    half = self._read(self._half_template, req["message"], what="Handover put")
    steps = self.schedule.local_steps
    if req["steps"] != steps or _int(self.state.step) != steps:
      raise TransportError(_FAILED, f"Handover put: a turn hands over after {steps} committed steps; the request "
                                    f"says {req['steps']}, and {self._where()}")
    self._end_turn(completed=True, client_half=sched.from_message(half, self.input_spec))
    return wire.encode({"ready": True, "message": None, "position": self._position()})

  def _check_step(self, method: str, client: int, round_: int, step: int) -> None:
    """Raises unless (round_, client, step) is the next step to run: this client's turn, this step."""
    where = self._turn_of(client, round_)
    if where != 0:
      when = "is over" if where < 0 else "has not begun"
      raise TransportError(_FAILED, f"{method}: client {client}'s turn in round {round_} {when}; {self._where()}")
    committed = _int(self.state.step)
    if step < committed:
      raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{method}: step {step} of round {round_} is already committed; {self._where()}")
    if step > committed or step >= self.schedule.local_steps:
      raise TransportError(_FAILED, f"{method}: step {step} is not the next step; {self._where()}")

  def _forward(self, client: int, req: dict) -> bytes:
    round_, step = req["round"], req["step"]
    self._check_step("Forward", client, round_, step)
    message = self._read(self._smashed_template, req["message"], what="Forward")
    # Everything is checked: from here on the request is served.
    self._renew_lease()
    if self._u_shaped:
      # The loss is the client's: the answer is the body's output, loss and accuracy are 0.
      _, k_body, _ = sched.u_shaped_step_keys(self.state.key, round_, client, step)
      body, pending = self._server_forward(self.state.server, message, k_body)
      self._staged = _Staged(round_, client, step, None, pending)
      return wire.encode({"message": msgs.to_bytes(jax.device_get(body)), "loss": 0.0, "accuracy": 0.0})
    server, down, loss, acc = self._server_step(self.state.server, message,
                                                self._server_key(self.state.key, round_, client, step))
    self._staged = _Staged(round_, client, step, server)
    return wire.encode({"message": msgs.to_bytes(down), "loss": float(loss), "accuracy": float(acc)})

  def _backward(self, client: int, req: dict) -> bytes:
    """U-shaped: the tail gradient of the staged step in, the cut gradient out; stages the update."""
    if not self._u_shaped:
      return super()._backward(client, req)
    round_, step = req["round"], req["step"]
    self._check_step("Backward", client, round_, step)
    staged = self._staged
    if staged is None or (staged.round, staged.client, staged.step) != (round_, client, step):
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Backward: step {step} of round {round_} is not staged (never forwarded, or discarded "
                           f"by a server restart); forward it again. {self._where()}")
    message = self._read(self._tail_grad_template, req["message"], what="Backward")
    self._renew_lease()
    # From the committed state and the staged pending: a repeated Backward recomputes the same.
    server, down = self._server_backward(self.state.server, staged.pending, message)
    self._staged = staged._replace(server=server)
    return wire.encode({"message": msgs.to_bytes(jax.device_get(down))})

  def _commit(self, client: int, req: dict) -> bytes:
    round_, step = req["round"], req["step"]
    where, s = self._turn_of(client, round_), self.state
    if where < 0:
      if _int(s.last_round[client]) == round_ and step < _int(s.last_steps[client]):
        return wire.encode(self._position())  # a retry of a commit that went through
      raise TransportError(_FAILED, f"Commit: client {client}'s turn in round {round_} is over and step {step} "
                                    f"was discarded; {self._where()}")
    if where > 0:
      raise TransportError(_FAILED, f"Commit: client {client}'s turn in round {round_} has not begun; {self._where()}")
    if step < _int(s.step):
      return wire.encode(self._position())  # a retry of a commit that went through
    staged = self._staged
    if staged is None or (staged.round, staged.client, staged.step) != (round_, client, step):
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Commit: step {step} of round {round_} is not staged (never forwarded, or discarded "
                           f"by a server restart); forward it again. {self._where()}")
    if staged.server is None:
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Commit: step {step} of round {round_} is not staged: forwarded, but no Backward yet; "
                           f"send its Backward, or forward it again. {self._where()}")
    self.state = s.replace(server=staged.server, step=_i32(step + 1))
    self._staged = None
    self._commits_since_save += 1
    if self._commits_since_save >= self._checkpoint_every:
      self._save()
    self._renew_lease()
    return wire.encode(self._position())

def _i32(x) -> np.ndarray:
  return np.array(x, np.int32)


def _set(array: np.ndarray, index: int, value) -> np.ndarray:
  out = np.array(array)
  out[index] = np.asarray(value)
  return out
