"""What the server of each way of serving clients does, as pure state transitions.

A coordinator holds configuration and compiled computations only; its methods map a
`CoordinatorState` and one request to a new state and an outcome, a `Reply` or a `Wait`:

    state, outcome = coordinator.on_forward(state, client, round_, step, message_bytes)

A `Wait(until, then, seconds)` asks the caller to wait (for other clients' calls, which change the
state) until `until(state)` holds or `seconds` pass, and then to call `then(state)`, which answers.
A refused request raises a `TransportError` and the state it was given is left as it was (there is
nothing else to undo: states are immutable). The server (`sljax.transport.ConcurrentServer`) is a
shell around a coordinator: I/O, identities, leases, the lock and checkpoints; so every transition
here can be tested without threads or sockets.

The algorithm-specific numbers (the server's step, the keys, the serving order, the averaging)
come from the simulated algorithm's `Schedule` (`sljax.algorithms`); a coordinator adds only the
order of calls each way of serving needs:

- `Lockstep` (parallel SL): a barrier per step: one server step on every client's smashed data,
  then every client's commit before the update is applied. `LockstepU` (U-shaped parallel SL):
  the same barriers around the server's two legs (body forward, body backward and update).
  `PerClient` (heterogeneous parallel SL): `Lockstep` with one message shape per client.
  `LocalLoss` (local-loss SL): the same barriers, and nothing comes back.
- `Turns` (sequential SL, vanilla and U-shaped): the clients take turns, the client half relayed
  through the server.
- `Copies` (SplitFed v1): a server copy per client, no barrier within a round; FedAvg at the end.
- `InOrder` (SplitFed v2): one server half serving the clients in the round's drawn order; FedAvg
  of the client halves at the end.

`COORDINATORS` maps each algorithm that runs over the network to its coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from sljax import messages as msgs
from sljax.algorithms import Algorithm
from sljax.algorithms import _common as c
from sljax.privacy import handoff
from sljax.protocol import PartyState
from sljax.transport import schedule as sched
from sljax.transport import wire
from sljax.transport.server import MAX_WAIT_SECONDS
from sljax.transport.wire import TransportError

logger = logging.getLogger(__name__)

PyTree = Any
_FAILED = grpc.StatusCode.FAILED_PRECONDITION


@struct.dataclass
class ConcurrentState:
  """Everything the server holds that a checkpoint saves.

  Attributes:
    server: parallel SL: the server half, with one downlink codec state per client (K, ...), as
      in `parallel_sl`'s state; SplitFed v1: one copy of the server half per client, stacked (K, ...).
    round: the current round; equals the schedule's rounds when training is over.
    step: parallel SL and SplitFed v2: the steps of this round applied so far (every client's step).
    turn: SplitFed v2: the position, in this round's order of clients, of the client the server
      serves next in the current step.
    upto: (K,) int32, for each client the number of its committed steps since the start of the
      run, counting a round as `local_steps` steps (a client's step s of round r is committed
      iff `upto > r * local_steps + s`).
    gone: (K,) bool, the clients dropped from the current round.
    samples: (K,) int32, each client's training rows (declared in its handshake, recorded with its
      `Handover put`): FedAvg's weights.
    handed: (K,) bool, SplitFed: the clients that handed in their weights this round.
    weights: SplitFed: the handed-in client weights, stacked (K, ...); parallel SL: ().
    average: SplitFed: the last average of the client weights (what every client fetches); ().
    key: the run key data (uint32).
  """

  server: PartyState
  round: np.ndarray
  step: np.ndarray
  turn: np.ndarray
  upto: np.ndarray
  gone: np.ndarray
  samples: np.ndarray
  handed: np.ndarray
  weights: PyTree
  average: PyTree
  key: np.ndarray


class Pending(NamedTuple):
  """Lockstep: the step under way (not checkpointed: a restart discards it)."""

  round: int
  step: int
  smashed: Mapping[int, msgs.SmashedData]
  # Filled in once every client in the round has forwarded:
  forwarded: np.ndarray | None = None
  server: PartyState | None = None
  payload: Any = None
  losses: np.ndarray | None = None
  accuracies: np.ndarray | None = None


class Volatile(NamedTuple):
  """What a restart loses: steps under way, and the bookkeeping of checkpoints.

  Attributes:
    pending: Lockstep: the step under way.
    committed: Lockstep: the clients that committed the pending step.
    staged: Copies, InOrder: client -> (round, step, server half) forwarded and not committed.
    durable_upto: `ConcurrentState.upto` as of the latest checkpoint.
    commits_since_save: steps applied or committed since the latest checkpoint.
    must_save: the state must be checkpointed before the caller hears of it.
    declared: SplitFed: client -> the training rows its latest handshake declared, recorded in
      `ConcurrentState.samples` (and so checkpointed) only with its next `Handover put`.
  """

  pending: Pending | None = None
  committed: frozenset = frozenset()
  staged: Mapping[int, tuple[int, int, PartyState]] = {}
  durable_upto: np.ndarray | None = None
  commits_since_save: int = 0
  must_save: bool = False
  declared: Mapping[int, int] = {}


class CoordinatorState(NamedTuple):
  durable: ConcurrentState
  volatile: Volatile

  def replace(self, **fields) -> CoordinatorState:
    """A new state with `fields` of the durable state replaced."""
    return self._replace(durable=self.durable.replace(**fields))

  def set(self, **fields) -> CoordinatorState:
    """A new state with `fields` of the volatile state replaced."""
    return self._replace(volatile=self.volatile._replace(**fields))


# Stands for the caller's position in a reply: the shell fills it in once the transition's effects
# (its checkpoint) are done, so `durable` counts the checkpoint the reply waited for.
POSITION = "<position>"


class Reply(NamedTuple):
  """The response's fields; `POSITION` (as the whole reply or as a field's value) stands for the
  caller's position after the transition's checkpoint."""

  fields: dict | str


class Wait(NamedTuple):
  """Wait until `until(state)` (or `seconds`), then answer with `then(state) -> (state, outcome)`."""

  until: Callable[[CoordinatorState], bool]
  then: Callable[[CoordinatorState], tuple[CoordinatorState, Any]]
  seconds: float


def _set(array: np.ndarray, index: int, value) -> np.ndarray:
  out = np.array(array)
  out[index] = value
  return out


def _i32(x) -> np.ndarray:
  return np.array(x, np.int32)


def weights_of(party: PartyState) -> msgs.ModelWeights:
  """What a SplitFed client hands in for averaging: its params and model state."""
  return msgs.ModelWeights({"params": party.params, "model_state": party.model_state})


class Coordinator:
  """What every way of serving shares: the position in the schedule, checks, drops, rounds.

  Args:
    algo: the simulated algorithm (`transport.schedule.algorithm(...)`): its `Schedule` gives the
      server's step, keys, order and averaging.
    schedule: the run's schedule (clients, rounds, local steps, batch size).
    lease_seconds: how long a call may wait for other clients.
    smashed_template, weights_template: templates of the Forward and Handover put messages (the
      Forward's: one for every client, or a tuple with one per client where the clients differ);
    tail_template: U-shaped, of the Backward message (a TailGradient); half_template: sequential
      SL, of the client half handed back (`Handover put`).
    sealed_bytes: sequential SL with sealed hand-offs (`sljax.privacy.handoff`): the size of a sealed
      client half, which the server stores and relays without reading it; None: the half is relayed
      in the clear, checked against `half_template`.
    max_message_bytes: the largest message accepted.
    max_abs_value, num_classes: the largest magnitude of a floating value, and the labels' bound,
      in a client's message (see `SplitServer`); None: unchecked.
  """

  averages = False  # clients hand in their weights at the end of each round

  def __init__(self, algo: Algorithm, *, schedule: sched.Schedule, lease_seconds: float, smashed_template,
               weights_template, max_message_bytes: int, tail_template=None, max_abs_value: float | None = None,
               num_classes: int | None = None, half_template=None, sealed_bytes: int | None = None):
    self.algo = algo
    self.tail_template = tail_template
    self.half_template = half_template
    self.sealed_bytes = sealed_bytes
    self.schedule = schedule
    self.lease_seconds = lease_seconds
    k = schedule.num_clients
    self.smashed_templates = tuple(smashed_template) if isinstance(smashed_template, tuple) else (smashed_template,) * k
    self.weights_template = weights_template
    self.max_message_bytes = max_message_bytes
    self.max_abs_value = max_abs_value
    self.num_classes = num_classes
    self.num_clients = schedule.num_clients
    self._build()

  def _build(self) -> None:
    """Compiles the algorithm's computations this coordinator uses."""

  # ---- the state -----------------------------------------------------------------------------------

  def initial(self, sim) -> ConcurrentState:
    """The state before any round: the server's part of the simulated algorithm's `init` (its
    `SimState`), so the server starts where the simulation does."""
    k = self.num_clients
    one = weights_of(jax.tree.map(lambda a: a[0], sim.clients)).params if self.averages else ()
    weights = c.stack_party(one, k) if self.averages else ()
    average = one  # before any round, the "average" is the initial client half
    state = ConcurrentState(
        server=sim.server, round=_i32(0), step=_i32(0), turn=_i32(0),
        upto=np.zeros((k,), np.int32), gone=np.zeros((k,), bool), samples=np.zeros((k,), np.int32),
        handed=np.zeros((k,), bool), weights=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), weights),
        average=average, key=np.asarray(sim.key))
    return jax.device_get(state)

  def start(self, durable: ConcurrentState) -> CoordinatorState:
    """The state of a server that starts (or restarts) from `durable`."""
    return CoordinatorState(durable, Volatile(durable_upto=np.array(durable.upto)))

  def saved(self, s: CoordinatorState) -> CoordinatorState:
    """After a checkpoint of `s.durable`."""
    return s.set(durable_upto=np.array(s.durable.upto), commits_since_save=0, must_save=False)

  def hello(self, s: CoordinatorState, client: int, samples: int) -> CoordinatorState:
    """A handshake that passed its checks. It changes nothing durable (and writes no checkpoint):
    SplitFed notes the client's training rows (FedAvg's weights) until its next `Handover put`."""
    if not self.averages:
      return s
    return s.set(declared={**s.volatile.declared, client: samples})

  def done(self, s: CoordinatorState) -> bool:
    return int(s.durable.round) >= self.schedule.rounds

  def steps_of(self, s: CoordinatorState, client: int, upto: np.ndarray | None = None) -> int:
    """The steps `client` has committed in the current round."""
    upto = s.durable.upto if upto is None else upto
    return max(0, int(upto[client]) - int(s.durable.round) * self.schedule.local_steps)

  def position(self, s: CoordinatorState, client: int | None = None) -> dict[str, Any]:
    steps = 0 if client is None else self.steps_of(s, client)
    durable = 0 if client is None else min(steps, self.steps_of(s, client, s.volatile.durable_upto))
    turn = -1 if client is None or s.durable.gone[client] else client  # all clients' turn, except the dropped
    return {"round": int(s.durable.round), "turn": turn, "step": steps, "durable": durable, "done": self.done(s)}

  def where(self, s: CoordinatorState, client: int) -> str:
    if self.done(s):
      return "training is over"
    gone = " (dropped from this round)" if s.durable.gone[client] else ""
    return (f"the server is at round {int(s.durable.round)}; client {client}{gone} has committed "
            f"{self.steps_of(s, client)} step(s)")

  def check_round(self, s: CoordinatorState, method: str, client: int, round_: int) -> None:
    d = s.durable
    if self.done(s):
      raise TransportError(_FAILED, f"{method}: training is over")
    if round_ != int(d.round):
      when = "is over" if round_ < int(d.round) else "has not begun"
      raise TransportError(_FAILED, f"{method}: round {round_} {when}; {self.where(s, client)}")
    if d.gone[client]:
      raise TransportError(_FAILED, f"{method}: client {client} was dropped from round {round_} and takes part again "
                                    f"from round {round_ + 1}; {self.where(s, client)}")

  def check_next(self, s: CoordinatorState, method: str, client: int, round_: int, step: int) -> None:
    self.check_round(s, method, client, round_)
    done = self.steps_of(s, client)
    if step < done:
      raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{method}: step {step} of round {round_} is already committed; {self.where(s, client)}")
    if step > done or step >= self.schedule.local_steps:
      raise TransportError(_FAILED, f"{method}: step {step} is not the next step; {self.where(s, client)}")

  def committed_before(self, s: CoordinatorState, client: int, round_: int, step: int) -> bool:
    return int(s.durable.upto[client]) > round_ * self.schedule.local_steps + step

  def read_smashed(self, message: bytes, client: int) -> msgs.SmashedData:
    return self.read(self.smashed_templates[client], message, what="Forward")

  def read(self, template, message: bytes, *, what: str) -> Any:
    """A client's message, within the server's limits; INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) if not."""
    return wire.read_message(template, message, what=what, max_bytes=self.max_message_bytes,
                             max_abs=self.max_abs_value, num_classes=self.num_classes)

  def zeros(self, client: int) -> msgs.SmashedData:
    """Client `client`'s Forward message of zeros: its stand-in in a step it did not take."""
    return jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), self.smashed_templates[client])

  def not_staged(self, s: CoordinatorState, method: str, client: int, round_: int, step: int) -> TransportError:
    return TransportError(grpc.StatusCode.ABORTED,
                          f"{method}: step {step} of round {round_} is not staged (never forwarded, or discarded by a "
                          f"server restart); forward it again. {self.where(s, client)}")

  # ---- drops and rounds --------------------------------------------------------------------------

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    """Whether others wait for `client` now."""
    raise NotImplementedError

  def droppable(self, s: CoordinatorState, client: int) -> bool:
    """Whether `client`, if silent for a lease, is dropped now: still in the round, and waited for."""
    return not s.durable.gone[client] and self.waited_for(s, client)

  def drop(self, s: CoordinatorState, client: int, why: str) -> CoordinatorState:
    """Drops `client` from the current round; its staged step is discarded."""
    logger.warning("client %d dropped from round %d after %d step(s): %s", client, int(s.durable.round),
                   self.steps_of(s, client), why)
    staged = {k: v for k, v in s.volatile.staged.items() if k != client}
    return s.replace(gone=_set(s.durable.gone, client, True)).set(staged=staged)

  def advance(self, s: CoordinatorState) -> CoordinatorState:
    """Completes whatever every client still in the round has done its part of."""
    return s

  def next_round(self, s: CoordinatorState) -> CoordinatorState:
    k = self.num_clients
    s = s.replace(round=_i32(int(s.durable.round) + 1), step=_i32(0), turn=_i32(0), gone=np.zeros((k,), bool),
                  handed=np.zeros((k,), bool)).set(must_save=True)
    logger.info("round %d begins", int(s.durable.round))
    return s

  def count_commit(self, s: CoordinatorState, *, save: bool = False) -> CoordinatorState:
    v = s.volatile
    return s.set(commits_since_save=v.commits_since_save + 1, must_save=v.must_save or save)

  # ---- methods -------------------------------------------------------------------------------------

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    raise NotImplementedError

  def on_commit(self, s: CoordinatorState, client: int, round_: int, step: int):
    raise NotImplementedError

  def on_backward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    """U-shaped only: the tail gradient of the client's step in, its cut gradient out."""
    del s, client, round_, step, message
    raise TransportError(grpc.StatusCode.UNIMPLEMENTED,
                         f"Backward: this server runs {self.algo.name}; only U-shaped split learning has a Backward")

  def on_get(self, s: CoordinatorState, client: int, round_: int, wait: float, initial_half: bytes):
    """Handover get. Round 0: the initial client half. Round r > 0: waits for round r to begin;
    SplitFed sends the latest average of the client weights (None in parallel SL)."""
    if not 0 <= round_ <= self.schedule.rounds:
      raise TransportError(_FAILED, f"Handover: round {round_} is not in [0, {self.schedule.rounds}]")
    if round_ == 0:
      return s, Reply({"ready": True, "message": initial_half, "position": POSITION})

    def answer(s):
      ready = int(s.durable.round) >= round_
      message = msgs.to_bytes(msgs.ModelWeights(s.durable.average)) if ready and self.averages else None
      return s, Reply({"ready": ready, "message": message, "position": POSITION})

    return s, Wait(lambda s: int(s.durable.round) >= round_, answer, min(wait, MAX_WAIT_SECONDS))

  def on_put(self, s: CoordinatorState, client: int, round_: int, steps: int, message: bytes | None):
    del s, client, round_, steps, message
    raise TransportError(_FAILED, f"Handover put: {self.algo.name} averages nothing; clients keep their halves")

  def on_leave(self, s: CoordinatorState, client: int, round_: int):
    """Handover leave: `client` restarted without its state of `round_` (no checkpoint): it is
    dropped from the round at once, as a lease would drop it, and takes part again from the next.
    Nothing to do (a retry, or the round is over): the position."""
    d = s.durable
    if not self.done(s) and round_ == int(d.round) and not d.gone[client]:
      s = self.advance(self.drop(s, client, "it restarted without its state of the round"))
    return s, Reply({"ready": True, "message": None, "position": POSITION})

  def predict_party(self, s: CoordinatorState, client: int) -> PartyState:
    del client
    return s.durable.server

  def staged_dict(self, s: CoordinatorState) -> dict:
    """What is staged, as plain data (for `snapshot`)."""
    v = s.volatile
    staged = {str(k): {"position": [r, st], "server": serialization.to_state_dict(copy)}
              for k, (r, st, copy) in sorted(v.staged.items())}
    return {"pending": None, "committed": sorted(v.committed), "staged": staged}

  def warm_up(self, s: CoordinatorState) -> None:
    """Compiles the server's steps now, so the first step of training does not wait for XLA."""


