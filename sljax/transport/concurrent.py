"""The server of parallel split learning and SplitFed v1 and v2 over a network: all clients at once.

`ConcurrentServer` serves the same methods as `SplitServer` (docs/protocol.md), for the
algorithms whose clients train at the same time. Each reproduces its simulation,
`sljax.algorithms.parallel_sl` and `sljax.algorithms.splitfed(version=1|2)`: the same legs, keys,
data order and averaging, so a run over the network ends where the simulation does.

Parallel SL (Jeon & Kim 2020) is lock-step: step s of round r is one server update on the smashed
data of every client. The server holds each `Forward(r, s)` until every client still in the
round has sent its smashed data (a barrier), runs `server_step_on_all` once, and answers each
client with the gradient of its own loss. Each `Commit(r, s)` is held until every client that
forwarded has committed; then the update is applied, with weight 1 for each client that
committed. A client that forwarded and never committed (it dropped after its forward) has its
step discarded: the update is recomputed without its rows' loss, and its downlink codec state is
left as it was, exactly as the simulation discards a dropped client's step.

SplitFed v1 (Thapa et al. 2022) needs no barrier within a round: each client trains against its
own copy of the server half, so its `Forward` and `Commit` are served at once. At the end of the
round each client hands in its client half's weights (`Handover put`, a `ModelWeights` message of
params and model state); when every client still in the round has, the server averages them
(FedAvg, weighted by the clients' sample counts from their handshakes), averages its server
copies the same way, and every client fetches the average (`Handover get` of the next round).

SplitFed v2 keeps one server half that takes the clients one at a time, in an order drawn per
round as the simulation draws it: in each step, a client's `Forward` is held until every client
before it in the order has committed or dropped, and its `Commit` passes the turn on. A client
that forwarded and never commits has its update discarded, and the next client is served from
the server half without it. The client weights are averaged at the end of the round as in v1.

A client silent for `lease_seconds` while others wait for it is dropped from the round: its
staged step is discarded, and it takes part again from the next round (in parallel SL with its
own half as it was; in SplitFed with the average). A client that never connects is dropped the
same way, one lease after the first call of any client.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from sljax import messages as msgs
from sljax.algorithms import _common as c
from sljax.protocol import ArraySpec, PartyState, Vanilla
from sljax.split import SplitModel
from sljax.transport import schedule as sched
from sljax.transport import wire
from sljax.transport.server import MAX_WAIT_SECONDS, ServiceBase
from sljax.transport.wire import TransportError

logger = logging.getLogger(__name__)

PyTree = Any
ALGORITHMS = ("parallel_sl", "splitfed_v1", "splitfed_v2")
_FAILED = grpc.StatusCode.FAILED_PRECONDITION


@struct.dataclass
class ConcurrentState:
  """Everything the server holds; a checkpoint saves all of it.

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
    samples: (K,) int32, each client's training rows (from its handshake): FedAvg's weights.
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


class _Pending(NamedTuple):
  """Parallel SL: the step under way (not checkpointed: a restart discards it)."""

  round: int
  step: int
  smashed: dict[int, msgs.SmashedData]
  # Filled in once every client in the round has forwarded:
  forwarded: np.ndarray | None = None
  server: PartyState | None = None
  payload: Any = None
  losses: np.ndarray | None = None
  accuracies: np.ndarray | None = None


def _weights_of(party: PartyState) -> msgs.ModelWeights:
  """What a SplitFed client hands in for averaging: its params and model state."""
  return msgs.ModelWeights({"params": party.params, "model_state": party.model_state})


