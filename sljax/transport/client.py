"""The client's side of split learning over a network, one driver for every transport and algorithm.

A client holds its own data (numpy arrays) and its client half: during its turn in sequential SL,
all the time in parallel SL and SplitFed v1 and v2 (the algorithm the server names in its handshake;
`run` follows it). Per step it runs the very legs of the simulation: `client_forward` on its
batch, `Forward` to the server, `client_backward` on the cut gradient, then `Commit`. In U-shaped
split learning (`sljax.u_shaped`, algorithms "sequential_sl_u" and "parallel_sl_u") the labels never leave the client:
`Forward` answers with the body's output, the client runs its tail and the loss
(`client_tail_step`), sends the tail gradient (`Backward`), and applies the cut gradient it gets. It keeps the
state it had at the server's last checkpoint (`durable`) until a newer one is durable, so when the
server restarts from its checkpoint the client rolls back to exactly that step and replays from
there: no step is lost or applied twice, and the run ends where an uninterrupted one would.

    session = connect(transport, model, sl, client=k, x=x_k, y=y_k)
    result = run(session)                         # every turn of every round, then the final half
    logits = predict(session, result.half, x_test)   # collaborative inference, same connection
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import grpc
import jax
import jax.numpy as jnp
import numpy as np

import orbax.checkpoint as ocp

from sljax import messages as msgs
from sljax import simulation
from sljax._progress import progress_bar
from sljax.algorithms import parallel_u
from sljax.privacy import handoff
from sljax.protocol import ArraySpec, PartyState, UShaped, Vanilla
from sljax.split import SplitModel
from sljax.transport import schedule as sched
from sljax.transport import wire
from sljax.transport.coordinators import weights_of
from sljax.transport.wire import Transport, TransportError

logger = logging.getLogger(__name__)

_FAILED = grpc.StatusCode.FAILED_PRECONDITION
# The algorithms where clients take turns (the server is a `SplitServer`).
SEQUENTIAL = ("sequential_sl", "sequential_sl_u")
U_SHAPED = ("sequential_sl_u", "parallel_sl_u")
# The algorithms where clients hand in their weights for an average at the end of each round.
_AVERAGED = ("splitfed_v1", "splitfed_v2")


class Session(NamedTuple):
  """What a client knows once connected: who it is, the schedule, and its compiled legs.

  Attributes:
    transport: how it reaches the server.
    client: its id.
    schedule: from the server's handshake.
    run_key: the run key data (uint32), from the handshake: step keys and data order derive from it.
    x, y: its own training data.
    rows: `rows(data_step) -> (batch_size,)` indices into `x`, `y` (the simulation's data order).
    forward, backward: `sl.client_forward` and `sl.client_backward`, jitted.
    infer: the client half's forward pass for inference (train=False), jitted.
    input_spec: the client half's input spec.
    output_spec: the model's output spec (what `predict` returns per row).
    half_template, down_template: templates of the ClientHalf and CutGradient messages it accepts.
    timeout: seconds per call (a `Handover` wait adds its own).
    algorithm: the server's algorithm: "sequential_sl", "sequential_sl_u" (U-shaped),
      "parallel_sl", "splitfed_v1" or "splitfed_v2".
    lease_seconds: the server's lease; calls that wait for other clients may take that long.
    weights_template: template of the ModelWeights message of SplitFed's averaging.
    answer_template: `answer_template(uplink payload) -> template` of the `Predict` answer.
    finish: `finish(half, answer) -> outputs`: the logits of a `Prediction`; U-shaped, the tail on
      the body's output (train=False), jitted.
    tail_step, body_template: U-shaped: `sl.client_tail_step`, jitted, and the template of the
      BodyOutput message it accepts; None otherwise.
    client_key: `client_key(run_key, round_, client, step) -> key` of the client's legs, from the
      simulated algorithm's `Schedule` (vanilla legs; U-shaped, see `u_keys`).
    local_step, client_half: local-loss SL: the client's own step `(half, x, y, key) -> (half,
      SmashedData)`, jitted, and the client half without the auxiliary head (from its `Schedule`).
    u_keys: U-shaped: `u_keys(run_key, round_, client, step) -> (head key, body key, tail key)`:
      the schedule's client key split in three (`sljax.algorithms.parallel_u.u_step_keys`).
    handshake: the fields of this client's Handshake request, to declare its sample count again to
      a SplitFed server that restarted since (`Handover put` says so).
    handoff_key: sequential SL with sealed hand-offs: the clients' shared key (`connect`'s
      `handoff_key`); None: the half is handed over in the clear.
    initial_half: sealed hand-offs: `initial_half() -> PartyState`, the run's initial client half
      (the simulated algorithm's `init` on the handshake's `init_key`), for the client that takes the
      first turn: the server holds none.
  """

  transport: Transport
  client: int
  schedule: sched.Schedule
  run_key: np.ndarray
  x: np.ndarray
  y: np.ndarray
  rows: Callable[[int], jax.Array]
  forward: Callable[..., Any]
  backward: Callable[..., Any]
  infer: Callable[..., Any]
  input_spec: ArraySpec
  output_spec: ArraySpec
  half_template: msgs.ClientHalf
  down_template: msgs.CutGradient
  timeout: float
  algorithm: str = "sequential_sl"
  lease_seconds: float = 120.0
  weights_template: msgs.ModelWeights | None = None
  answer_template: Callable[[Any], Any] | None = None
  finish: Callable[..., Any] | None = None
  tail_step: Callable[..., Any] | None = None
  body_template: msgs.BodyOutput | None = None
  client_key: Callable[..., jax.Array] | None = None
  local_step: Callable[..., Any] | None = None
  client_half: Callable[..., Any] | None = None
  u_keys: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] | None = None
  handshake: Mapping[str, Any] | None = None
  handoff_key: bytes | None = None
  initial_half: Callable[[], PartyState] | None = None


class Result(NamedTuple):
  """What `run` returns: the final client half and one record per committed step of this client."""

  half: PartyState
  history: list[dict]


def call(transport: Transport, method: str, fields: dict, *, timeout: float | None = None) -> dict:
  """One call: encodes the request map, decodes and checks the response map."""
  response = transport.call(method, wire.encode(fields), timeout=timeout)
  return wire.decode(method, response, response=True)


def _call(session: Session, method: str, fields: dict, *, extra_seconds: float = 0.0) -> dict:
  return call(session.transport, method, {"client": session.client, **fields}, timeout=session.timeout + extra_seconds)


def connect(transport: Transport, model: SplitModel, sl: Vanilla | UShaped, *, client: int, x, y,
            timeout: float = 60.0, options: Mapping[str, Any] | None = None,
            handoff_key: bytes | None = None) -> Session:
  """Handshakes with the server and compiles this client's legs.

  Args:
    transport: `GrpcTransport` or `InProcessTransport`.
    model, sl: the same split model and `sljax.vanilla(model, ...)` (or `sljax.u_shaped(model,
      ...)`) as the server's. The handshake sends the configurations of `sl.uplink` and
      `sl.downlink` (`sljax.codecs.describe`); the server refuses them unless they equal its own.
    client: this client's id (its credentials must be that client's).
    x, y: this client's training data, (N, *input shape) and (N,) integer labels.
    timeout: seconds per call.
    options: the algorithm's own options, the same as the server's (local-loss SL: `aux_head`;
      heterogeneous parallel SL: `cuts`, and `sl` is then this client's own cut of the layer stack).
    handoff_key: sequential SL: the 32-byte key the clients share out of band
      (`sljax.privacy.handoff.new_key()`, never given to the server): the client half is sealed
      before `Handover put` and opened after `Handover get` (`sljax.privacy.handoff`), so the server
      relays ciphertext; the server must be started with `sealed_handoffs=True`. None: in the clear.

  Raises:
    TransportError: UNAUTHENTICATED, PERMISSION_DENIED, or FAILED_PRECONDITION when the server's
      protocol version, cut signature or codec configuration differ from this client's (the details say
      which: for codecs, the direction and both configurations), or when one side is U-shaped and the other
      is not, or when one side seals hand-offs and the other does not ("handoff: ...").
    ValueError: if `sl.uplink` or `sl.downlink` carries no configuration (a `Codec` built by hand without
      `config`), or `handoff_key` is not 32 bytes.

  Returns:
    The `Session`: the schedule and run key from the handshake, this client's data and its compiled legs.

  Example:
    Not run by the doctests: building the server and compiling both sides' legs takes seconds
    (tests/test_transport.py runs this flow).

    >>> import jax, numpy as np, optax, sljax
    >>> from sljax.protocol import ArraySpec
    >>> from sljax.transport import InProcessTransport, Schedule, SplitServer
    >>> model = sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=2), 1)
    >>> sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
    >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> server = SplitServer(model, sl, schedule=Schedule(1, 2, 2, 8), input_spec=ArraySpec((4,), "float32"),
    ...                      key=jax.random.key(0), tokens={"t": 0})  # doctest: +SKIP
    >>> session = connect(InProcessTransport(server.handle, token="t"), model, sl, client=0, x=x, y=y)  # doctest: +SKIP
    >>> session.algorithm, session.schedule.rounds  # doctest: +SKIP
    ('sequential_sl', 2)
  """
  x, y = np.asarray(x), np.asarray(y).astype(np.int32)
  if x.ndim < 1 or y.shape != x.shape[:1] or len(y) == 0:
    raise ValueError(f"x, y: expected N >= 1 samples and N labels, got shapes {x.shape} and {y.shape}")
  spec = ArraySpec.of(x)
  codec_fields = wire.codec_fields(sl)
  whole = jax.eval_shape(sl.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *spec.shape), spec.dtype))
  cut = whole.server.input_spec
  handshake = {"protocol": msgs.PROTOCOL_VERSION, "client": client, "cut_shape": list(cut.shape),
               "cut_dtype": cut.dtype, **codec_fields, "samples": len(x)}
  if handoff_key is not None:
    if not isinstance(handoff_key, (bytes, bytearray)) or len(handoff_key) != 32:
      got = f"{len(handoff_key)} bytes" if isinstance(handoff_key, (bytes, bytearray)) else type(handoff_key).__name__
      raise ValueError(f"handoff_key: expected 32 bytes (sljax.privacy.handoff.new_key()), got {got}")
    handshake["handoff"] = "sealed"
  hello = call(transport, "Handshake", handshake, timeout=timeout)
  if handoff_key is not None and "init_key" not in hello:
    raise TransportError(_FAILED, "handoff: the client seals its hand-offs, the server's answer gives no init_key "
                                  "(a server that does not seal them)")
  u_shaped = isinstance(sl, UShaped)
  if u_shaped != (hello["algorithm"] in U_SHAPED):
    raise TransportError(_FAILED, f"algorithm: the server runs {hello['algorithm']!r}, this client's legs are "
                                  f"{'U-shaped' if u_shaped else 'vanilla'}")
  schedule = sched.Schedule(hello["num_clients"], hello["rounds"], hello["local_steps"], hello["batch_size"])
  run_key = np.asarray(hello["run_key"], np.uint32)
  b = schedule.batch_size
  x_struct = jax.ShapeDtypeStruct((b, *spec.shape), spec.dtype)
  y_struct = jax.ShapeDtypeStruct((b,), jnp.int32)
  legs = {}
  half_struct = None  # the client's party, where it is not the protocol's client half
  algo = sched.algorithm(hello["algorithm"], sl, schedule, spec, **(options or {}))
  legs["client_key"] = sched.leg_keys(algo)[0]
  if handoff_key is not None:
    legs["handoff_key"] = bytes(handoff_key)
    legs["initial_half"] = functools.partial(_initial_half, algo, schedule, spec,
                                             np.asarray(hello["init_key"], np.uint32), whole.client.input_spec)
  view = algo.schedule.clients
  if view is not None:  # the clients differ (heterogeneous cuts): this one must run its own legs
    want = view.protocol(client).model.client.layer_names
    if sl.model.client.layer_names != want:
      raise ValueError(f"sl: client {client} runs the layers {want} by the options {dict(options or {})}, "
                       f"this protocol's client half holds {sl.model.client.layer_names}")
  if u_shaped:
    legs["u_keys"] = jax.jit(functools.partial(_u_keys, legs["client_key"]))
  if algo.schedule.client_step is not None:  # its own step (local-loss SL), and its half with more in it
    legs["local_step"] = jax.jit(algo.schedule.client_step)
    legs["client_half"] = algo.schedule.client_half
    sim = jax.eval_shape(algo.init, jax.random.key(0), sched.stand_in_data(schedule, spec))
    half_struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), sim.clients)
  if u_shaped:
    whole = jax.eval_shape(sl.init, jax.random.key(0), x_struct)  # codec states per row of a batch, as the server's
    _, body, _, down = sched.u_shaped_messages(sl, whole, x_struct, y_struct)
    legs.update(tail_step=jax.jit(sl.client_tail_step), body_template=body)
  else:
    up = jax.eval_shape(sl.client_forward, whole.client, x_struct, y_struct, jax.random.key(0))[0]
    down = jax.eval_shape(sl.server_step, whole.server, up, jax.random.key(0))[1]
  half_struct = whole.client if half_struct is None else half_struct
  x1 = jax.ShapeDtypeStruct((1, *spec.shape), spec.dtype)
  out = jax.eval_shape(lambda x: sl.predict(sl.init(jax.random.key(0), x), x)[0], x1)
  session = Session(
      transport=transport, client=client, schedule=schedule, run_key=run_key, x=x, y=y,
      rows=sched.row_order(client=client, count=len(x), batch_size=b, run_key=run_key),
      forward=jax.jit(sl.client_forward), backward=jax.jit(sl.client_backward),
      infer=jax.jit(functools.partial(_infer, sl, legs.get("client_half"))),
      input_spec=whole.client.input_spec, output_spec=ArraySpec.of(out),
      half_template=msgs.spec_of(sched.to_message(half_struct)),
      down_template=down, timeout=timeout, algorithm=hello["algorithm"], lease_seconds=float(hello["lease_seconds"]),
      weights_template=msgs.spec_of(weights_of(half_struct)),
      answer_template=functools.partial(jax.eval_shape, sched.inference_answer(model, sl),
                                        jax.eval_shape(sl.init, jax.random.key(0), x1).server),
      finish=jax.jit(functools.partial(_finish, sl)), handshake=handshake, **legs)
  _warm_up(session, half_struct)
  return session


def _initial_half(algo, schedule: sched.Schedule, spec: ArraySpec, init_key: np.ndarray,
                  input_spec: ArraySpec) -> PartyState:
  """Sealed hand-offs: the run's initial client half, as the server's `init` makes it (and the
  simulation's): the simulated algorithm's `init` on the key whose data the handshake gave."""
  sim = jax.jit(algo.init)(jax.random.wrap_key_data(init_key), sched.stand_in_data(schedule, spec))
  half = jax.tree.map(lambda a: a[0], sim.clients) if algo.client_axes.clients else sim.clients
  return sched.from_message(jax.device_get(sched.to_message(half)), input_spec)


def _run_name(session: Session) -> str:
  """What names the run in a sealed hand-off's associated data: its run key."""
  return "sljax-run-" + "-".join(str(int(v)) for v in np.asarray(session.run_key).ravel())


def _open_half(session: Session, round_: int, message: bytes | None, *, what: str) -> PartyState:
  """The client half of a `Handover get` answer for this client's turn in `round_` (`schedule.rounds`:
  the final half). Sealed: opened with the clients' key, for the round and the client that sealed
  it (its clear header), which must come before this turn; no message: no half was handed over
  yet, the run's initial half.

  Raises:
    TransportError: INVALID_ARGUMENT, a plain half that is not a valid `ClientHalf`.
    sljax.privacy.handoff.HandoffError: a sealed half that does not open (changed on the way,
      sealed with another key or for another run), or claims a hand-off that is not before this turn.
  """
  if session.handoff_key is None:
    half = wire.read_message(session.half_template, message, what=what)
    return sched.from_message(half, session.input_spec)
  if message is None:
    return session.initial_half()
  try:
    sealed_round, sender = handoff.sender(message)
    if (sealed_round, sender) >= (round_, session.client):
      raise handoff.HandoffError(f"data: the half says it was sealed by client {sender} in round {sealed_round}, "
                                 "not before this turn")
    opened = handoff.unseal(session.half_template, message, session.handoff_key, run=_run_name(session),
                            round=sealed_round, client=sender)
  except (handoff.HandoffError, msgs.MessageError) as e:
    raise handoff.HandoffError(f"{what}: client {session.client} cannot open the sealed client half of round "
                               f"{round_}: {e}") from None
  return sched.from_message(opened, session.input_spec)


def _half_message(session: Session, half: PartyState, round_: int) -> bytes:
  """What `Handover put` carries: the client half's `ClientHalf` message, sealed for this round and
  client if the hand-offs are sealed."""
  message = sched.to_message(half)
  if session.handoff_key is None:
    return msgs.to_bytes(message)
  return handoff.seal(jax.device_get(message), session.handoff_key, run=_run_name(session), round=round_,
                      client=session.client)


def _infer(sl: Vanilla | UShaped, client_half: Callable | None, half: PartyState, x) -> Any:
  """The client's inference leg (`sl.client_infer`: its half, U-shaped its head, in eval mode,
  through the uplink codec from a fresh state); `client_half` takes the half out of a party that
  holds more (local-loss SL's auxiliary head). Returns the uplink payload."""
  if client_half is not None:
    half = client_half(half)
  return sl.client_infer(half, x).activations


def _finish(sl: Vanilla | UShaped, half: PartyState, answer: Any) -> Any:
  """The outputs of a `Predict` answer: its logits; U-shaped, the tail's leg (`client_tail_infer`)
  on the body's output, as `UShaped.predict`."""
  if not isinstance(sl, UShaped):
    return answer.logits
  return sl.client_tail_infer(half, answer)


def _warm_up(session: Session, half_struct: PartyState) -> None:
  """Compiles the legs before the first turn, so compilation never eats into a turn's lease."""
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
  half = jax.tree.map(zeros, half_struct)
  x, y = _batch(session, 0)
  down = jax.tree.map(zeros, session.down_template)
  if session.local_step is not None:
    jax.block_until_ready(session.local_step(half, x, y, _client_key(session, 0, 0)))
    return
  if session.tail_step is None:
    _, pending = session.forward(half, x, y, _client_key(session, 0, 0))
  else:
    k_head, _, k_tail = session.u_keys(session.run_key, 0, session.client, 0)
    _, head = session.forward(half, x, k_head)
    _, pending, _ = session.tail_step(half, head, jax.tree.map(zeros, session.body_template), y, k_tail)
  jax.block_until_ready(session.backward(half, pending, down))


def _u_keys(client_key: Callable[..., jax.Array], run_key, round_, client, step):
  """U-shaped (head, body, tail) keys: the schedule's client key split in three."""
  return parallel_u.u_step_keys(client_key(run_key, round_, client, step))


def _client_key(session: Session, round_: int, step: int) -> jax.Array:
  """The key of this client's legs in step `step` of round `round_`, as in the simulation (vanilla
  legs; U-shaped keys are `Session.u_keys`)."""
  return session.client_key(session.run_key, round_, session.client, step)


def _batch(session: Session, data_step: int) -> tuple[np.ndarray, np.ndarray]:
  rows = np.asarray(session.rows(data_step))
  return session.x[rows], session.y[rows]


def status(session: Session) -> dict:
  """The server's position: round, turn, steps committed, the last checkpointed step, done.

  Args:
    session: from `connect`.

  Returns:
    A dict with "round", "turn" (the client whose turn it is), "step" (steps committed in the turn
    or round), "durable" (the last step checkpointed) and "done".

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example
    (before any step).

    >>> status(session)  # doctest: +SKIP
    {'done': False, 'durable': 0, 'round': 0, 'step': 0, 'turn': 0}
  """
  return _call(session, "Status", {})


def _turn_is_over(session: Session, round_: int) -> bool:
  position = status(session)
  return (position["round"], position["turn"]) > (round_, session.client)


def fetch_half(session: Session, round_: int, *, wait: float = 10.0) -> PartyState | None:
  """The client half at the start of this client's turn in `round_` (waiting for the turn), or
  None if that turn is over (the client was late and its turn given away).

  `round_ == schedule.rounds` fetches the final client half once training is over.

  Args:
    session: from `connect`.
    round_: the round of the turn.
    wait: seconds the server may hold each call while the turn has not come; the client calls
      again until it comes.

  Returns:
    The client half (`PartyState`), or None. With sealed hand-offs (`connect(..., handoff_key=)`),
    the half opened with the clients' key, or the run's initial half if none was handed over yet.

  Raises:
    TransportError: as the server answered, but for a turn that is over.
    sljax.privacy.handoff.HandoffError: with sealed hand-offs, a half that does not open: sealed
      with another key or for another run, changed on the way, or said to be sealed at or after this turn.

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example
    (one turn taken by hand, as `run` does).

    >>> half = fetch_half(session, 0)  # doctest: +SKIP
    >>> for step in range(session.schedule.local_steps):  # doctest: +SKIP
    ...   half, position, metrics = train_step(session, half, 0, step)
    >>> hand_over(session, half, 0)  # doctest: +SKIP
    {'done': False, 'durable': 0, 'round': 1, 'step': 0, 'turn': 0}
  """
  while True:
    try:
      response = _call(session, "Handover", {"round": round_, "op": "get", "steps": 0, "wait": wait, "message": None},
                       extra_seconds=wait)
    except TransportError as e:
      if e.code == _FAILED and round_ < session.schedule.rounds and _turn_is_over(session, round_):
        logger.warning("client %d: %s", session.client, e.details)
        return None
      raise
    if response["ready"]:
      return _open_half(session, round_, response["message"], what="Handover get")


def hand_over(session: Session, half: PartyState, round_: int) -> dict:
  """Ends this client's turn in `round_`: uploads the client half for the next client.

  Args:
    session: from `connect`.
    half: the client half after the turn's last step.
    round_: the round of the turn.

  Returns:
    The server's position after the hand-over, as `status` gives it.

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example.

    >>> half, history = run_turn(session, fetch_half(session, 0), 0)  # doctest: +SKIP
    >>> hand_over(session, half, 0)["round"]  # doctest: +SKIP
    1
  """
  response = _call(session, "Handover", {"round": round_, "op": "put", "steps": session.schedule.local_steps,
                                         "wait": 0.0, "message": _half_message(session, half, round_)})
  return response["position"]


def train_step(session: Session, half: PartyState, round_: int, step: int) -> tuple[PartyState, dict, dict]:
  """One step of this client's turn: forward, `Forward`, backward, `Commit`.

  Args:
    session: from `connect`.
    half: the client half before the step.
    round_, step: the round, and the step within the turn (0 .. local_steps - 1).

  Returns:
    (the client half after the step, the server's position after the commit, metrics).

  Raises:
    TransportError: as the server answered (see `run_turn` for the recovery).

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example
    (at the start of its first turn).

    >>> half, position, metrics = train_step(session, fetch_half(session, 0), 0, 0)  # doctest: +SKIP
    >>> position["step"], sorted(metrics)  # doctest: +SKIP
    (1, ['accuracy', 'bytes_down', 'bytes_up', 'client', 'loss', 'round', 'step'])
  """
  return _train_step(session, half, round_, step)


def _train_step(session: Session, half: PartyState, round_: int, step: int,
                before_commit: Callable[[PartyState], None] | None = None) -> tuple[PartyState, dict, dict]:
  """`train_step`; `before_commit(half after the step)` runs before the `Commit` is sent (a client
  with checkpoints saves that half there, so a crash after the server's commit loses nothing)."""
  x, y = _batch(session, sched.data_step(session.schedule, round_, step))
  if session.tail_step is not None:
    return _train_step_u_shaped(session, half, round_, step, x, y, before_commit)
  wait = 0.0 if session.algorithm in SEQUENTIAL else session.lease_seconds + 1.0  # held for the others
  if session.local_step is not None:  # local-loss SL: its own update first; nothing comes back
    new_half, up = session.local_step(half, x, y, _client_key(session, round_, step))
    up_bytes = msgs.to_bytes(up)
    response = _call(session, "Forward", {"round": round_, "step": step, "message": up_bytes}, extra_seconds=wait)
  else:
    up, pending = session.forward(half, x, y, _client_key(session, round_, step))
    up_bytes = msgs.to_bytes(up)
    response = _call(session, "Forward", {"round": round_, "step": step, "message": up_bytes}, extra_seconds=wait)
    down = wire.read_message(session.down_template, response["message"], what="Forward response")
    new_half = session.backward(half, pending, down)
  if before_commit is not None:
    before_commit(new_half)
  position = _call(session, "Commit", {"round": round_, "step": step}, extra_seconds=wait)
  metrics = {"round": round_, "client": session.client, "step": step, "loss": response["loss"],
             "accuracy": response["accuracy"], "bytes_up": len(up_bytes), "bytes_down": len(response["message"])}
  return new_half, position, metrics


def _train_step_u_shaped(session: Session, half: PartyState, round_: int, step: int, x, y,
                         before_commit: Callable[[PartyState], None] | None = None):
  """`train_step` of U-shaped split learning: the labels and the loss stay here."""
  k_head, _, k_tail = session.u_keys(session.run_key, round_, session.client, step)
  wait = 0.0 if session.algorithm in SEQUENTIAL else session.lease_seconds + 1.0  # held for the others
  up, head = session.forward(half, x, k_head)
  up_bytes = msgs.to_bytes(up)
  forward = _call(session, "Forward", {"round": round_, "step": step, "message": up_bytes}, extra_seconds=wait)
  body = wire.read_message(session.body_template, forward["message"], what="Forward response")
  tail_grad, pending, metrics = session.tail_step(half, head, body, y, k_tail)
  tail_bytes = msgs.to_bytes(tail_grad)
  backward = _call(session, "Backward", {"round": round_, "step": step, "message": tail_bytes}, extra_seconds=wait)
  down = wire.read_message(session.down_template, backward["message"], what="Backward response")
  new_half = session.backward(half, pending, down)
  if before_commit is not None:
    before_commit(new_half)
  position = _call(session, "Commit", {"round": round_, "step": step}, extra_seconds=wait)
  metrics = {"round": round_, "client": session.client, "step": step, "loss": float(metrics["loss"]),
             "accuracy": float(metrics["accuracy"]), "bytes_up": len(up_bytes) + len(tail_bytes),
             "bytes_down": len(forward["message"]) + len(backward["message"])}
  return new_half, position, metrics


def run_turn(session: Session, half: PartyState, round_: int,
             on_step: Callable[[dict], None] | None = None) -> tuple[PartyState | None, list[dict]]:
  """This client's turn in `round_`, from the client half it fetched to the one it hands over.

  Returns the client half after the turn, or None if the client was dropped from it (in
  sequential split learning the half then goes on without it), and the records of its steps.

  Recovery: when the server answers that the step is not staged (ABORTED: it restarted, or
  discarded the step) or is not where the client is (FAILED_PRECONDITION, ALREADY_EXISTS), the
  client asks for the server's position. Same step: it forwards the step again. The server's last
  checkpointed step, which the client kept: it rolls back to it and replays. Its turn is over (or,
  training with all clients at once, it was dropped from the round): it stops.

  Args:
    session: from `connect`.
    half: the client half at the start of the turn (`fetch_half`).
    round_: the round of the turn.
    on_step: called with each step's record once the step is committed.

  Returns:
    (the client half after the turn, or None, the records of its steps, as `train_step`'s metrics).

  Raises:
    TransportError: an error the client cannot recover from.

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example.

    >>> half, history = run_turn(session, fetch_half(session, 0), 0)  # doctest: +SKIP
    >>> [record["step"] for record in history]  # doctest: +SKIP
    [0, 1]
  """
  half, completed, history = _train_round(session, half, round_, on_step)
  return (half if completed else None), history


def _train_round(session: Session, half: PartyState, round_: int, on_step: Callable[[dict], None] | None, *,
                 start: int = 0, save: Callable[[int, int, PartyState], None] | None = None
                 ) -> tuple[PartyState, bool, list[dict]]:
  """`run_turn`, returning the last half the server committed and whether the turn completed.

  `start`: the step to begin at (a client resuming from its own checkpoint at the server's
  position). `save(round, step, half)` checkpoints the half after each step, before that step's
  `Commit` is sent: a client killed once the server committed the step, before it heard so,
  restarts with the half the server expects. The client keeps its half after every step since the
  last one reported checkpointed, so it can roll back to any step a restarted server resumes from.
  """
  # The halves since the last step the server reported checkpointed (the turn's start always is):
  # after a server restart the client rolls back to whichever of them the server resumed from (a
  # checkpoint whose report was lost with the server is one of them).
  kept = {start: half}
  history: list[dict] = []
  step = start
  while step < session.schedule.local_steps:
    try:
      new_half, position, metrics = _train_step(session, half, round_, step,
                                                None if save is None else functools.partial(save, round_, step + 1))
    except TransportError as e:
      if e.code not in (grpc.StatusCode.ABORTED, _FAILED, grpc.StatusCode.ALREADY_EXISTS):
        raise
      position = status(session)
      if (position["round"], position["turn"]) != (round_, session.client):
        logger.warning("client %d: turn of round %d lost after %d step(s): %s", session.client, round_, step,
                       e.details)
        return half, False, history
      if position["step"] == step:
        logger.info("client %d: step %d was not committed (%s); forwarding it again", session.client, step, e.code.name)
        continue
      if position["step"] in kept:
        logger.warning("client %d: the server resumed from step %d; rolling back from step %d", session.client,
                       position["step"], step)
        step = position["step"]
        half = kept[step]
        kept = {s: h for s, h in kept.items() if s <= step}
        history = [h for h in history if h["step"] < step]
        continue
      raise TransportError(_FAILED, f"client {session.client} cannot resume at step {step}: the server is at step "
                                    f"{position['step']}, the client kept steps {sorted(kept)}") from None
    half, step = new_half, step + 1
    kept[step] = half
    history.append(metrics)
    if on_step is not None:
      on_step(metrics)
    if position["durable"] == step:
      kept = {step: half}
  return half, True, history


def run(session: Session, *, wait: float = 10.0, progress: bool = False,
        checkpoint_dir: str | os.PathLike | None = None) -> Result:
  """Every turn of this client, round after round, then the final client half.

  A turn lost to a lease (the client was too slow) is skipped with a warning; the client takes
  part again in the next round with the client half the server hands it then.

  With `checkpoint_dir`, the client checkpoints its half (orbax) at the start of each turn or
  round it takes part in and after each step, before sending the step's `Commit`. A client
  process restarted on the same directory resumes at the server's position if it saved the half
  for it (the server is still in that turn or round: a crash of the client, at any point of a
  step, costs nothing when it is back within the server's lease). Otherwise, and without a
  checkpoint: in sequential SL it fetches the half of its turn under way, which makes the server
  roll the turn back to its start, and redoes the turn (bit for bit the same); with all clients at
  once it leaves the round under way (`Handover leave`) and joins the next with the half it saved,
  or without a checkpoint the initial half (SplitFed: the average), as in simulation when a client
  drops (docs/protocol.md, section 6.1). `Result.history` then holds the steps of this process only.

  Args:
    session: from `connect`.
    wait: seconds the server may hold a call that waits for the turn or the other clients.
    progress: show a progress bar of the steps (tqdm).
    checkpoint_dir: where to checkpoint the client half; None for no checkpoints.

  Returns:
    A `Result`: the final client half and one record per step this client committed.

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example, fresh.

    >>> result = run(session)  # doctest: +SKIP
    >>> len(result.history), status(session)["done"]  # doctest: +SKIP
    (4, True)
  """
  schedule = session.schedule
  saver = None if checkpoint_dir is None else _HalfCheckpoints(checkpoint_dir, session)
  total = schedule.rounds * schedule.local_steps
  with progress_bar(total=total, desc=f"client {session.client}", disable=not progress) as bar:

    def on_step(metrics):
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    try:
      if session.algorithm not in SEQUENTIAL:
        return _run_together(session, wait=wait, on_step=on_step, saver=saver)
      return _run_in_turns(session, wait=wait, on_step=on_step, saver=saver)
    finally:
      if saver is not None:
        saver.close()


def _run_in_turns(session: Session, *, wait: float, on_step: Callable[[dict], None],
                  saver: _HalfCheckpoints | None) -> Result:
  """Sequential SL: the client's turn in every round, then the final client half."""
  schedule, history = session.schedule, []
  resume = None if saver is None else saver.latest()
  for round_ in range(schedule.rounds):
    start, half = 0, None
    if resume is not None and resume[0] == round_:
      position = status(session)
      if (position["round"], position["turn"]) == (round_, session.client):
        half = saver.at(round_, position["step"])  # the half after the server's last committed step, if saved
        if half is not None:
          start = position["step"]
          logger.info("client %d: resuming its turn of round %d at step %d from its checkpoint", session.client,
                      round_, start)
      resume = None
    if half is None:
      half = fetch_half(session, round_, wait=wait)
      if half is None:
        continue
      if saver is not None:
        saver.save(round_, 0, half)
    half, completed, turn = _train_round(session, half, round_, on_step, start=start,
                                         save=None if saver is None else saver.save)
    history += turn
    if not completed:
      continue
    try:
      hand_over(session, half, round_)
    except TransportError as e:  # the lease ran out between the last commit and the handover
      if e.code != _FAILED or not _turn_is_over(session, round_):
        raise
      logger.warning("client %d: %s", session.client, e.details)
      continue
    if turn:
      logger.info("client %d: round %d done, loss %.4f", session.client, round_, turn[-1]["loss"])
  final = fetch_half(session, schedule.rounds, wait=wait)
  if final is None:
    raise TransportError(_FAILED, "the server did not hand out the final client half")
  return Result(final, history)


def _await_round(session: Session, round_: int, *, wait: float) -> dict:
  """`Handover get` of `round_` until the server says it has begun (or training is over)."""
  while True:
    response = _call(session, "Handover", {"round": round_, "op": "get", "steps": 0, "wait": wait, "message": None},
                     extra_seconds=wait)
    if response["ready"]:
      return response


def _put_weights(session: Session, half: PartyState, round_: int) -> None:
  """SplitFed: hands in the client's weights at the end of `round_`; if the server restarted since
  the handshake and so lost the client's sample count, handshakes again and hands them in again."""
  fields = {"round": round_, "op": "put", "steps": session.schedule.local_steps, "wait": 0.0,
            "message": msgs.to_bytes(weights_of(half))}
  try:
    _call(session, "Handover", fields)
  except TransportError as e:
    if e.code != _FAILED or "handshake again" not in e.details or session.handshake is None:
      raise
    logger.info("client %d: %s", session.client, e.details)
    call(session.transport, "Handshake", dict(session.handshake), timeout=session.timeout)
    _call(session, "Handover", fields)


def _merge_average(session: Session, half: PartyState, response: dict) -> PartyState:
  """SplitFed: the round's averaged params and model state; the optimizer and codec states stay."""
  weights = wire.read_message(session.weights_template, response["message"], what="Handover get").params
  return half.replace(params=weights["params"], model_state=weights["model_state"])


def _run_together(session: Session, *, wait: float, on_step: Callable[[dict], None],
                  saver: _HalfCheckpoints | None = None) -> Result:
  """Parallel split learning or SplitFed v1 or v2: every round, all clients at once.

  The client fetches the initial client half, then per round trains `local_steps` steps (each
  `Forward` and `Commit` held by the server until the other clients are there, in parallel SL)
  and, in SplitFed, hands in its weights and fetches their average before the next round. A
  client dropped from a round keeps its half as the server last committed it and joins the next
  round.
  """
  schedule, history = session.schedule, []
  resume = None if saver is None else saver.latest()
  start, in_round = 0, True
  if resume is not None:  # this client's own half, as checkpointed at the server's position
    position = status(session)
    found = None
    if position["turn"] == session.client and not position["done"]:
      found = saver.at(position["round"], position["step"])
      if found is None and position["step"] == 0 and position["round"] > 0:  # the round began since its last step
        found = saver.at(position["round"] - 1, schedule.local_steps)
        if found is not None and session.algorithm in _AVERAGED:
          found = _merge_average(session, found, _await_round(session, position["round"], wait=wait))
    if found is not None:
      round_, start, half = position["round"], position["step"], found
      logger.info("client %d: resuming round %d at step %d from its checkpoint", session.client, round_, start)
    else:  # the server is elsewhere: out of this round with its latest half, as in simulation when a client drops
      round_, _, half = resume
      in_round = False
      _leave(session, position)
  else:
    response = _await_round(session, 0, wait=wait)
    half = sched.from_message(wire.read_message(session.half_template, response["message"], what="Handover get"),
                              session.input_spec)
    position = response["position"]
    round_ = position["round"]
    if position["turn"] != session.client or position["step"] > 0:  # its steps of this round died with it
      in_round = False
      _leave(session, position)
    elif round_ > 0 and session.algorithm in _AVERAGED:  # joining late: start from the latest average
      half = _merge_average(session, half, _await_round(session, round_, wait=wait))
    if saver is not None and in_round:
      saver.save(round_, 0, half)
  while round_ < schedule.rounds:
    completed, steps = in_round, []  # resumed after its last step: it still hands in its weights
    if in_round and start < schedule.local_steps:
      half, completed, steps = _train_round(session, half, round_, on_step, start=start,
                                            save=None if saver is None else saver.save)
    start, in_round = 0, True
    history += steps
    if completed and session.algorithm in _AVERAGED:
      try:
        _put_weights(session, half, round_)
      except TransportError as e:  # dropped between its last commit and the handover: out of the average
        if e.code != _FAILED:
          raise
        logger.warning("client %d: %s", session.client, e.details)
        completed = False
    response = _await_round(session, round_ + 1, wait=wait)
    if session.algorithm in _AVERAGED:
      half = _merge_average(session, half, response)
    logger.info("client %d: round %d %s", session.client, round_, "done" if completed else "lost")
    round_ = response["position"]["round"]
    if saver is not None and round_ < schedule.rounds:
      saver.save(round_, 0, half)
  return Result(half, history)


def _leave(session: Session, position: dict) -> None:
  """Restarted without the half of the round under way (`position`, the server's for this client):
  tells the server to drop the client from that round now (`Handover leave`) rather than after a
  lease, so the others go on; the client takes part again from the next round."""
  if position["done"] or position["turn"] != session.client:
    return  # training is over, or the client is already out of the round
  logger.warning("client %d: restarted without its half of round %d after %d committed step(s); it leaves the "
                 "round and joins the next", session.client, position["round"], position["step"])
  _call(session, "Handover", {"round": position["round"], "op": "leave", "steps": position["step"], "wait": 0.0,
                              "message": None})


# Orbax's asynchronous saves signal each other through process-wide keys: two managers saving at
# once from two threads of one process (clients simulated as threads) can wait on each other's
# keys. Client checkpoints are therefore written one at a time per process.
_SAVING = threading.Lock()


class _HalfCheckpoints:
  """A client's own checkpoints of its half (orbax), each at a position (round, step)."""

  def __init__(self, directory: str | os.PathLike, session: Session):
    with _SAVING:
      self._manager = simulation.checkpoint_manager(directory)
    self._steps = session.schedule.local_steps
    self._like = {"position": np.zeros((2,), np.int32),
                  "half": jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), session.half_template)}
    self._input_spec = session.input_spec

  def save(self, round_: int, step: int, half: PartyState) -> None:
    number = round_ * (self._steps + 1) + step
    if number in self._manager.all_steps():  # saved by an earlier process: the same position, the same half
      return
    item = {"position": np.array([round_, step], np.int32), "half": jax.device_get(sched.to_message(half))}
    with _SAVING:
      self._manager.save(number, args=ocp.args.StandardSave(item), force=True)
      self._manager.wait_until_finished()

  def at(self, round_: int, step: int) -> PartyState | None:
    """The half saved at (round_, step), if it is among the checkpoints kept; else None."""
    number = round_ * (self._steps + 1) + step
    if number not in self._manager.all_steps():
      return None
    with _SAVING:
      item = simulation.restore(self._manager, self._like, number)
    return sched.from_message(item["half"], self._input_spec)

  def latest(self) -> tuple[int, int, PartyState] | None:
    if self._manager.latest_step() is None:
      return None
    with _SAVING:
      item = simulation.restore(self._manager, self._like)
    round_, step = (int(v) for v in np.asarray(item["position"]))
    return round_, step, sched.from_message(item["half"], self._input_spec)

  def close(self) -> None:
    with _SAVING:
      self._manager.wait_until_finished()
      self._manager.close()


def predict(session: Session, half: PartyState, x, *, batch_size: int = 1024) -> np.ndarray:
  """Collaborative inference: this client's half runs here, the server's half there (`Predict`).

  Returns the model's outputs (e.g. logits) for every row of `x`: the server's (vanilla), or, in
  U-shaped split learning, those of this client's tail on the body's output the server returns. No
  labels are sent; the smashed data goes through the uplink codec, as in `Vanilla.predict`.

  Args:
    session: from `connect`.
    half: the client half to run (e.g. `run(session).half`).
    x: the inputs, (N, *input shape).
    batch_size: the rows sent per `Predict` call.

  Returns:
    The outputs, a numpy array (N, *output shape).

  Example:
    Not run by the doctests (it needs a server): `session` as in `connect`'s example.

    >>> result = run(session)  # doctest: +SKIP
    >>> predict(session, result.half, x[:3]).shape  # doctest: +SKIP
    (3, 2)
  """
  x, outputs = np.asarray(x), []
  for start in range(0, len(x), batch_size):
    rows = x[start:start + batch_size]
    payload = jax.device_get(session.infer(half, rows))
    response = _call(session, "Predict", {"batch": len(rows), "message": msgs.to_bytes(msgs.SmashedData(payload))})
    answer = wire.read_message(session.answer_template(payload), response["message"], what="Predict response")
    outputs.append(np.asarray(session.finish(half, answer)))
  return np.concatenate(outputs)