class Lockstep(Coordinator):
  """Parallel SL: step s of round r is one server step on the smashed data of every client.

  Each `Forward(r, s)` is held until every client still in the round has forwarded (a barrier);
  then the schedule's `server_step` runs once, and each client gets the gradient of its own loss.
  Each `Commit(r, s)` is held until every client that forwarded has committed; then the update is
  applied, with weight 1 for each client that committed. A client that forwarded and never
  committed has its step discarded: the update is recomputed without its rows' loss, and its
  downlink codec state is left as it was, exactly as the simulation discards a dropped client's step.
  """

  def _build(self) -> None:
    self._step = jax.jit(self.algo.schedule.server_step)

  def _stacked(self, p: Pending) -> msgs.SmashedData:
    ups = [p.smashed[k] if k in p.smashed else self.zeros(k) for k in range(self.num_clients)]
    return jax.tree.map(lambda *a: np.stack(a), *ups)

  def warm_up(self, s: CoordinatorState) -> None:
    weights = np.zeros(self.num_clients, np.float32)
    jax.block_until_ready(self._step(s.durable.server, self._stacked(Pending(0, 0, {})), weights, s.durable.key, 0, 0))

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    p = s.volatile.pending
    if p is None:
      return False
    if p.forwarded is None:
      return client not in p.smashed
    return bool(p.forwarded[client]) and client not in s.volatile.committed

  def advance(self, s: CoordinatorState) -> CoordinatorState:
    p = s.volatile.pending
    if self.done(s) or p is None:
      return s
    gone = s.durable.gone
    if p.forwarded is None and all(gone[k] or k in p.smashed for k in range(self.num_clients)):
      return self._compute(s, p)
    if p.forwarded is not None and all(gone[k] or k in s.volatile.committed for k in np.flatnonzero(p.forwarded)):
      return self._apply(s, p)
    return s

  def _compute(self, s: CoordinatorState, p: Pending) -> CoordinatorState:
    """Every client in the round has forwarded step `p.step`: one server step."""
    forwarded = np.array([k in p.smashed for k in range(self.num_clients)])
    server, payload, losses, accs = self._step(s.durable.server, self._stacked(p), forwarded.astype(np.float32),
                                               s.durable.key, p.round, p.step)
    p = p._replace(forwarded=forwarded, server=server, payload=jax.device_get(payload), losses=np.asarray(losses),
                   accuracies=np.asarray(accs))
    return s.set(pending=p, committed=frozenset())

  def _apply(self, s: CoordinatorState, p: Pending) -> CoordinatorState:
    """Every client that forwarded has committed or is gone: the step becomes state."""
    committed = np.array([k in s.volatile.committed for k in range(self.num_clients)])
    server = p.server
    if not np.array_equal(committed, p.forwarded):  # someone dropped after its forward: discard its part
      server, _, _, _ = self._step(s.durable.server, self._stacked(p), committed.astype(np.float32), s.durable.key,
                                   p.round, p.step)
    steps = self.schedule.local_steps
    upto = np.where(committed, p.round * steps + p.step + 1, s.durable.upto).astype(np.int32)
    s = s.replace(server=server, step=_i32(p.step + 1), upto=upto).set(pending=None, committed=frozenset())
    s = self.count_commit(s)
    return self.next_round(s) if p.step + 1 == steps else s

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self.check_next(s, "Forward", client, round_, step)
    smashed = self.read_smashed(message, client)
    p = s.volatile.pending
    if p is None or (p.round, p.step) != (round_, step):
      p = Pending(round_, step, {})
    if p.forwarded is None:
      p = p._replace(smashed={**p.smashed, client: smashed})  # a retry before the barrier replaces the message
      s = self.advance(s.set(pending=p))

    def computed(s):  # the others forwarded or were dropped within a lease, and the step was computed
      p = s.volatile.pending
      return p is None or (p.round, p.step) != (round_, step) or p.forwarded is not None

    def answer(s):
      p = s.volatile.pending
      if p is None or (p.round, p.step) != (round_, step) or p.forwarded is None or not p.forwarded[client]:
        raise TransportError(grpc.StatusCode.ABORTED, f"Forward: step {step} of round {round_} went on without "
                                                      f"client {client}; {self.where(s, client)}")
      return s, Reply({"message": self._down_bytes(p, client), "loss": float(p.losses[client]),
                       "accuracy": float(p.accuracies[client])})

    return s, Wait(computed, answer, self.lease_seconds + 1.0)

  def on_commit(self, s: CoordinatorState, client: int, round_: int, step: int):
    if self.committed_before(s, client, round_, step):
      return s, Reply(POSITION)  # a retry of a commit that went through
    self.check_next(s, "Commit", client, round_, step)
    p = s.volatile.pending
    if p is None or (p.round, p.step) != (round_, step) or not self._may_commit(p, client):
      raise self.not_staged(s, "Commit", client, round_, step)
    s = self.advance(s.set(committed=s.volatile.committed | {client}))

    def answer(s):
      if not self.committed_before(s, client, round_, step):
        raise TransportError(_FAILED, f"Commit: step {step} of round {round_} was discarded; {self.where(s, client)}")
      return s, Reply(POSITION)

    return s, Wait(lambda s: self.committed_before(s, client, round_, step) or bool(s.durable.gone[client]), answer,
                   self.lease_seconds + 1.0)

  def _may_commit(self, p: Pending, client: int) -> bool:
    """Whether `client` has a part in the pending step to commit (it got its answer)."""
    return p.forwarded is not None and bool(p.forwarded[client])

  def _down_bytes(self, p: Pending, client: int) -> bytes:
    """What the Forward response carries: the client's cut gradient."""
    return msgs.to_bytes(msgs.CutGradient(jax.tree.map(lambda a: a[client], p.payload)))

  def staged_dict(self, s: CoordinatorState) -> dict:
    out = super().staged_dict(s)
    p = s.volatile.pending
    if p is not None and p.server is not None:
      out["pending"] = {"position": [p.round, p.step], "server": serialization.to_state_dict(p.server)}
    return out