class ConcurrentServer(ServiceBase):
  """The server's side of parallel split learning or SplitFed v1 or v2, behind any transport.

  Args:
    model: the split model.
    sl: `sljax.vanilla(model, ...)`, the same as the clients'; its optimizers, loss and codecs are
      the algorithm's.
    algorithm: "parallel_sl", "splitfed_v1" or "splitfed_v2".
    schedule: clients, rounds, steps per round (`local_steps`), batch size.
    input_spec, key, tokens, certificate_names, checkpoint_dir, checkpoint_every,
    lease_seconds, max_message_bytes, max_predict_batch, clock: as for `SplitServer`.
      `checkpoint_every` counts applied steps (parallel SL) or commits (SplitFed); the server also
      checkpoints at the end of every round.

  Example:
    >>> server = ConcurrentServer(model, sl, algorithm="parallel_sl", schedule=Schedule(4, 10, 5, 32),
    ...                           input_spec=ArraySpec((64,), "float32"), key=jax.random.key(0),
    ...                           tokens={"t0": 0, "t1": 1, "t2": 2, "t3": 3})      # doctest: +SKIP
    >>> running = sljax.transport.serve(server.handle, address="127.0.0.1:0", max_workers=12)  # doctest: +SKIP
  """

  def __init__(
      self,
      model: SplitModel,
      sl: Vanilla,
      *,
      algorithm: str,
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
  ):
    if algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    self.algorithm = algorithm
    self.schedule = schedule.check()
    self._configure(num_clients=schedule.num_clients, tokens=tokens, certificate_names=certificate_names, sl=sl,
                    checkpoint_every=checkpoint_every, lease_seconds=lease_seconds,
                    max_message_bytes=max_message_bytes, max_predict_batch=max_predict_batch, clock=clock)
    k = schedule.num_clients
    k_model, run_key = sched.split_run_key(key)
    x = jnp.zeros((schedule.batch_size, *input_spec.shape), input_spec.dtype)
    init = jax.jit(sl.init)(k_model, x)  # as `_init_stacked` in the simulation
    self.input_spec, self.cut_spec = init.client.input_spec, init.server.input_spec
    self._initial_half = msgs.to_bytes(sched.to_message(init.client))
    self._half_template = msgs.spec_of(sched.to_message(init.client))
    self._weights_template = msgs.spec_of(_weights_of(init.client))
    one = _weights_of(init.client).params
    weights = c.stack_party(one, k) if self._splitfed else ()
    average = one if self._splitfed else ()
    if self._copies:
      server = c.stack_party(init.server, k)
    elif self._in_order:
      server = init.server
    else:
      server = init.server.replace(codec_state=c.broadcast(init.server.codec_state, k))
    initial = ConcurrentState(
        server=server, round=np.array(0, np.int32), step=np.array(0, np.int32), turn=np.array(0, np.int32),
        upto=np.zeros((k,), np.int32),
        gone=np.zeros((k,), bool), samples=np.zeros((k,), np.int32), handed=np.zeros((k,), bool),
        weights=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), weights),
        average=average, key=run_key)  # before any round, the "average" is the initial client half
    initial = jax.device_get(initial)

    b = schedule.batch_size
    x_struct = jax.ShapeDtypeStruct((b, *input_spec.shape), input_spec.dtype)
    y_struct = jax.ShapeDtypeStruct((b,), jnp.int32)
    self._smashed_template = jax.eval_shape(sl.client_forward, init.client, x_struct, y_struct, jax.random.key(0))[0]
    self._configure_inference(model, sl)
    self._build_steps(model, sl)

    self._pending: _Pending | None = None
    self._committed: set[int] = set()
    self._staged: dict[int, tuple[int, int, PartyState]] = {}
    self._last_seen: dict[int, float] = {}
    self._order_of: tuple[int | None, np.ndarray | None] = (None, None)  # SplitFed v2: (round, its order)
    initial = self._restore(checkpoint_dir, initial)
    if self._version:
      logger.info("resumed from checkpoint %d at round %d", self._version, int(initial.round))
    self.state = initial
    self._durable_upto = np.array(initial.upto)
    if self._manager is not None and self._manager.latest_step() is None:
      self._save()
    self._warm_up()

  def _warm_up(self) -> None:
    """Compiles the server's steps now, so the first step of training does not wait for XLA;
    the results are discarded."""
    s = self.state
    zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), self._smashed_template)
    if self._copies:
      copy, _, _, _ = self._splitfed_step(s.server, 0, zeros, s.key, 0, 0)
      jax.block_until_ready((self._set_copy(s.server, 0, copy), self._set_weights(s.weights, 0, s.average),
                             self._average(s.weights, s.server, np.ones(self.schedule.num_clients, np.float32))))
    elif self._in_order:
      jax.block_until_ready((self._splitfed_step(s.server, 0, zeros, s.key, 0, 0), self._order(s.key, 0),
                             self._set_weights(s.weights, 0, s.average),
                             self._average(s.weights, s.server, np.ones(self.schedule.num_clients, np.float32))))
    else:
      pending = _Pending(0, 0, {})
      weights = np.zeros(self.schedule.num_clients, np.float32)
      jax.block_until_ready(self._parallel_step(s.server, self._stacked_smashed(pending), weights, s.key, 0, 0))

  @property
  def _splitfed(self) -> bool:
    """Clients hand in their weights at the end of each round (SplitFed v1 and v2)."""
    return self.algorithm.startswith("splitfed")

  @property
  def _copies(self) -> bool:
    """A copy of the server half per client (SplitFed v1)."""
    return self.algorithm == "splitfed_v1"

  @property
  def _in_order(self) -> bool:
    """One server half that takes the clients one at a time, in a per-round order (SplitFed v2)."""
    return self.algorithm == "splitfed_v2"

  def _build_steps(self, model: SplitModel, sl: Vanilla) -> None:
    """The server's jitted computations: the simulated algorithm's own server step, order and
    aggregation (its `Schedule`), with nothing derived again here."""
    del model
    algo = sched.algorithm(self.algorithm, sl, self.schedule)
    schedule = algo.schedule
    _, server_key = sched.leg_keys(algo)

    def serve_one(server, client, message, run_key, round_, step):
      """SplitFed's server step for one client (v1: on its server copy, `server` stacked)."""
      half = jax.tree.map(lambda a: a[client], server) if self._copies else server
      return schedule.server_step(half, message, server_key(run_key, round_, client, step))

    def set_copy(servers, client, copy):
      return jax.tree.map(lambda a, one: a.at[client].set(one), servers, copy)

    self._parallel_step = jax.jit(schedule.server_step)
    self._splitfed_step = jax.jit(serve_one)
    self._set_copy = jax.jit(set_copy)
    self._set_weights = jax.jit(set_copy)
    self._average = jax.jit(schedule.aggregate) if schedule.aggregate is not None else None
    self._order = jax.jit(schedule.order)

  # ---- position, leases, checkpoints -------------------------------------------------------------

  def _done(self) -> bool:
    return int(self.state.round) >= self.schedule.rounds

  def _steps_of(self, client: int, upto: np.ndarray | None = None) -> int:
    """The steps `client` has committed in the current round."""
    upto = self.state.upto if upto is None else upto
    return max(0, int(upto[client]) - int(self.state.round) * self.schedule.local_steps)

  def _position(self, client: int | None = None) -> dict[str, Any]:
    steps = 0 if client is None else self._steps_of(client)
    durable = 0 if client is None else min(steps, self._steps_of(client, self._durable_upto))
    turn = -1 if client is None or self.state.gone[client] else client  # all clients' turn, except the dropped
    return {"round": int(self.state.round), "turn": turn, "step": steps, "durable": durable, "done": self._done()}

  def _where(self, client: int) -> str:
    if self._done():
      return "training is over"
    s = self.state
    gone = " (dropped from this round)" if s.gone[client] else ""
    return (f"the server is at round {int(s.round)}; client {client}{gone} has committed "
            f"{self._steps_of(client)} step(s)")

  def _seen(self, client: int) -> None:
    now = self._clock()
    if not self._last_seen:  # leases start with the first call from any client
      self._last_seen = dict.fromkeys(range(self.schedule.num_clients), now)
    self._last_seen[client] = now

  def _silent(self, client: int) -> bool:
    return self._clock() - self._last_seen.get(client, self._clock()) > self.lease_seconds

  def _save(self) -> None:
    self._save_state()
    self._durable_upto = np.array(self.state.upto)

  def _staged_dict(self):
    pending = None
    if self._pending is not None and self._pending.server is not None:
      pending = {"position": [self._pending.round, self._pending.step],
                 "server": serialization.to_state_dict(self._pending.server)}
    staged = {str(k): {"position": [r, s], "server": serialization.to_state_dict(copy)}
              for k, (r, s, copy) in sorted(self._staged.items())}
    return {"pending": pending, "committed": sorted(self._committed), "staged": staged}

  def _predict_party(self, client: int) -> PartyState:
    server = self.state.server
    return jax.tree.map(lambda a: a[client], server) if self._copies else server

  def _hello(self, client: int, req: dict) -> None:
    samples = np.array(self.state.samples)
    if samples[client] != req["samples"]:
      samples[client] = req["samples"]
      self.state = self.state.replace(samples=samples)
      self._save()

  def _drop(self, client: int, why: str) -> None:
    """Drops `client` from the current round; its staged step is discarded."""
    gone = np.array(self.state.gone)
    gone[client] = True
    self.state = self.state.replace(gone=gone)
    self._staged.pop(client, None)
    logger.warning("client %d dropped from round %d after %d step(s): %s", client, int(self.state.round),
                   self._steps_of(client), why)
    self._cond.notify_all()

  def _expire_if_due(self) -> None:
    """Drops the clients that others wait for and that have been silent for a lease."""
    if self._done():
      return
    s = self.state
    for k in range(self.schedule.num_clients):
      if s.gone[k] or not self._silent(k):
        continue
      if self._splitfed and not s.handed[k] and s.handed.any():
        waited_for = True  # others wait for the average
      elif self._in_order:
        waited_for = int(s.step) < self.schedule.local_steps and self._serving() == k  # the step waits for it
      elif self._splitfed:
        waited_for = False
      elif self._pending is None:
        waited_for = False
      elif self._pending.forwarded is None:
        waited_for = k not in self._pending.smashed
      else:
        waited_for = bool(self._pending.forwarded[k]) and k not in self._committed
      if waited_for:
        self._drop(k, f"silent for more than {self.lease_seconds:.1f} s while others waited for it")
    self._advance()

  def _wait(self, client: int, ready: Callable[[], bool], seconds: float) -> bool:
    """Waits (releasing the lock) until `ready()` or `seconds` pass; the caller counts as alive."""
    end = self._clock() + seconds
    while not ready() and self._clock() < end:
      self._cond.wait(timeout=min(0.05, max(0.0, end - self._clock())))
      self._seen(client)
      self._expire_if_due()
    return ready()

  def _check_round(self, method: str, client: int, round_: int) -> None:
    s = self.state
    if self._done():
      raise TransportError(_FAILED, f"{method}: training is over")
    if round_ != int(s.round):
      when = "is over" if round_ < int(s.round) else "has not begun"
      raise TransportError(_FAILED, f"{method}: round {round_} {when}; {self._where(client)}")
    if s.gone[client]:
      raise TransportError(_FAILED, f"{method}: client {client} was dropped from round {round_} and takes part again "
                                    f"from round {round_ + 1}; {self._where(client)}")

  def _check_next(self, method: str, client: int, round_: int, step: int) -> None:
    self._check_round(method, client, round_)
    done = self._steps_of(client)
    if step < done:
      raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{method}: step {step} of round {round_} is already committed; {self._where(client)}")
    if step > done or step >= self.schedule.local_steps:
      raise TransportError(_FAILED, f"{method}: step {step} is not the next step; {self._where(client)}")

  def _committed_before(self, client: int, round_: int, step: int) -> bool:
    return int(self.state.upto[client]) > round_ * self.schedule.local_steps + step

  # ---- the round's progress -------------------------------------------------------------------------

  def _advance(self) -> None:
    """Completes whatever every client still in the round has done its part of."""
    if self._done():
      return
    if self._in_order:
      self._skip_gone()
    if self._splitfed:
      s = self.state
      if (s.handed | s.gone).all():
        self._end_round()
      return
    p = self._pending
    if p is None:
      return
    gone = self.state.gone
    if p.forwarded is None and all(gone[k] or k in p.smashed for k in range(self.schedule.num_clients)):
      self._compute(p)
    elif p.forwarded is not None and all(gone[k] or k in self._committed for k in np.flatnonzero(p.forwarded)):
      self._apply(p)

  def _serving(self) -> int:
    """SplitFed v2: the client the current step serves next."""
    return int(self._round_order()[int(self.state.turn)])

  def _round_order(self) -> np.ndarray:
    s = self.state
    if self._order_of[0] != int(s.round):
      self._order_of = (int(s.round), np.asarray(self._order(s.key, int(s.round))))
    return self._order_of[1]

  def _skip_gone(self) -> None:
    """SplitFed v2: passes over dropped clients; after the last client, the next step begins."""
    s, k = self.state, self.schedule.num_clients
    if int(s.step) >= self.schedule.local_steps:
      return
    turn, step = int(s.turn), int(s.step)
    order = self._round_order()
    while turn < k and s.gone[order[turn]]:
      turn += 1
    if turn == k:
      turn, step = 0, step + 1
    if (turn, step) != (int(s.turn), int(s.step)):
      self.state = s.replace(turn=np.array(turn, np.int32), step=np.array(step, np.int32))
      self._cond.notify_all()
      if step != int(s.step):
        self._skip_gone()

  def _stacked_smashed(self, p: _Pending) -> msgs.SmashedData:
    zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), self._smashed_template)
    ups = [p.smashed.get(k, zeros) for k in range(self.schedule.num_clients)]
    return jax.tree.map(lambda *a: np.stack(a), *ups)

  def _compute(self, p: _Pending) -> None:
    """Parallel SL: every client in the round has forwarded step `p.step`: one server step."""
    forwarded = np.array([k in p.smashed for k in range(self.schedule.num_clients)])
    server, payload, losses, accs = self._parallel_step(
        self.state.server, self._stacked_smashed(p), forwarded.astype(np.float32), self.state.key, p.round, p.step)
    self._pending = p._replace(forwarded=forwarded, server=server, payload=jax.device_get(payload),
                               losses=np.asarray(losses), accuracies=np.asarray(accs))
    self._committed = set()
    self._cond.notify_all()

  def _apply(self, p: _Pending) -> None:
    """Parallel SL: every client that forwarded has committed or is gone: the step becomes state."""
    committed = np.array([k in self._committed for k in range(self.schedule.num_clients)])
    server = p.server
    if not np.array_equal(committed, p.forwarded):  # someone dropped after its forward: discard its part
      server, _, _, _ = self._parallel_step(
          self.state.server, self._stacked_smashed(p), committed.astype(np.float32), self.state.key, p.round, p.step)
    s, steps = self.state, self.schedule.local_steps
    upto = np.where(committed, p.round * steps + p.step + 1, s.upto).astype(np.int32)
    self.state = s.replace(server=server, step=np.array(p.step + 1, np.int32), upto=upto)
    self._pending, self._committed = None, set()
    self._commits_since_save += 1
    if p.step + 1 == steps:
      self._next_round()
    elif self._commits_since_save >= self._checkpoint_every:
      self._save()
    self._cond.notify_all()

  def _end_round(self) -> None:
    """SplitFed: every client in the round handed in its weights or is gone: FedAvg, next round."""
    s = self.state
    w = (s.samples * s.handed).astype(np.float32)
    if w.sum() > 0:  # the algorithm's aggregation (v1 averages the server copies too, v2 leaves its one half)
      average, server = self._average(s.weights, s.server, w)
      self.state = s.replace(average=jax.device_get(average), server=server)
    else:  # nobody finished the round: keep the last average rather than average nothing
      logger.warning("round %d: no client handed in its weights; the averages stay as they were", int(s.round))
    self._staged = {}
    self._next_round()

  def _next_round(self) -> None:
    k = self.schedule.num_clients
    self.state = self.state.replace(round=np.array(int(self.state.round) + 1, np.int32),
                                    step=np.array(0, np.int32), turn=np.array(0, np.int32),
                                    gone=np.zeros((k,), bool), handed=np.zeros((k,), bool))
    self._save()
    logger.info("round %d begins", int(self.state.round))
    self._cond.notify_all()

  # ---- methods --------------------------------------------------------------------------------------

  def _handover(self, client: int, req: dict) -> bytes:
    if req["op"] == "get":
      return self._handover_get(client, req)
    if req["op"] == "put":
      return self._handover_put(client, req)
    raise wire.invalid(f"Handover request: field 'op' must be 'get' or 'put', got {req['op']!r}")

  def _handover_get(self, client: int, req: dict) -> bytes:
    """Round 0: the initial client half. Round r > 0: waits for round r to begin; SplitFed sends
    the latest average of the client weights (None in parallel SL, where clients keep their own)."""
    round_ = req["round"]
    if not 0 <= round_ <= self.schedule.rounds:
      raise TransportError(_FAILED, f"Handover: round {round_} is not in [0, {self.schedule.rounds}]")
    if round_ == 0:
      return wire.encode({"ready": True, "message": self._initial_half, "position": self._position(client)})
    ready = self._wait(client, lambda: int(self.state.round) >= round_, min(req["wait"], MAX_WAIT_SECONDS))
    message = None
    if ready and self._splitfed:
      message = msgs.to_bytes(msgs.ModelWeights(self.state.average))
    return wire.encode({"ready": ready, "message": message, "position": self._position(client)})

  def _handover_put(self, client: int, req: dict) -> bytes:
    """SplitFed: the client's weights at the end of its round, for the average."""
    if not self._splitfed:
      raise TransportError(_FAILED, "Handover put: parallel split learning averages nothing; clients keep their halves")
    round_, steps = req["round"], self.schedule.local_steps
    if round_ < int(self.state.round) and int(self.state.upto[client]) >= (round_ + 1) * steps:
      return wire.encode({"ready": True, "message": None, "position": self._position(client)})  # a retry
    self._check_round("Handover put", client, round_)
    if req["message"] is None:
      raise wire.invalid("Handover put: field 'message' must hold the client's ModelWeights")
    weights = wire.read_message(self._weights_template, req["message"], what="Handover put",
                                max_bytes=self.max_message_bytes)
    if req["steps"] != steps or self._steps_of(client) != steps:
      raise TransportError(_FAILED, f"Handover put: weights are handed in after {steps} committed steps; the "
                                    f"request says {req['steps']}, and {self._where(client)}")
    s = self.state
    handed = np.array(s.handed)
    handed[client] = True
    stacked = jax.device_get(self._set_weights(s.weights, client, weights.params))
    self.state = s.replace(weights=stacked, handed=handed)
    self._advance()
    if int(self.state.round) == round_:  # (else the new round was just checkpointed)
      self._save()  # durable before the client hears of it: it will wait for the average, not put again
    return wire.encode({"ready": True, "message": None, "position": self._position(client)})

  def _forward(self, client: int, req: dict) -> bytes:
    round_, step = req["round"], req["step"]
    self._check_next("Forward", client, round_, step)
    message = wire.read_message(self._smashed_template, req["message"], what="Forward",
                                max_bytes=self.max_message_bytes)
    # Everything is checked: from here on the request is served.
    if self._copies:
      copy, down, loss, acc = self._splitfed_step(self.state.server, client, message, self.state.key, round_, step)
      self._staged[client] = (round_, step, copy)
      return wire.encode({"message": msgs.to_bytes(down), "loss": float(loss), "accuracy": float(acc)})
    if self._in_order:
      return self._forward_in_order(client, round_, step, message)
    p = self._pending
    if p is None or (p.round, p.step) != (round_, step):
      p = self._pending = _Pending(round_, step, {})
    if p.forwarded is None:
      p.smashed[client] = message  # a retry before the barrier replaces the message
      self._advance()
      # Wait for the others: within a lease they forward or are dropped, and the step is computed.
      self._wait(client, lambda: self._pending is not p, self.lease_seconds + 1.0)
    p = self._pending
    if p is None or (p.round, p.step) != (round_, step) or p.forwarded is None or not p.forwarded[client]:
      raise TransportError(grpc.StatusCode.ABORTED, f"Forward: step {step} of round {round_} went on without client "
                                                    f"{client}; {self._where(client)}")
    down = msgs.CutGradient(jax.tree.map(lambda a: a[client], p.payload))
    return wire.encode({"message": msgs.to_bytes(down), "loss": float(p.losses[client]),
                        "accuracy": float(p.accuracies[client])})

  def _forward_in_order(self, client: int, round_: int, step: int, message) -> bytes:
    """SplitFed v2: held until the step serves this client (the clients before it in the round's
    order have committed or dropped), then one server step on the server half as it is then."""
    def my_turn():
      s = self.state
      return bool(s.gone[client]) or int(s.round) != round_ or (int(s.step) == step and self._serving() == client)

    self._wait(client, my_turn, self.lease_seconds + 1.0)
    s = self.state
    if s.gone[client] or int(s.round) != round_:
      self._check_round("Forward", client, round_)  # raises: dropped, or the round is over
    if int(s.step) != step or self._serving() != client:
      raise TransportError(grpc.StatusCode.ABORTED, f"Forward: step {step} of round {round_} does not serve client "
                                                    f"{client} yet; forward it again. {self._where(client)}")
    server, down, loss, acc = self._splitfed_step(s.server, client, message, s.key, round_, step)
    self._staged[client] = (round_, step, server)
    return wire.encode({"message": msgs.to_bytes(down), "loss": float(loss), "accuracy": float(acc)})

  def _commit(self, client: int, req: dict) -> bytes:
    round_, step = req["round"], req["step"]
    if self._committed_before(client, round_, step):
      return wire.encode(self._position(client))  # a retry of a commit that went through
    self._check_next("Commit", client, round_, step)
    if self._in_order:
      staged = self._staged.get(client)
      if staged is None or staged[:2] != (round_, step) or self._serving() != client:
        raise TransportError(grpc.StatusCode.ABORTED,
                             f"Commit: step {step} of round {round_} is not staged (never forwarded, or discarded by a "
                             f"server restart); forward it again. {self._where(client)}")
      s = self.state
      upto = np.array(s.upto)
      upto[client] += 1
      self.state = s.replace(server=staged[2], upto=upto, turn=np.array(int(s.turn) + 1, np.int32))
      del self._staged[client]
      self._skip_gone()
      self._commits_since_save += 1
      if self._commits_since_save >= self._checkpoint_every or self._steps_of(client) == self.schedule.local_steps:
        self._save()
      self._cond.notify_all()
      return wire.encode(self._position(client))
    if self._splitfed:
      staged = self._staged.get(client)
      if staged is None or staged[:2] != (round_, step):
        raise TransportError(grpc.StatusCode.ABORTED,
                             f"Commit: step {step} of round {round_} is not staged (never forwarded, or discarded by a "
                             f"server restart); forward it again. {self._where(client)}")
      s = self.state
      upto = np.array(s.upto)
      upto[client] += 1
      self.state = s.replace(server=self._set_copy(s.server, client, staged[2]), upto=upto)
      del self._staged[client]
      self._commits_since_save += 1
      # A client's last step of the round is always made durable: it then waits for the average.
      if self._commits_since_save >= self._checkpoint_every or self._steps_of(client) == self.schedule.local_steps:
        self._save()
      return wire.encode(self._position(client))
    p = self._pending
    if p is None or (p.round, p.step) != (round_, step) or p.forwarded is None or not p.forwarded[client]:
      raise TransportError(grpc.StatusCode.ABORTED,
                           f"Commit: step {step} of round {round_} is not staged (never forwarded, or discarded by a "
                           f"server restart); forward it again. {self._where(client)}")
    self._committed.add(client)
    self._advance()
    self._wait(client, lambda: self._committed_before(client, round_, step) or bool(self.state.gone[client]),
               self.lease_seconds + 1.0)
    if not self._committed_before(client, round_, step):
      raise TransportError(_FAILED, f"Commit: step {step} of round {round_} was discarded; {self._where(client)}")
    return wire.encode(self._position(client))
