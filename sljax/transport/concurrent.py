"""The server of split learning over a network, for every algorithm of the registry that it serves.

`ConcurrentServer` is a shell (I/O, identities, leases, the lock, checkpoints) around a pure
coordinator (`sljax.transport.coordinators`), which holds the order of calls of each way of
serving; the numbers (server step, keys, order, averaging) are the simulated algorithm's own, so
a run over the network ends where the simulation does. `SplitServer` is the same shell for
sequential SL (`Turns`: clients take turns, the client half relayed through the server, vanilla or
U-shaped legs); `ALGORITHMS` names the algorithms whose clients train at once, described below.

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

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from sljax import messages as msgs
from sljax.algorithms import Algorithm
from sljax.privacy import handoff
from sljax.protocol import ArraySpec, PartyState, UShaped, Vanilla
from sljax.split import SplitModel
from sljax.transport import coordinators as coord
from sljax.transport import schedule as sched
from sljax.transport import wire
from sljax.transport.coordinators import ConcurrentState
from sljax.transport.server import MAX_SAMPLES, ServiceBase
from sljax.transport.wire import TransportError

logger = logging.getLogger(__name__)

# the algorithms whose clients train at once (sequential SL, clients taking turns: `SplitServer`)
ALGORITHMS = tuple(name for name, c in coord.COORDINATORS.items() if c is not coord.Turns)

__all__ = ["ALGORITHMS", "ConcurrentServer", "ConcurrentState", "SplitServer"]


class ConcurrentServer(ServiceBase):
  """The server's side of a split-learning algorithm, behind any transport: the shell around the
  algorithm's coordinator (`coordinators.COORDINATORS`).

  Args:
    model: the split model.
    sl: what the algorithm's factory takes, the same as the clients': `sljax.vanilla(model, ...)`
      (`sljax.u_shaped(model, ...)` for "parallel_sl_u" and "sequential_sl_u"); its optimizers,
      loss and codecs are the algorithm's.
    algorithm: a name of `coordinators.COORDINATORS`: "parallel_sl", "parallel_sl_u",
      "heterogeneous_parallel_sl", "local_loss_sl", "splitfed_v1", "splitfed_v2" (`ALGORITHMS`,
      all clients at once), or "sequential_sl", "sequential_sl_u" (`SplitServer` picks these).
    schedule: clients, rounds, steps per round (per turn, in sequential SL), batch size.
    input_spec: shape (without the batch axis) and dtype of the clients' inputs; the server starts
      where the simulated algorithm's `init(key, ...)` does.
    key: the run's PRNG key (the key given to the simulated algorithm's `init`).
    tokens: bearer token -> client id.
    certificate_names: TLS client certificate common name -> client id (with mutual TLS).
    checkpoint_dir: where to checkpoint (orbax); a server started on a directory holding a
      checkpoint resumes from it.
    checkpoint_every: checkpoint after every this many applied steps or commits (and at every end
      of a round or turn, and whatever a client must not hear of before it is durable).
    lease_seconds: a client that makes no progress (no call of it changes the state) for this long
      while others wait for it (at a barrier, for the average, in its turn) is dropped from the
      round (loses its turn); polling `Status` does not count.
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
    recorder: a `sljax.privacy.transcript.Recorder`: every training message the server receives and
      sends (Forward, Backward, Handover), as the bytes that crossed the wire, goes into its
      transcript, for `sljax privacy-report`; `close()` finishes the file. None: nothing recorded.
    options: the algorithm's own options, as its factory takes them (local-loss SL: `aux_head`,
      `sljax.algorithms.linear_head(num_classes)` by default; heterogeneous parallel SL: `cuts`);
      the clients pass the same to `connect`.
    sealed_handoffs: sequential SL: the clients seal the client half among themselves
      (`sljax.privacy.handoff`; `connect(..., handoff_key=...)`), and the server stores and relays
      the sealed bytes, never a readable half: the first client makes the initial half from the
      run's key (the handshake gives it the key's data, `init_key`). The handshake refuses a client
      that does not seal, and a client that seals is refused by a server that does not.
    simulated: the simulated algorithm to serve in place of the registry's `algorithm` (None: the
      registry's, built from `sl`, `schedule` and `options`), built for this schedule: a research server
      whose `init` (the server's state) and `Schedule.server_step` are its own while its clients run
      `algorithm`'s legs, keys and order, e.g. the malicious `sljax.privacy.hijacking.hijacking_server`.
      The clients are told `algorithm`; `algorithm`'s coordinator serves it.

  Example:
    >>> server = ConcurrentServer(model, sl, algorithm="parallel_sl", schedule=Schedule(4, 10, 5, 32),
    ...                           input_spec=ArraySpec((64,), "float32"), key=jax.random.key(0),
    ...                           tokens={"t0": 0, "t1": 1, "t2": 2, "t3": 3})      # doctest: +SKIP
    >>> running = sljax.transport.serve(server.handle, address="127.0.0.1:0", max_workers=12)  # doctest: +SKIP
  """

  def __init__(
      self,
      model: SplitModel,
      sl: Vanilla | UShaped,
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
      max_abs_value: float | None = wire.DEFAULT_MAX_ABS_VALUE,
      num_classes: int | str | None = "auto",
      max_samples: int = MAX_SAMPLES,
      recorder=None,
      options: Mapping[str, Any] | None = None,
      sealed_handoffs: bool = False,
      simulated: Algorithm | None = None,
  ):
    if algorithm not in coord.COORDINATORS:
      raise ValueError(f"algorithm: expected one of {tuple(coord.COORDINATORS)}, got {algorithm!r}")
    self.algorithm = algorithm
    self.schedule = schedule.check()
    self._configure(num_clients=schedule.num_clients, tokens=tokens, certificate_names=certificate_names, sl=sl,
                    checkpoint_every=checkpoint_every, lease_seconds=lease_seconds,
                    max_message_bytes=max_message_bytes, max_predict_batch=max_predict_batch, clock=clock,
                    max_abs_value=max_abs_value, num_classes=num_classes, max_samples=max_samples, recorder=recorder)
    self.options = dict(options or {})
    if sealed_handoffs and coord.COORDINATORS[algorithm] is not coord.Turns:
      raise ValueError(f"sealed_handoffs: only sequential SL hands client halves over through the server "
                       f"('sequential_sl', 'sequential_sl_u'), this server runs {algorithm!r}")
    self.handoff = "sealed" if sealed_handoffs else "plain"
    if sealed_handoffs:  # the key `init` takes, for the first client to make the initial half as the simulation does
      self._init_key = [int(v) for v in np.asarray(jax.random.key_data(key), np.uint32).ravel()]
    algo = simulated if simulated is not None else sched.algorithm(algorithm, sl, schedule, input_spec, **self.options)
    built = None if algo.config is None else (algo.config.num_clients, algo.config.batch_size, algo.local_steps)
    if simulated is not None and built != (schedule.num_clients, schedule.batch_size, schedule.local_steps):
      raise ValueError(f"simulated: expected an algorithm built for (clients, batch size, local steps) "
                       f"{(schedule.num_clients, schedule.batch_size, schedule.local_steps)}, got {built}")
    # the server starts where the simulation's `init` does: its server part, the clients' halves, the run key
    sim = jax.jit(algo.init)(key, sched.stand_in_data(schedule, input_spec))
    if simulated is not None:  # a server that trains no task half (an attack's) answers no Predict
      try:
        jax.eval_shape(algo.predict, sim, jax.ShapeDtypeStruct((1, *input_spec.shape), input_spec.dtype))
      except ValueError as e:
        self._no_inference = f"{simulated.name}: {e}"
    k = schedule.num_clients
    view = algo.schedule.clients  # where the clients differ (heterogeneous cuts): each one's legs and half
    if view is not None:
      parties = [view.party(sim, c) for c in range(k)]
    else:  # one client half (sequential SL), or the first of the stacked ones: they start equal
      parties = [jax.tree.map(lambda a: a[0], sim.clients) if algo.client_axes.clients else sim.clients]
    legs = [view.protocol(c) for c in range(k)] if view else [sl]
    b = schedule.batch_size
    x_struct = jax.ShapeDtypeStruct((b, *input_spec.shape), input_spec.dtype)
    y_struct = jax.ShapeDtypeStruct((b,), jnp.int32)
    specs, smashed, tail = [], [], None
    for one in legs:
      halves = jax.eval_shape(one.init, jax.random.key(0), x_struct)
      specs.append(halves.server.input_spec)
      if isinstance(one, UShaped):
        up, _, tail, _ = sched.u_shaped_messages(one, halves, x_struct, y_struct)
      else:
        up = jax.eval_shape(one.client_forward, halves.client, x_struct, y_struct, jax.random.key(0))[0]
      smashed.append(up)
    self.input_spec = halves.client.input_spec
    self.cut_spec = specs[0]
    self._cut_specs = specs * k if len(specs) == 1 else specs  # one per client
    # sealed: no readable half is kept (Turns ignores this argument)
    initial = [None if sealed_handoffs else msgs.to_bytes(sched.to_message(party)) for party in parties]
    self._initial_halves = initial * k if len(initial) == 1 else initial
    self._configure_inference(model, legs[0])  # also resolves num_classes="auto"
    self.coordinator = coord.COORDINATORS[algorithm](
        algo, schedule=self.schedule, lease_seconds=self.lease_seconds,
        smashed_template=smashed[0] if len(smashed) == 1 else tuple(smashed),
        weights_template=msgs.spec_of(coord.weights_of(parties[0])), max_message_bytes=self.max_message_bytes,
        tail_template=tail, max_abs_value=self.max_abs_value, num_classes=self.num_classes,
        half_template=msgs.spec_of(sched.to_message(parties[0])),
        sealed_bytes=handoff.sealed_size(sched.to_message(parties[0])) if sealed_handoffs else None)
    self._view_infer = None if view is None else jax.jit(view.server_infer, static_argnums=1)
    self._begin(checkpoint_dir, self.coordinator.initial(sim))

  def _begin(self, checkpoint_dir, initial: Any) -> None:
    """Starts the shell around `self.coordinator` from `initial` (its durable state), or from the
    latest checkpoint in `checkpoint_dir`: leases, waits, the first checkpoint, the warm-up."""
    self._waiting: dict[int, int] = {}  # client -> the ticket of its call that waits
    self._tickets = itertools.count()
    self._progress_at: dict[int, float] = {}  # client -> when a call of it last changed the state
    self._waited_since: dict[int, float] = {}  # client -> since when others wait for it
    initial = self._restore(checkpoint_dir, initial)
    if self._version:
      logger.info("resumed from checkpoint %d at round %d", self._version, int(initial.round))
    self.s = self.coordinator.start(initial)
    if self._manager is not None and self._manager.latest_step() is None:
      self._save()
    self.coordinator.warm_up(self.s)

  @property
  def state(self) -> ConcurrentState:
    """What a checkpoint saves (see `ConcurrentState`)."""
    return self.s.durable

  # ---- the shell: transitions, waits, leases, checkpoints -------------------------------------------

  def _run(self, client: int, transition: Callable[[coord.CoordinatorState], tuple[Any, Any]], *,
           method: str) -> dict:
    """Applies a coordinator's transition, waits as it asks (releasing the lock), and returns the
    response's fields. A transition that changes the state is the caller's progress, which renews
    its lease; waiting, like any call that changes nothing, does not. Called with the lock held.

    At most one call of a client waits at a time (so waiting calls hold at most `num_clients` of
    the transport's workers): a call that waits ends the wait of the client's earlier one, which
    answers ABORTED (a client's retry, after its deadline, takes the place of the call it gave up)."""
    outcome = self._step(client, transition)
    ticket = next(self._tickets)
    try:
      while isinstance(outcome, coord.Wait):
        if self._waiting.get(client) != ticket:
          self._waiting[client] = ticket
          self._cond.notify_all()  # the client's earlier waiting call, if any, stops waiting
        end = self._clock() + outcome.seconds
        while not outcome.until(self.s) and self._clock() < end and self._waiting.get(client) == ticket:
          self._cond.wait(timeout=min(0.05, max(0.0, end - self._clock())))
          self._expire_if_due()
        if self._waiting.get(client) != ticket:
          raise TransportError(grpc.StatusCode.ABORTED, f"{method}: a newer call of client {client} waits in this "
                                                        "one's place (a client has one waiting call at a time)")
        outcome = self._step(client, outcome.then)
    finally:
      if self._waiting.get(client) == ticket:
        del self._waiting[client]
    fields = outcome.fields
    if fields is coord.POSITION:
      return self._position(client)
    return {name: self._position(client) if value is coord.POSITION else value for name, value in fields.items()}

  def _step(self, client: int, transition) -> Any:
    """One transition of `client`'s call; returns its outcome."""
    before = self.s
    self.s, outcome = transition(self.s)
    if self.s is not before:
      self._progress(client)
    self._after()
    return outcome

  def _after(self) -> None:
    """After a transition: the checkpoint it needs, and wake whoever waits on the state."""
    v = self.s.volatile
    if v.must_save or v.commits_since_save >= self._checkpoint_every:
      self._save()
    self._cond.notify_all()

  def _save(self) -> None:
    self._save_state()
    self.s = self.coordinator.saved(self.s)

  def _seen(self, client: int) -> None:
    """A call arrived: leases start with the first call from any client (a call alone renews none)."""
    del client
    if not self._progress_at:
      self._progress_at = dict.fromkeys(range(self.schedule.num_clients), self._clock())

  def _progress(self, client: int) -> None:
    self._seen(client)
    self._progress_at[client] = self._clock()

  def _silent(self, client: int) -> bool:
    """No progress of `client` for a lease, counted from when others began to wait for it if later."""
    now = self._clock()
    last = max(self._progress_at.get(client, now), self._waited_since.get(client, now))
    return now - last > self.lease_seconds

  def _expire_if_due(self) -> None:
    """Drops the clients that others wait for and that have made no progress for a lease, whatever
    else they call (`Status` polls, waits in other calls)."""
    if self.coordinator.done(self.s):
      return
    s, now = self.s, self._clock()
    for k in range(self.schedule.num_clients):
      if not self.coordinator.droppable(s, k):
        self._waited_since.pop(k, None)
        continue
      self._waited_since.setdefault(k, now)
      if self._silent(k):
        s = self.coordinator.drop(s, k, f"no progress for more than {self.lease_seconds:.1f} s while others waited "
                                        "for it")
        self._waited_since.pop(k, None)
    self.s = self.coordinator.advance(s)
    self._after()

  def _position(self, client: int | None = None) -> dict[str, Any]:
    return self.coordinator.position(self.s, client)

  def _staged_dict(self):
    return self.coordinator.staged_dict(self.s)

  def _predict_party(self, client: int) -> PartyState:
    return self.coordinator.predict_party(self.s, client)

  def _cut_spec_of(self, client: int) -> ArraySpec:
    return self._cut_specs[client]

  def _answer(self, client: int, party: PartyState, activations) -> Any:
    if self._view_infer is None:
      return super()._answer(client, party, activations)
    return self._view_infer(party, client, msgs.SmashedData(activations))

  def _hello(self, client: int, req: dict) -> None:
    # nothing durable, no checkpoint, no lease renewed: only a step the others wait for is progress
    self.s = self.coordinator.hello(self.s, client, req["samples"])

  # ---- methods --------------------------------------------------------------------------------------

  def _handover(self, client: int, req: dict) -> bytes:
    if req["op"] == "get":
      return wire.encode(self._run(client, lambda s: self.coordinator.on_get(
          s, client, req["round"], req["wait"], self._initial_halves[client]), method="Handover"))
    if req["op"] == "put":
      return wire.encode(self._run(client, lambda s: self.coordinator.on_put(
          s, client, req["round"], req["steps"], req["message"]), method="Handover"))
    if req["op"] == "leave":
      return wire.encode(self._run(client, lambda s: self.coordinator.on_leave(s, client, req["round"]),
                                   method="Handover"))
    raise wire.invalid(f"Handover request: field 'op' must be 'get', 'put' or 'leave', got {req['op']!r}")

  def _forward(self, client: int, req: dict) -> bytes:
    return wire.encode(self._run(client, lambda s: self.coordinator.on_forward(
        s, client, req["round"], req["step"], req["message"]), method="Forward"))

  def _commit(self, client: int, req: dict) -> bytes:
    return wire.encode(self._run(client, lambda s: self.coordinator.on_commit(s, client, req["round"], req["step"]),
                                 method="Commit"))

  def _backward(self, client: int, req: dict) -> bytes:
    return wire.encode(self._run(client, lambda s: self.coordinator.on_backward(
        s, client, req["round"], req["step"], req["message"]), method="Backward"))


class SplitServer(ConcurrentServer):
  """The server's side of sequential split learning, behind any transport: `ConcurrentServer` with
  the `Turns` coordinator.

  Both parties build the same `sljax.vanilla(model, ...)` (same optimizers, codecs and loss); the
  server runs the schedule's server step only, the clients `client_forward` and `client_backward`.
  With `sljax.u_shaped(model, ...)` (a three-part model) the server runs the body's legs, the
  clients the head and the tail, and the handshake names the algorithm "sequential_sl_u". The
  server starts where `sequential_sl(...).init(key, ...)` (or `sequential_sl_u`) does and follows
  its schedule: keys, order, server step.

  Args:
    model: the split model.
    sl: `sljax.vanilla(model, ...)`, or `sljax.u_shaped(model, ...)`.
    schedule: clients, rounds, steps per turn, batch size.
    input_spec: shape (without the batch axis) and dtype of the clients' inputs.
    key: the run's PRNG key (the key given to the simulated algorithm's `init`).
    **kwargs: as for `ConcurrentServer` (tokens, certificate names, checkpoints, the lease — a client
      silent for `lease_seconds` during its turn loses the turn —, limits, clock, and
      `sealed_handoffs=True`: the clients seal the half they hand over, the server relays it unread).

  Example:
    >>> server = SplitServer(model, sl, schedule=Schedule(2, 3, 4, 32), input_spec=ArraySpec((64,), "float32"),
    ...                      key=jax.random.key(0), tokens={"t0": 0, "t1": 1})     # doctest: +SKIP
    >>> running = sljax.transport.serve(server.handle, address="127.0.0.1:0")       # doctest: +SKIP
  """

  def __init__(self, model: SplitModel, sl: Vanilla | UShaped, *, schedule: sched.Schedule, input_spec: ArraySpec,
               key: jax.Array, **kwargs):
    algorithm = "sequential_sl_u" if isinstance(sl, UShaped) else "sequential_sl"
    super().__init__(model, sl, algorithm=algorithm, schedule=schedule, input_spec=input_spec, key=key, **kwargs)