class PerClient(Lockstep):
  """Parallel SL whose clients send messages of different shapes (heterogeneous cuts): the barriers
  of `Lockstep`; the schedule's server step takes one message per client, in client order, and
  gives one cut gradient per client."""

  def _stacked(self, p: Pending) -> tuple[msgs.SmashedData, ...]:
    return tuple(p.smashed[k] if k in p.smashed else self.zeros(k) for k in range(self.num_clients))

  def _down_bytes(self, p: Pending, client: int) -> bytes:
    return msgs.to_bytes(msgs.CutGradient(p.payload[client]))


class LocalLoss(Lockstep):
  """Local-loss SL: the barriers of parallel SL, and nothing comes back. Each client has made its
  own local step (half and auxiliary head) before it forwards; the server makes one step per step
  index on everyone's smashed data, and the Forward response carries an empty message. A client
  that forwards and never commits has its smashed data ignored (the update is recomputed without
  it) and, on its side, keeps its half from before the step, as the simulation discards it.
  Over the network the clients wait at the barriers, which local-loss SL itself does not need:
  the final state is the simulation's, the timing is parallel SL's."""

  def _build(self) -> None:
    server_step = self.algo.schedule.server_step

    def step(*args):
      server, losses, accs = server_step(*args)
      return server, None, losses, accs

    self._step = jax.jit(step)

  def _down_bytes(self, p: Pending, client: int) -> bytes:
    del p, client
    return b""


class PendingU(NamedTuple):
  """LockstepU: the step under way (not checkpointed: a restart discards it)."""

  round: int
  step: int
  smashed: Mapping[int, msgs.SmashedData]
  # Filled in once every client in the round has forwarded (the body's forward on all of them):
  forwarded: np.ndarray | None = None
  bodies: Any = None  # the BodyOutput payloads (K, ...), on the host
  body_pending: Any = None  # the server's ServerPending (the body's pullback): never sent
  tails: Mapping[int, msgs.TailGradient] = {}
  # Filled in once every client that forwarded has sent its tail gradient (or is gone):
  backed: np.ndarray | None = None
  server: PartyState | None = None
  cuts: Any = None  # the CutGradient payloads (K, ...), on the host


class LockstepU(Lockstep):
  """U-shaped parallel SL: the barriers of parallel SL around the server's two legs.

  Step s of round r: each `Forward(r, s)` (smashed data, no labels) is held until every client
  still in the round has forwarded; then the body runs once on all of it (the schedule's
  `ServerLegs.forward`) and each client gets its own body output. Each `Backward(r, s)` (the
  gradient of the client's own loss at the body's output) is held until every client that
  forwarded has sent one; then the body's backward and ONE update run (`ServerLegs.backward`,
  weight 1 per client that sent its tail gradient) and each client gets its cut gradient. Each
  `Commit(r, s)` is held until every client that got a cut gradient has committed; a client that
  did not has its step discarded: the backward is recomputed with weight 0 for it, as the
  simulation discards a dropped client's step. The loss stays on the clients: the server reports
  0 for it.
  """

  def _build(self) -> None:
    legs = self.algo.schedule.server_step
    self._forward = jax.jit(legs.forward)
    self._backward = jax.jit(legs.backward)

  def _stack(self, messages: Mapping[int, Any], template) -> Any:
    zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), template)
    return jax.tree.map(lambda *a: np.stack(a), *[messages.get(k, zeros) for k in range(self.num_clients)])

  def warm_up(self, s: CoordinatorState) -> None:
    d = s.durable
    bodies, pending = self._forward(d.server, self._stack({}, self.smashed_templates[0]), d.key, 0, 0)
    del bodies
    weights = np.zeros(self.num_clients, np.float32)
    jax.block_until_ready(self._backward(d.server, pending, self._stack({}, self.tail_template), weights))

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    p = s.volatile.pending
    if p is None:
      return False
    if p.forwarded is None:
      return client not in p.smashed
    if p.backed is None:
      return bool(p.forwarded[client]) and client not in p.tails
    return bool(p.backed[client]) and client not in s.volatile.committed

  def advance(self, s: CoordinatorState) -> CoordinatorState:
    p = s.volatile.pending
    if self.done(s) or p is None:
      return s
    gone, every = s.durable.gone, range(self.num_clients)
    if p.forwarded is None:
      if all(gone[k] or k in p.smashed for k in every):
        return self.advance(self._body_forward(s, p))
    elif p.backed is None:
      if all(gone[k] or k in p.tails for k in np.flatnonzero(p.forwarded)):
        return self._body_backward(s, p)
    elif all(gone[k] or k in s.volatile.committed for k in np.flatnonzero(p.backed)):
      return self._apply(s, p)
    return s

  def _body_forward(self, s: CoordinatorState, p: PendingU) -> CoordinatorState:
    """Every client in the round has forwarded step `p.step`: the body on all of it."""
    forwarded = np.array([k in p.smashed for k in range(self.num_clients)])
    d = s.durable
    bodies, pending = self._forward(d.server, self._stack(p.smashed, self.smashed_templates[0]), d.key, p.round,
                                    p.step)
    return s.set(pending=p._replace(forwarded=forwarded, bodies=jax.device_get(bodies.activations), body_pending=pending))

  def _body_backward(self, s: CoordinatorState, p: PendingU, weights: np.ndarray | None = None) -> CoordinatorState:
    """Every client that forwarded has sent its tail gradient or is gone: the body's backward."""
    backed = np.array([k in p.tails for k in range(self.num_clients)]) if weights is None else weights
    server, cuts = self._backward(s.durable.server, p.body_pending, self._stack(p.tails, self.tail_template),
                                  backed.astype(np.float32))
    p = p._replace(server=server, cuts=jax.device_get(cuts.grad))
    if weights is None:
      p = p._replace(backed=backed)
    return s.set(pending=p, committed=frozenset() if weights is None else s.volatile.committed)

  def _apply(self, s: CoordinatorState, p: PendingU) -> CoordinatorState:
    """Every client that got a cut gradient has committed or is gone: the step becomes state."""
    committed = np.array([k in s.volatile.committed for k in range(self.num_clients)])
    if not np.array_equal(committed, p.backed):  # someone dropped after its backward: discard its part
      p = self._body_backward(s, p, committed).volatile.pending
    steps = self.schedule.local_steps
    upto = np.where(committed, p.round * steps + p.step + 1, s.durable.upto).astype(np.int32)
    s = s.replace(server=p.server, step=_i32(p.step + 1), upto=upto).set(pending=None, committed=frozenset())
    s = self.count_commit(s)
    return self.next_round(s) if p.step + 1 == steps else s

  def _current(self, s: CoordinatorState, round_: int, step: int) -> PendingU | None:
    p = s.volatile.pending
    return p if p is not None and (p.round, p.step) == (round_, step) else None

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self.check_next(s, "Forward", client, round_, step)
    smashed = self.read_smashed(message, client)
    p = self._current(s, round_, step) or PendingU(round_, step, {})
    if p.forwarded is None:
      s = self.advance(s.set(pending=p._replace(smashed={**p.smashed, client: smashed})))  # a retry replaces it

    body = lambda p: msgs.BodyOutput(jax.tree.map(lambda a: a[client], p.bodies))  # noqa: E731
    return s, self._held("Forward", "forwarded", client, round_, step,
                         lambda p: {"message": msgs.to_bytes(body(p)), "loss": 0.0, "accuracy": 0.0})

  def on_backward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self.check_next(s, "Backward", client, round_, step)
    p = self._current(s, round_, step)
    if p is None or p.forwarded is None or not p.forwarded[client]:
      raise self.not_staged(s, "Backward", client, round_, step)
    tail = self.read(self.tail_template, message, what="Backward")
    if p.backed is None:
      s = self.advance(s.set(pending=p._replace(tails={**p.tails, client: tail})))  # a retry replaces it

    cut = lambda p: msgs.CutGradient(jax.tree.map(lambda a: a[client], p.cuts))  # noqa: E731
    return s, self._held("Backward", "backed", client, round_, step, lambda p: {"message": msgs.to_bytes(cut(p))})

  def _held(self, method: str, field: str, client: int, round_: int, step: int, reply) -> Wait:
    """Holds `client`'s call until the step's barrier `field` ("forwarded", "backed") is passed;
    then answers `reply(pending)`, or ABORTED if the step went on without the client."""

    def passed(s):
      p = self._current(s, round_, step)
      return p is None or getattr(p, field) is not None

    def answer(s):
      p = self._current(s, round_, step)
      if p is None or getattr(p, field) is None or not getattr(p, field)[client]:
        raise TransportError(grpc.StatusCode.ABORTED, f"{method}: step {step} of round {round_} went on without "
                                                      f"client {client}; {self.where(s, client)}")
      return s, Reply(reply(p))

    return Wait(passed, answer, self.lease_seconds + 1.0)

  def _may_commit(self, p: PendingU, client: int) -> bool:
    return p.backed is not None and bool(p.backed[client])


class _Averaging(Coordinator):
  """SplitFed: clients hand in their weights at the end of each round (`Handover put`); when every
  client still in the round has, the schedule's `aggregate` averages them (FedAvg weighted by the
  clients' sample counts from their handshakes), and every client fetches the average."""

  averages = True

  def _build(self) -> None:
    schedule = self.algo.schedule
    _, server_key = sched.leg_keys(self.algo)
    copies = self.copies

    def serve(server, client, message, run_key, round_, step):
      half = jax.tree.map(lambda a: a[client], server) if copies else server
      return schedule.server_step(half, message, server_key(run_key, round_, client, step))

    def set_row(stacked, client, one):
      return jax.tree.map(lambda a, o: a.at[client].set(o), stacked, one)

    self._serve = jax.jit(serve)
    self._set_row = jax.jit(set_row)
    self._aggregate = jax.jit(schedule.aggregate)

  copies = False  # a server copy per client

  def warm_up(self, s: CoordinatorState) -> None:
    d = s.durable
    half, _, _, _ = self._serve(d.server, 0, self.zeros(0), d.key, 0, 0)
    ones = np.ones(self.num_clients, np.float32)
    jax.block_until_ready((self._set_row(d.server, 0, half) if self.copies else half,
                           self._set_row(d.weights, 0, d.average), self._aggregate(d.weights, d.server, ones)))

  def advance(self, s: CoordinatorState) -> CoordinatorState:
    if not self.done(s) and (s.durable.handed | s.durable.gone).all():
      return self._end_round(s)
    return s

  def _end_round(self, s: CoordinatorState) -> CoordinatorState:
    """Every client in the round handed in its weights or is gone: FedAvg, next round."""
    d = s.durable
    w = (d.samples * d.handed).astype(np.float32)
    if w.sum() > 0:
      average, server = self._aggregate(d.weights, d.server, w)
      s = s.replace(average=jax.device_get(average), server=server)
    else:  # nobody finished the round: keep the last average rather than average nothing
      logger.warning("round %d: no client handed in its weights; the averages stay as they were", int(d.round))
    return self.next_round(s.set(staged={}))

  def on_put(self, s: CoordinatorState, client: int, round_: int, steps: int, message: bytes | None):
    """The client's weights at the end of its round, for the average."""
    local_steps = self.schedule.local_steps
    if round_ < int(s.durable.round) and int(s.durable.upto[client]) >= (round_ + 1) * local_steps:
      return s, Reply({"ready": True, "message": None, "position": POSITION})  # a retry
    self.check_round(s, "Handover put", client, round_)
    if message is None:
      raise wire.invalid("Handover put: field 'message' must hold the client's ModelWeights")
    weights = self.read(self.weights_template, message, what="Handover put")
    if steps != local_steps or self.steps_of(s, client) != local_steps:
      raise TransportError(_FAILED, f"Handover put: weights are handed in after {local_steps} committed steps; the "
                                    f"request says {steps}, and {self.where(s, client)}")
    d = s.durable
    samples = s.volatile.declared.get(client, int(d.samples[client]))
    if samples < 1:
      raise TransportError(_FAILED, f"Handover put: client {client}'s sample count is unknown (the server restarted "
                                    "since its handshake): handshake again, then put")
    s = s.replace(weights=jax.device_get(self._set_row(d.weights, client, weights.params)),
                  handed=_set(d.handed, client, True), samples=_set(d.samples, client, samples))
    # durable before the client hears of it: it will wait for the average, not put again
    s = self.advance(s).set(must_save=True)
    return s, Reply({"ready": True, "message": None, "position": POSITION})

  def _commit_staged(self, s: CoordinatorState, client: int, half: PartyState, **fields) -> CoordinatorState:
    """The client's staged step becomes state; a client's last step of the round is always made
    durable (it then waits for the average)."""
    staged = {k: v for k, v in s.volatile.staged.items() if k != client}
    # the position of the step, not the count plus one: a client that left the last round part-way counts from 0
    upto = int(s.durable.round) * self.schedule.local_steps + self.steps_of(s, client) + 1
    s = s.replace(server=half, upto=_set(s.durable.upto, client, upto), **fields)
    s = s.set(staged=staged)
    return self.count_commit(s, save=self.steps_of(s, client) == self.schedule.local_steps)


class Copies(_Averaging):
  """SplitFed v1: each client trains against its own copy of the server half, so its `Forward`
  and `Commit` are served at once; the copies are averaged with the client halves."""

  copies = True

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    return not s.durable.handed[client] and bool(s.durable.handed.any())  # others wait for the average

  def predict_party(self, s: CoordinatorState, client: int) -> PartyState:
    return jax.tree.map(lambda a: a[client], s.durable.server)

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self.check_next(s, "Forward", client, round_, step)
    smashed = self.read_smashed(message, client)
    d = s.durable
    copy, down, loss, acc = self._serve(d.server, client, smashed, d.key, round_, step)
    s = s.set(staged={**s.volatile.staged, client: (round_, step, copy)})
    return s, Reply({"message": msgs.to_bytes(down), "loss": float(loss), "accuracy": float(acc)})

  def on_commit(self, s: CoordinatorState, client: int, round_: int, step: int):
    if self.committed_before(s, client, round_, step):
      return s, Reply(POSITION)  # a retry of a commit that went through
    self.check_next(s, "Commit", client, round_, step)
    staged = s.volatile.staged.get(client)
    if staged is None or staged[:2] != (round_, step):
      raise self.not_staged(s, "Commit", client, round_, step)
    s = self._commit_staged(s, client, self._set_row(s.durable.server, client, staged[2]))
    return s, Reply(POSITION)


class InOrder(_Averaging):
  """SplitFed v2: one server half takes the clients one at a time, in the round's order from the
  schedule: in each step, a client's `Forward` is held until every client before it in the order
  has committed or dropped, and its `Commit` passes the turn on. A client that forwarded and never
  commits has its update discarded, and the next client is served from the server half without it."""

  def _build(self) -> None:
    super()._build()
    self._order = jax.jit(self.algo.schedule.order)
    self._orders: dict[int, np.ndarray] = {}  # round -> its order (a pure function of the run key and round)

  def warm_up(self, s: CoordinatorState) -> None:
    super().warm_up(s)
    self.round_order(s)

  def round_order(self, s: CoordinatorState) -> np.ndarray:
    r = int(s.durable.round)
    if r not in self._orders:
      self._orders = {r: np.asarray(self._order(s.durable.key, r))}
    return self._orders[r]

  def serving(self, s: CoordinatorState) -> int:
    """The client the current step serves next."""
    return int(self.round_order(s)[int(s.durable.turn)])

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    if not s.durable.handed[client] and s.durable.handed.any():
      return True  # others wait for the average
    return int(s.durable.step) < self.schedule.local_steps and self.serving(s) == client  # the step waits for it

  def advance(self, s: CoordinatorState) -> CoordinatorState:
    return super().advance(self._skip_gone(s))

  def _skip_gone(self, s: CoordinatorState) -> CoordinatorState:
    """Passes over dropped clients; after the last client, the next step begins."""
    if self.done(s) or int(s.durable.step) >= self.schedule.local_steps:
      return s
    turn, step, order = int(s.durable.turn), int(s.durable.step), self.round_order(s)
    while turn < self.num_clients and s.durable.gone[order[turn]]:
      turn += 1
    if turn == self.num_clients:
      turn, step = 0, step + 1
    if (turn, step) == (int(s.durable.turn), int(s.durable.step)):
      return s
    s = s.replace(turn=_i32(turn), step=_i32(step))
    return self._skip_gone(s) if turn == 0 else s

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self.check_next(s, "Forward", client, round_, step)
    smashed = self.read_smashed(message, client)

    def my_turn(s):
      d = s.durable
      return bool(d.gone[client]) or int(d.round) != round_ or (int(d.step) == step and self.serving(s) == client)

    def serve(s):
      d = s.durable
      if d.gone[client] or int(d.round) != round_:
        self.check_round(s, "Forward", client, round_)  # raises: dropped, or the round is over
      if int(d.step) != step or self.serving(s) != client:
        raise TransportError(grpc.StatusCode.ABORTED, f"Forward: step {step} of round {round_} does not serve client "
                                                      f"{client} yet; forward it again. {self.where(s, client)}")
      server, down, loss, acc = self._serve(d.server, client, smashed, d.key, round_, step)
      s = s.set(staged={**s.volatile.staged, client: (round_, step, server)})
      return s, Reply({"message": msgs.to_bytes(down), "loss": float(loss), "accuracy": float(acc)})

    return s, Wait(my_turn, serve, self.lease_seconds + 1.0)

  def on_commit(self, s: CoordinatorState, client: int, round_: int, step: int):
    if self.committed_before(s, client, round_, step):
      return s, Reply(POSITION)  # a retry of a commit that went through
    self.check_next(s, "Commit", client, round_, step)
    staged = s.volatile.staged.get(client)
    if staged is None or staged[:2] != (round_, step) or self.serving(s) != client:
      raise self.not_staged(s, "Commit", client, round_, step)
    s = self._commit_staged(s, client, staged[2], turn=_i32(int(s.durable.turn) + 1))
    return self._skip_gone(s), Reply(POSITION)


@struct.dataclass
class ServerState:
  """Everything the server of sequential SL holds; a checkpoint saves all of it.

  Attributes:
    server: the server half.
    client_half: the client half as last handed over (at the start of the current turn); with
      sealed hand-offs, its sealed bytes (uint8, `Coordinator.sealed_bytes` of them), all zeros
      until the first hand-over (the first client makes the initial half itself).
    round, turn, step: the position: round `round`, client `turn`'s turn, `step` steps of it
      committed. Training is over when `round` equals the schedule's rounds.
    key: the run key data (uint32): data order and step keys derive from it.
    last_round, last_steps, last_completed: (K,) per client, its last finished turn: the round,
      the steps committed, and whether it handed the client half back (False: it was dropped).
    turn_server: the server half at the start of the current turn: a client that restarts in the
      middle of its turn without its half redoes the turn from there (`Turns.on_get`).
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
  turn_server: PartyState


class Turns(Coordinator):
  """Sequential SL (vanilla and U-shaped): the clients take turns, the client half relayed through
  the server. In its turn a client fetches the half (`Handover get`, held until its turn comes),
  runs `local_steps` steps (each `Forward` staged, U-shaped `Backward`, then `Commit`) and hands
  the half back (`Handover put`), which passes the turn on. A client silent for a lease during its
  turn is dropped: its turn ends, its staged step is discarded, and the half goes on as it was
  handed to it. The durable state is a `ServerState`; `Volatile.staged` holds the step under way,
  `client -> (round, step, server half after it or None, U-shaped body pending)`.
  """

  def _build(self) -> None:
    legs = self.algo.schedule.server_step
    self.u_shaped = self.tail_template is not None
    if self.u_shaped:
      self._forward, self._backward = jax.jit(legs.forward), jax.jit(legs.backward)
    else:
      self._step = jax.jit(legs)
    _, self._server_key = sched.leg_keys(self.algo)

  def initial(self, sim) -> ServerState:
    k = self.num_clients
    # sealed: the server holds no readable half, not even the initial one
    half = sim.clients if self.sealed_bytes is None else np.zeros((self.sealed_bytes,), np.uint8)
    return jax.device_get(ServerState(
        sim.server, half, _i32(0), _i32(0), _i32(0), np.asarray(sim.key), np.full((k,), -1, np.int32),
        np.zeros((k,), np.int32), np.zeros((k,), bool), sim.server))

  def start(self, durable: ServerState) -> CoordinatorState:
    return CoordinatorState(durable, Volatile(durable_upto=np.array(durable.step)))

  def saved(self, s: CoordinatorState) -> CoordinatorState:
    return s.set(durable_upto=np.array(s.durable.step), commits_since_save=0, must_save=False)

  def hello(self, s: CoordinatorState, client: int, samples: int) -> CoordinatorState:
    del client, samples  # nothing is averaged
    return s

  def position(self, s: CoordinatorState, client: int | None = None) -> dict[str, Any]:
    del client
    d = s.durable
    return {"round": int(d.round), "turn": int(d.turn), "step": int(d.step),
            "durable": int(s.volatile.durable_upto), "done": self.done(s)}

  def where(self, s: CoordinatorState, client: int | None = None) -> str:
    del client
    p = self.position(s)
    if p["done"]:
      return "training is over"
    return f"the server is at round {p['round']}, client {p['turn']}'s turn, {p['step']} step(s) committed"

  def turn_of(self, s: CoordinatorState, client: int, round_: int) -> int:
    """-1, 0 or 1: the turn (round_, client) is over, current, or to come."""
    now = (int(s.durable.round), int(s.durable.turn))
    return (now < (round_, client)) - (now > (round_, client))

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    return not self.done(s) and int(s.durable.turn) == client

  def droppable(self, s: CoordinatorState, client: int) -> bool:
    return self.waited_for(s, client)  # the client whose turn it is

  def on_leave(self, s: CoordinatorState, client: int, round_: int):
    """Handover leave: the client gives up its turn in `round_` (as a lease would end it)."""
    if self.turn_of(s, client, round_) == 0:
      s = self.drop(s, client, "it left its turn")
    return s, Reply({"ready": True, "message": None, "position": POSITION})

  def drop(self, s: CoordinatorState, client: int, why: str) -> CoordinatorState:
    d = s.durable
    staged = s.volatile.staged.get(client)
    logger.warning("client %d: its turn in round %d ends after %d step(s) (%s); staged step %s discarded", client,
                   int(d.round), int(d.step), why, None if staged is None else staged[1])
    return self._end_turn(s, completed=False, half=d.client_half)

  def _end_turn(self, s: CoordinatorState, *, completed: bool, half: PartyState) -> CoordinatorState:
    d, k = s.durable, int(s.durable.turn)
    turn, round_ = (k + 1) % self.num_clients, int(d.round) + (k + 1) // self.num_clients
    s = s.replace(client_half=half, round=_i32(round_), turn=_i32(turn), step=_i32(0),
                  last_round=_set(d.last_round, k, d.round), last_steps=_set(d.last_steps, k, d.step),
                  last_completed=_set(d.last_completed, k, completed), turn_server=d.server)
    return s.set(staged={}, must_save=True)

  def _half_bytes(self, s: CoordinatorState) -> bytes | None:
    """The half to hand out: a `ClientHalf` message; sealed, its sealed bytes, or None before the
    first hand-over (the client makes the initial half)."""
    half = s.durable.client_half
    if self.sealed_bytes is None:
      return msgs.to_bytes(sched.to_message(half))
    return bytes(np.asarray(half)) if np.asarray(half)[0] else None

  def _check_step(self, s: CoordinatorState, method: str, client: int, round_: int, step: int) -> None:
    """Raises unless (round_, client, step) is the next step to run: this client's turn, this step."""
    where = self.turn_of(s, client, round_)
    if where != 0:
      when = "is over" if where < 0 else "has not begun"
      raise TransportError(_FAILED, f"{method}: client {client}'s turn in round {round_} {when}; {self.where(s)}")
    committed = int(s.durable.step)
    if step < committed:
      raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{method}: step {step} of round {round_} is already committed; {self.where(s)}")
    if step > committed or step >= self.schedule.local_steps:
      raise TransportError(_FAILED, f"{method}: step {step} is not the next step; {self.where(s)}")

  def _staged(self, s: CoordinatorState, client: int, round_: int, step: int):
    staged = s.volatile.staged.get(client)
    return staged if staged is not None and staged[:2] == (round_, step) else None

  def on_get(self, s: CoordinatorState, client: int, round_: int, wait: float, initial_half: bytes):
    """The client half at the start of `client`'s turn in `round_` (held until the turn comes), or
    the final half once training is over (`round_` = rounds)."""
    del initial_half  # the half is the relayed one
    seconds = min(wait, MAX_WAIT_SECONDS)
    if round_ == self.schedule.rounds:
      def final(s):
        done = self.done(s)
        return s, Reply({"ready": done, "message": self._half_bytes(s) if done else None, "position": POSITION})

      return s, Wait(self.done, final, seconds)
    if not 0 <= round_ < self.schedule.rounds:
      raise TransportError(_FAILED, f"Handover: round {round_} is not in [0, {self.schedule.rounds}]")

    def answer(s):
      where = self.turn_of(s, client, round_)
      if where < 0:
        raise TransportError(_FAILED, f"Handover: client {client}'s turn in round {round_} is over; {self.where(s)}")
      if where > 0:
        return s, Reply({"ready": False, "message": None, "position": POSITION})
      if int(s.durable.step) > 0:  # the client restarted without its half: it redoes the turn from its start
        logger.warning("client %d fetches the half of its turn in round %d after %d committed step(s): the turn "
                       "starts over", client, round_, int(s.durable.step))
        s = s.replace(server=s.durable.turn_server, step=_i32(0)).set(staged={}, must_save=True)
      return s, Reply({"ready": True, "message": self._half_bytes(s), "position": POSITION})

    return s, Wait(lambda s: self.turn_of(s, client, round_) <= 0, answer, seconds)

  def on_put(self, s: CoordinatorState, client: int, round_: int, steps: int, message: bytes | None):
    """The client half at the end of the turn: the turn passes on."""
    d, where = s.durable, self.turn_of(s, client, round_)
    if where < 0:
      if int(d.last_round[client]) == round_ and bool(d.last_completed[client]):
        return s, Reply({"ready": True, "message": None, "position": POSITION})  # a retry
      raise TransportError(_FAILED, f"Handover: client {client}'s turn in round {round_} ended without its "
                                    f"handover (it was dropped); {self.where(s)}")
    if where > 0:
      raise TransportError(_FAILED, f"Handover: it is not client {client}'s turn in round {round_}; {self.where(s)}")
    if message is None:
      raise wire.invalid("Handover put: field 'message' must hold the client half")
    half = self._read_half(message, client, round_)
    local_steps = self.schedule.local_steps
    if steps != local_steps or int(d.step) != local_steps:
      raise TransportError(_FAILED, f"Handover put: a turn hands over after {local_steps} committed steps; the "
                                    f"request says {steps}, and {self.where(s)}")
    if self.sealed_bytes is None:
      half = sched.from_message(half, d.client_half.input_spec)
    s = self._end_turn(s, completed=True, half=half)
    return s, Reply({"ready": True, "message": None, "position": POSITION})

  def _read_half(self, message: bytes, client: int, round_: int) -> Any:
    """The half of a `Handover put`: a checked `ClientHalf`; sealed, its bytes as a uint8 array,
    checked only for their size and clear header (the server cannot open them)."""
    if self.sealed_bytes is None:
      return self.read(self.half_template, message, what="Handover put")
    if len(message) != self.sealed_bytes:
      raise wire.invalid(f"Handover put: a sealed client half is {self.sealed_bytes} bytes, got {len(message)}")
    try:
      sealed_for = handoff.sender(message)
    except handoff.HandoffError as e:
      raise wire.invalid(f"Handover put: {e}") from None
    if sealed_for != (round_, client):
      raise wire.invalid(f"Handover put: the sealed half says it was sealed by client {sealed_for[1]} in round "
                         f"{sealed_for[0]}, not by client {client} in round {round_}")
    return np.frombuffer(message, np.uint8).copy()

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self._check_step(s, "Forward", client, round_, step)
    smashed = self.read_smashed(message, client)
    d = s.durable
    key = self._server_key(d.key, round_, client, step)
    if self.u_shaped:  # the loss is the client's: the answer is the body's output, loss and accuracy 0
      body, pending = self._forward(d.server, smashed, key)
      s = s.set(staged={client: (round_, step, None, pending)})
      return s, Reply({"message": msgs.to_bytes(jax.device_get(body)), "loss": 0.0, "accuracy": 0.0})
    server, down, loss, acc = self._step(d.server, smashed, key)
    s = s.set(staged={client: (round_, step, server, None)})
    return s, Reply({"message": msgs.to_bytes(down), "loss": float(loss), "accuracy": float(acc)})

  def on_backward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    """U-shaped: the tail gradient of the staged step in, the cut gradient out; stages the update."""
    if not self.u_shaped:
      return super().on_backward(s, client, round_, step, message)
    self._check_step(s, "Backward", client, round_, step)
    staged = self._staged(s, client, round_, step)
    if staged is None:
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Backward: step {step} of round {round_} is not staged (never forwarded, or discarded "
                           f"by a server restart); forward it again. {self.where(s)}")
    tail = self.read(self.tail_template, message, what="Backward")
    # From the committed state and the staged pending: a repeated Backward recomputes the same.
    server, down = self._backward(s.durable.server, staged[3], tail)
    s = s.set(staged={client: (round_, step, server, staged[3])})
    return s, Reply({"message": msgs.to_bytes(jax.device_get(down))})

  def on_commit(self, s: CoordinatorState, client: int, round_: int, step: int):
    d, where = s.durable, self.turn_of(s, client, round_)
    if where < 0:
      if int(d.last_round[client]) == round_ and step < int(d.last_steps[client]):
        return s, Reply(POSITION)  # a retry of a commit that went through
      raise TransportError(_FAILED, f"Commit: client {client}'s turn in round {round_} is over and step {step} "
                                    f"was discarded; {self.where(s)}")
    if where > 0:
      raise TransportError(_FAILED, f"Commit: client {client}'s turn in round {round_} has not begun; {self.where(s)}")
    if step < int(d.step):
      return s, Reply(POSITION)  # a retry of a commit that went through
    staged = self._staged(s, client, round_, step)
    if staged is None:
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Commit: step {step} of round {round_} is not staged (never forwarded, or discarded "
                           f"by a server restart); forward it again. {self.where(s)}")
    if staged[2] is None:
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Commit: step {step} of round {round_} is not staged: forwarded, but no Backward yet; "
                           f"send its Backward, or forward it again. {self.where(s)}")
    s = s.replace(server=staged[2], step=_i32(step + 1)).set(staged={})
    return self.count_commit(s), Reply(POSITION)

  def predict_party(self, s: CoordinatorState, client: int) -> PartyState:
    del client
    return s.durable.server

  def staged_dict(self, s: CoordinatorState) -> dict | None:
    if not s.volatile.staged:
      return None
    ((client, (round_, step, server, pending)),) = s.volatile.staged.items()
    return {"position": [round_, client, step],
            "server": None if server is None else serialization.to_state_dict(server),
            # U-shaped: the pending backward's arrays (the pullback's residuals, the codec key's data).
            "pending": [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
                        for v in jax.tree.leaves(pending)]}

  def warm_up(self, s: CoordinatorState) -> None:
    d = s.durable
    zeros = self.zeros(0)
    key = self._server_key(d.key, 0, 0, 0)
    if self.u_shaped:
      _, pending = self._forward(d.server, zeros, key)
      tail = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), self.tail_template)
      jax.block_until_ready(self._backward(d.server, pending, tail))
    else:
      jax.block_until_ready(self._step(d.server, zeros, key))


# algorithm (as `Algorithm.name`) -> how its server serves the clients
COORDINATORS: dict[str, type[Coordinator]] = {
    "sequential_sl": Turns,
    "sequential_sl_u": Turns,
    "parallel_sl": Lockstep,
    "local_loss_sl": LocalLoss,
    "parallel_sl_u": LockstepU,
    "heterogeneous_parallel_sl": PerClient,
    "splitfed_v1": Copies,
    "splitfed_v2": InOrder,
}
