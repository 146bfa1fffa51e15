"""Vertical split learning over a network: the label party serves, every other party is a client.

The parties hold different columns of the same samples (aligned first, `sljax.align`); the label
party holds the labels, the merge and the top (and may hold columns and a bottom of its own). It
runs `VerticalServer`, the shell of `sljax.transport.ConcurrentServer` (identities, leases, the
lock, checkpoints, status codes) around the `Parties` coordinator; every other party runs
`connect_party` and `run_party` over any transport (`GrpcTransport`, `InProcessTransport`). The
legs are `sljax.vertical_sl`'s, unchanged, so a run over the network is the fused simulation's:

    party p:  rows, keys = the step's rows and keys (from the run key: no message)
              smashed_p, pullback_p = party_forward[p](its state, its columns[rows], key p)
              -> Forward(party p, round, step, SmashedData(smashed_p), no labels)
    server:   holds every Forward until each party has sent its own (a barrier), then
              top_step(top, every party's smashed data, labels[rows], key P)   (its own bottom too)
              <- CutGradient(dL/dsmashed_p) to each party: its own, nothing else
    party p:  new state = party_backward[p](its state, pullback_p, CutGradient)
              -> Commit(party p, round, step)
    server:   holds every Commit until each party has committed; then the step is the state.

A party that drops during a step (no Forward, or no Commit, within a lease while the others wait)
has the step discarded everywhere, as `step(..., dropped=)` discards it in simulation: the server
keeps its state, the waiting calls answer that the step was discarded (naming the party), every
party keeps its state from before the step, and the next step goes on with every party; with
`VerticalServer(..., continue_without=True)` the party is then absent (its stand-in in its place,
as `step(..., absent=)`) until its `Forward` brings it back. Inference (`Predict`) is a barrier
over the parties too: every party sends its smashed rows of the same samples, named by their
index (`offset`), and a party missing for a lease is named in the error the others get (with
`continue_without`, stood in for, and named in the answer).

Schedule (`vertical_schedule`): round r is epoch r of `sljax.fit(sl, state, xs, y, key=fit_key,
epochs=rounds, batch_size=B)` on the `N` aligned samples, with `init_key, fit_key =
split(wrap_key_data(run_key))` and `state = sl.init(init_key, ...)`: its rows are
`permutation(k_perm, N)[:steps * B]` in batches of B, `k_perm, k_steps = split(fold_in(fit_key, r))`,
step s's key `split(k_steps, N // B)[s]`, party p's leg takes `split(step key, P + 1)[p]` and the
top the last. Every party derives its own rows and keys from the run key and N.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, struct

from sljax import codecs as codec_lib
from sljax import messages as msgs
from sljax import simulation
from sljax.protocol import CODEC_STREAM, ArraySpec, PartyState, _fresh_encode, apply_update, check_batch
from sljax.training import reuse_program
from sljax.transport import coordinators as coord
from sljax.transport import schedule as sched
from sljax.transport import wire
from sljax.transport.client import _SAVING, call
from sljax.transport.concurrent import ConcurrentServer
from sljax.transport.coordinators import POSITION, CoordinatorState, Reply, Wait
from sljax.transport.wire import Transport, TransportError
from sljax.vertical import VerticalSL

logger = logging.getLogger(__name__)

ALGORITHM = "vertical_sl"
# Beside a label party's checkpoints, once aligned over the service: its aligner's state (`Aligner.saved`).
ALIGNMENT_FILE = "alignment.msgpack"
_FAILED = grpc.StatusCode.FAILED_PRECONDITION

__all__ = ["ALGORITHM", "Parties", "PartiesState", "PartyResult", "PartySession", "VerticalServer", "connect_party",
           "party_step", "predict_party", "run_party", "vertical_schedule"]


# ---- the schedule: rows and keys of every step, from the run key --------------------------------------

def vertical_schedule(run_key, *, samples: int, batch_size: int) -> tuple[jax.Array, Callable]:
  """The keys and data order of a vertical run, as every party derives them from the run key.

  Args:
    run_key: the run key's data (uint32 words, as the handshake gives it) or a typed key.
    samples: N, the aligned samples every party holds (in the aligned order).
    batch_size: B, rows per step.

  Returns:
    `(init_key, epoch)`: the key of `sl.init`, and `epoch(round_) -> (rows, step_keys)`, the
    `(N // B, B)` rows of each step of round `round_` and the `(N // B, 2)` uint32 data of each step's
    key, exactly as `sljax.fit(..., key=fit_key)` draws them for its epoch `round_`.

  Example:
    >>> init_key, epoch = vertical_schedule(np.array([0, 7], np.uint32), samples=10, batch_size=4)
    >>> rows, keys = epoch(0)
    >>> rows.shape, keys.shape
    ((2, 4), (2, 2))
  """
  key = jnp.asarray(run_key)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key.astype(jnp.uint32))
  init_key, fit_key = jax.random.split(key)
  if not 1 <= batch_size <= samples:
    raise ValueError(f"batch_size: expected at least 1 and at most the {samples} aligned samples, got {batch_size}")
  return init_key, functools.partial(_epoch, fit_key, samples=samples, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("samples", "batch_size"))
def _epoch(fit_key, round_, *, samples: int, batch_size: int):
  # as `training.make_epoch`, on `fold_in(key, e)` as `fit` gives it
  steps = samples // batch_size
  k_perm, k_steps = jax.random.split(jax.random.fold_in(fit_key, round_))
  rows = jax.random.permutation(k_perm, samples)[: steps * batch_size].reshape(steps, batch_size)
  return rows, jax.random.key_data(jax.random.split(k_steps, steps))


def _leg_keys(step_key_data, parties: int) -> jax.Array:
  """The step key split as `vertical_sl(...).step` splits it: one key per party, then the top's."""
  return jax.random.split(jax.random.wrap_key_data(step_key_data), parties + 1)


def _stand_in(top, stand_ins, p: int, batch: int) -> jax.Array:
  """What stands in for absent party p's smashed data, as `vertical_sl`'s: its learned vector, or zeros."""
  spec = top.input_spec[p]
  if not stand_ins:
    return jnp.zeros((batch, *spec.shape), spec.dtype)
  return jnp.broadcast_to(stand_ins[0][p].params, (batch, *spec.shape))


def _server_step(sl: VerticalSL, top_step: Callable, label: int | None, present: tuple[bool, ...] | None, server,
                 ups, y, x_own, step_key_data):
  """The label party's part of `vertical_sl(...).step`: its own bottom's legs (if any) and `top_step`.

  `present` (static): None, every party takes part; else one bool per party, and an absent party's
  place holds its stand-in, its gradient's codec state is kept and (`replacement="learned"`) its
  stand-in learns, as `step(..., present=mask)` does. `server` is `(own, top)`, or `(own, top,
  stand_ins)` with `replacement="learned"`. Bit for bit `step(..., absent=names)` of the absent parties."""
  own, top, *stand_ins = server
  n = sl.model.num_parties
  keys = _leg_keys(step_key_data, n)
  ups = list(ups)
  if label is not None:
    ups[label], pending = sl.party_forward[label](own, x_own, keys[label])
  absent = () if present is None else tuple(p for p in range(n) if not present[p])
  for p in absent:
    ups[p] = msgs.SmashedData(_fresh_encode(sl.uplinks[p], _stand_in(top, stand_ins, p, len(y)), keys[p],
                                            CODEC_STREAM))
  new_top, downs, metrics = top_step(top, tuple(ups), y, keys[n])
  if absent:
    new_top = new_top.replace(codec_state=tuple(top.codec_state[p] if p in absent else c
                                                for p, c in enumerate(new_top.codec_state)))
    if stand_ins:  # the absent parties' vectors learn from the gradient at their place
      stand_ins = [tuple(apply_update(r, sl.downlinks[p].decode(downs[p].grad).sum(0), sl.top_optimizer, ())
                         if p in absent else r for p, r in enumerate(stand_ins[0]))]
  if label is not None:
    own = sl.party_backward[label](own, pending, downs[label])
  return (own, new_top, *stand_ins), downs, metrics["loss"], metrics["accuracy"]


def _server_infer(sl: VerticalSL, label: int | None, batch: int, server, payloads, x_own):
  """The label party's part of `vertical_sl(...).predict`: the parties' payloads decoded (its own
  bottom's through its own codec), a stand-in where a party's payload is None, the merge and the
  top, in eval mode."""
  own, top, *stand_ins = server
  model, hs = sl.model, []
  for p in range(model.num_parties):
    payload = payloads[p]
    if p == label:
      h = model.bottoms[p].apply(own.params, own.model_state, x_own, key=None, train=False)[0]
      payload = _fresh_encode(sl.uplinks[p], h, None, CODEC_STREAM)
    elif payload is None:
      hs.append(_stand_in(top, stand_ins, p, batch))
      continue
    hs.append(sl.uplinks[p].decode(payload))
  return model.label_stage.apply(top.params, top.model_state, tuple(hs), key=None, train=False)[0]


# ---- the coordinator: pure transitions ---------------------------------------------------------------


@struct.dataclass
class PartiesState:
  """Everything the label party's server holds that a checkpoint saves.

  Attributes:
    server: `(own, top)`: the label party's own bottom (a `PartyState`, or `()` without one) and
      its merge and top (`VerticalState.top`).
    round: the current round; equals the schedule's rounds when training is over.
    step: the steps of this round done (applied or discarded).
    upto: (P,) int32, the steps done since the start of the run, the same for every party (counting
      a round as `local_steps` steps), as the position reports them.
    gone: (P,) bool, the parties dropped from the step under way.
    absent: (P,) bool, the parties absent from the steps (with `continue_without`: dropped for
      their lease and not back since): their places hold stand-ins.
    applied: the steps done since the start of the run when the latest applied step was done:
      a step done and not applied was discarded.
    key: the run key data (uint32).
  """

  server: Any
  round: np.ndarray
  step: np.ndarray
  upto: np.ndarray
  gone: np.ndarray
  applied: np.ndarray
  key: np.ndarray
  absent: np.ndarray


class StepUnderWay(NamedTuple):
  """The step under way (not checkpointed: a restart discards it)."""

  round: int
  step: int
  smashed: Mapping[int, msgs.SmashedData]
  # once every party has forwarded: the server's state after the step and each party's cut gradient
  server: Any = None
  downs: Mapping[int, bytes] | None = None
  loss: float = 0.0
  accuracy: float = 0.0


class PartiesVolatile(NamedTuple):
  """What a restart loses (`coordinators.Volatile`'s fields, and the parties' own).

  Attributes:
    pending: the step under way.
    committed: the parties that committed it.
    outcomes: (round, step) -> None if the step was applied, else why it was discarded (the recent
      steps, so that a late Commit hears which).
    inference: party -> ((offset, batch), its uplink payload), the Predict calls waiting for the others.
    answers: party -> the Predict response fields computed for its waiting Predict.
  """

  pending: StepUnderWay | None = None
  committed: frozenset = frozenset()
  staged: Mapping = {}
  durable_upto: np.ndarray | None = None
  commits_since_save: int = 0
  must_save: bool = False
  declared: Mapping[int, int] = {}
  outcomes: Mapping[tuple[int, int], str | None] = {}
  inference: Mapping[int, tuple[int, Any]] = {}
  answers: Mapping[int, dict] = {}


class _Plan(NamedTuple):
  """What the coordinator serves (its `algo`): the name, the legs, the party names."""

  name: str
  sl: VerticalSL


class Parties(coord.Coordinator):
  """Vertical SL: a barrier per step over the parties, each party's answer its own cut gradient.

  `Forward(r, s)` is held until every party has sent its smashed data; then the label party's
  step runs once (its own bottom, if it has one, then `top_step`) and each party gets its
  `CutGradient`. `Commit(r, s)` is held until every party has committed; then the step is the
  server's state. A party dropped during the step (silent for a lease while others wait) has the
  step discarded everywhere: the server keeps its state and every party its own. With
  `continue_without`, such a party is absent from the next step on: the barriers are over the
  parties present, and its place holds its stand-in (`step(..., present=mask)`), until its
  `Forward` of a step not yet computed brings it back. Client ids are the parties' indices in
  `sl.model.names`; the label party's index is no client's.

  The durable state is a `PartiesState`.
  """

  def __init__(self, plan: _Plan, *, labels: np.ndarray, features: np.ndarray | None,
               predict_features: np.ndarray | None, epoch: Callable, continue_without: bool = False, **kwargs):
    self.sl = plan.sl
    self.continue_without = continue_without
    self.epoch = epoch
    model = plan.sl.model
    self.names = model.names
    self.label = model.names.index(model.label_party) if model.label_party is not None else None
    self.remote = tuple(p for p in range(model.num_parties) if p != self.label)
    self.labels = np.asarray(labels, np.int32)
    self.features = features
    self.predict_features = predict_features
    super().__init__(plan, **kwargs)

  def who(self, client: int) -> str:
    return f"party {self.names[client]!r}"

  def _build(self) -> None:
    # programs reused across servers of the same `sl` (a test's second run compiles nothing again)
    label = self.label
    self._server_step = reuse_program(
        self.sl.top_step, ("vertical server step", label),
        lambda top_step: jax.jit(functools.partial(_server_step, self.sl, top_step, label), static_argnums=0))
    self._infer = reuse_program(self.sl.top_step, ("vertical inference", label),
                                lambda _: jax.jit(functools.partial(_server_infer, self.sl, label), static_argnums=0))

  # ---- the state -----------------------------------------------------------------------------------

  def initial(self, server: Any, run_key: np.ndarray) -> PartiesState:  # noqa: D102 -- see Coordinator
    k = self.num_clients
    return jax.device_get(PartiesState(server=server, round=coord._i32(0), step=coord._i32(0),
                                       upto=np.zeros((k,), np.int32), gone=np.zeros((k,), bool),
                                       applied=coord._i32(0), key=np.asarray(run_key),
                                       absent=np.zeros((k,), bool)))

  def start(self, durable: PartiesState) -> CoordinatorState:
    return CoordinatorState(durable, PartiesVolatile(durable_upto=np.array(durable.upto)))

  def where(self, s: CoordinatorState, client: int) -> str:
    if self.done(s):
      return "training is over"
    return (f"the server is at round {int(s.durable.round)}, step {int(s.durable.step)} (steps 0 .. "
            f"{int(s.durable.step) - 1} done)")

  def check_step(self, s: CoordinatorState, method: str, client: int, round_: int, step: int) -> None:
    """Raises unless (round_, step) is the step under way or the next one."""
    d = s.durable
    if self.done(s):
      raise TransportError(_FAILED, f"{method}: training is over")
    now = (int(d.round), int(d.step))
    if (round_, step) < now:
      raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{method}: step {step} of round {round_} is over ({self._outcome(s, round_, step)}); "
                           f"{self.where(s, client)}")
    if (round_, step) > now or step >= self.schedule.local_steps:
      raise TransportError(_FAILED, f"{method}: step {step} of round {round_} is not the next step; "
                                    f"{self.where(s, client)}")

  def _applied(self, s: CoordinatorState, round_: int, step: int) -> bool:
    """Whether step `step` of round `round_`, which is done, was applied (not discarded)."""
    outcomes = s.volatile.outcomes
    if (round_, step) in outcomes:
      return outcomes[round_, step] is None
    # since a restart: the latest applied step is known; a party retries its latest commit only
    return int(s.durable.applied) == round_ * self.schedule.local_steps + step + 1

  def _outcome(self, s: CoordinatorState, round_: int, step: int) -> str:
    if self._applied(s, round_, step):
      return "applied"
    why = s.volatile.outcomes.get((round_, step))
    return f"discarded: {why}" if why is not None else "discarded (why is no longer known: the server restarted)"

  # ---- drops and steps -----------------------------------------------------------------------------

  def waited_for(self, s: CoordinatorState, client: int) -> bool:
    p = s.volatile.pending
    if p is None or client == self.label:
      return False
    if p.downs is None:
      return client not in p.smashed and not s.durable.absent[client]
    return client in p.smashed and client not in s.volatile.committed

  def _present(self, s: CoordinatorState) -> list[int]:
    """The other parties the step under way waits for: all, or (`continue_without`) those not absent."""
    return [k for k in self.remote if not s.durable.absent[k]]

  def on_leave(self, s: CoordinatorState, client: int, round_: int):
    """Handover leave is for clients that train a round on their own; a party takes part step by step."""
    del s, round_
    raise TransportError(_FAILED, f"Handover leave: {self.who(client)} takes part step by step in vertical SL; there "
                                  "is no round to leave (a party that stops is dropped from the step under way after "
                                  "its lease)")

  def drop(self, s: CoordinatorState, client: int, why: str) -> CoordinatorState:
    """`client` is dropped from the step under way (which is then discarded); it takes part again
    from the next step."""
    p = s.volatile.pending
    logger.warning("%s dropped from step %s of round %d: %s; the step is discarded%s", self.who(client),
                   None if p is None else p.step, int(s.durable.round), why,
                   "; the party is absent from the next step on" if self.continue_without else "")
    return s.replace(gone=coord._set(s.durable.gone, client, True))

  def advance(self, s: CoordinatorState) -> CoordinatorState:
    p = s.volatile.pending
    if self.done(s) or p is None:
      return s
    gone = s.durable.gone
    if p.downs is None:
      present = self._present(s)
      if not any(gone[k] for k in present) and all(k in p.smashed for k in present):
        return self._compute(s, p)
      if all(gone[k] or k in p.smashed for k in present):
        return self._end_step(s, p, self._dropped(gone, "did not forward"))
      return s
    if all(k in s.volatile.committed for k in p.smashed):
      return self._end_step(s, p, None)
    if all(gone[k] or k in s.volatile.committed for k in p.smashed):
      return self._end_step(s, p, self._dropped(gone, "did not commit"))
    return s

  def _dropped(self, gone: np.ndarray, what: str) -> str:
    names = ", ".join(repr(self.names[k]) for k in self.remote if gone[k])
    return f"party {names} {what} within the lease ({self.lease_seconds:.1f} s)"

  def rows(self, round_: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    rows, keys = self.epoch(round_)
    return np.asarray(rows[step]), np.asarray(keys[step])

  def _compute(self, s: CoordinatorState, p: StepUnderWay) -> CoordinatorState:
    """Every party has forwarded: the label party's step on all of it."""
    rows, key = self.rows(p.round, p.step)
    ups = tuple(p.smashed.get(k) for k in range(self.num_clients))
    x_own = None if self.features is None else self.features[rows]
    present = None
    if any(k not in p.smashed for k in self.remote):  # absent parties (continue_without): their stand-ins
      present = tuple(k == self.label or k in p.smashed for k in range(self.num_clients))
    server, downs, loss, acc = self._server_step(present, s.durable.server, ups, self.labels[rows], x_own, key)
    downs = jax.device_get(downs)
    p = p._replace(server=server, downs={k: msgs.to_bytes(downs[k]) for k in p.smashed}, loss=float(loss),
                   accuracy=float(acc))
    logger.debug("round %d step %d: loss %.5f, accuracy %.4f", p.round, p.step, p.loss, p.accuracy)
    return s.set(pending=p, committed=frozenset())

  def _end_step(self, s: CoordinatorState, p: StepUnderWay, why: str | None) -> CoordinatorState:
    """The step is over: applied (`why` None) or discarded everywhere (`why` says why)."""
    d, steps = s.durable, self.schedule.local_steps
    server = d.server if why is not None else p.server
    upto = np.full_like(d.upto, p.round * steps + p.step + 1)
    outcomes = {key: v for key, v in s.volatile.outcomes.items() if key >= (p.round - 1, 0)}
    # with continue_without, a party dropped from the step is absent from the next one on
    absent = d.absent | d.gone if self.continue_without else d.absent
    s = s.replace(server=server, step=coord._i32(p.step + 1), upto=upto, gone=np.zeros_like(d.gone),
                  applied=d.applied if why is not None else coord._i32(upto[0]), absent=absent)
    s = s.set(pending=None, committed=frozenset(), outcomes={**outcomes, (p.round, p.step): why})
    if why is not None:
      logger.warning("step %d of round %d discarded everywhere: %s", p.step, p.round, why)
    s = self.count_commit(s)
    return self.next_round(s) if p.step + 1 == steps else s

  def next_round(self, s: CoordinatorState) -> CoordinatorState:
    s = s.replace(round=coord._i32(int(s.durable.round) + 1), step=coord._i32(0)).set(must_save=True)
    logger.info("round %d begins", int(s.durable.round))
    return s

  # ---- methods -------------------------------------------------------------------------------------

  def read_smashed(self, message: bytes, client: int) -> msgs.SmashedData:
    return self.read(self.smashed_templates[client], message, what=f"Forward ({self.who(client)})")

  def on_forward(self, s: CoordinatorState, client: int, round_: int, step: int, message: bytes):
    self.check_step(s, "Forward", client, round_, step)
    smashed = self.read_smashed(message, client)
    p = s.volatile.pending
    if p is None or (p.round, p.step) != (round_, step):
      p = StepUnderWay(round_, step, {})
    if p.downs is None:  # a retry before the barrier replaces the message
      if s.durable.absent[client]:  # back (continue_without): it takes part from this step on
        logger.warning("%s is back: it takes part from step %d of round %d on", self.who(client), step, round_)
        s = s.replace(absent=coord._set(s.durable.absent, client, False))
      s = self.advance(s.set(pending=p._replace(smashed={**p.smashed, client: smashed})))
    elif client not in p.smashed:  # absent, the step computed without it: it takes part from the next one
      def over(s):
        return (int(s.durable.round), int(s.durable.step)) > (round_, step) or self.done(s)

      def without(s):
        raise TransportError(grpc.StatusCode.ABORTED, f"Forward: step {step} of round {round_} runs without "
                                                      f"{self.who(client)} (absent); take part from the next step")

      return s, Wait(over, without, self.lease_seconds + 1.0)

    def computed(s):
      p = s.volatile.pending
      return p is None or (p.round, p.step) != (round_, step) or p.downs is not None

    def answer(s):
      p = s.volatile.pending
      if p is None or (p.round, p.step) != (round_, step) or p.downs is None or client not in p.downs:
        if (round_, step) in s.volatile.outcomes:
          raise TransportError(grpc.StatusCode.ABORTED, f"Forward: step {step} of round {round_} was "
                                                        f"{self._outcome(s, round_, step)}; {self.where(s, client)}")
        raise TransportError(grpc.StatusCode.ABORTED, f"Forward: the other parties did not forward step {step} of "
                                                      f"round {round_} in time; forward it again")
      # the loss and the accuracy stay with the label party: a party learns its own gradient only
      return s, Reply({"message": p.downs[client], "loss": 0.0, "accuracy": 0.0})

    return s, Wait(computed, answer, self.lease_seconds + 1.0)

  def on_commit(self, s: CoordinatorState, client: int, round_: int, step: int):
    d = s.durable
    if (round_, step) < (int(d.round), int(d.step)):
      if self._applied(s, round_, step):
        return s, Reply(POSITION)  # a retry of a commit that went through
      raise TransportError(_FAILED, f"Commit: step {step} of round {round_} was {self._outcome(s, round_, step)}; "
                                    f"keep the party's state from before it. {self.where(s, client)}")
    self.check_step(s, "Commit", client, round_, step)
    p = s.volatile.pending
    if p is None or (p.round, p.step) != (round_, step) or p.downs is None or client not in p.smashed:
      raise self.not_staged(s, "Commit", client, round_, step)
    s = self.advance(s.set(committed=s.volatile.committed | {client}))

    def over(s):
      d = s.durable
      return (int(d.round), int(d.step)) > (round_, step) or self.done(s)

    def answer(s):
      if not over(s) or not self._applied(s, round_, step):
        raise TransportError(_FAILED, f"Commit: step {step} of round {round_} was "
                                      f"{self._outcome(s, round_, step)}; keep the party's state from before it. "
                                      f"{self.where(s, client)}")
      return s, Reply(POSITION)

    return s, Wait(over, answer, self.lease_seconds + 1.0)

  def on_predict(self, s: CoordinatorState, client: int, offset: int, batch: int, payload: Any):
    """Collaborative inference of the samples `offset .. offset + batch - 1` (of the label party's
    `predict_features`, and of every party's rows for inference): held until every party (with
    `continue_without`: every party not absent) has sent its rows of the same samples, or a lease.
    Then, with `continue_without`, the parties that sent none are stood in for and the response
    names them (`stood_in`); without it, the reply is `{"error": (FAILED_PRECONDITION, details
    naming the parties that sent none)}`, which the server raises once the caller's rows are
    withdrawn. Each answer goes to the parties that sent rows of those samples."""
    v = s.volatile
    rows = (offset, batch)
    other = next((k for k, (r, _) in v.inference.items() if r != rows and k != client), None)
    if other is not None:
      theirs = v.inference[other][0]
      raise wire.invalid(f"Predict: {self.who(client)} sends the samples {offset} .. {offset + batch - 1}, "
                         f"{self.who(other)} {theirs[0]} .. {theirs[0] + theirs[1] - 1}: every party sends its rows "
                         "of the same samples")
    if self.label is not None:
      if self.predict_features is None:
        raise TransportError(_FAILED, f"Predict: the label party {self.names[self.label]!r} holds a bottom of its "
                                      "own, and the server was given none of its columns for inference "
                                      "(predict_features)")
      if offset + batch > len(self.predict_features):
        raise wire.invalid(f"Predict: field 'offset' + 'batch' must be at most the {len(self.predict_features)} "
                           f"samples of the label party's predict_features, got {offset} + {batch}")
    s = s.set(inference={**v.inference, client: (rows, payload)},
              answers={k: a for k, a in v.answers.items() if k != client})
    needed = self._present(s) if self.continue_without else self.remote
    if all(k in s.volatile.inference for k in needed):
      s = self._infer_now(s, rows)

    def answer(s):
      v = s.volatile
      if client not in v.answers and self.continue_without and client in v.inference:  # the lease is out
        s = self._infer_now(s, rows)
        v = s.volatile
      if client in v.answers:
        return s.set(answers={k: a for k, a in v.answers.items() if k != client}), Reply(v.answers[client])
      missing = ", ".join(repr(self.names[k]) for k in self.remote if k not in v.inference)
      # its rows leave with it (an error would leave the state as it was: the shell raises it)
      s = s.set(inference={k: i for k, i in v.inference.items() if k != client})
      return s, Reply({"error": (_FAILED, f"Predict: collaborative inference needs every party {self.names}; party "
                                          f"{missing} sent no rows within the lease ({self.lease_seconds:.1f} s)")})

    return s, Wait(lambda s: client in s.volatile.answers, answer, self.lease_seconds)

  def _infer_now(self, s: CoordinatorState, rows: tuple[int, int]) -> CoordinatorState:
    """The answer to the waiting Predict calls of the samples `rows` (offset, batch), the parties
    that sent none stood in for."""
    offset, batch = rows
    inference = s.volatile.inference
    senders = [k for k in self.remote if k in inference and inference[k][0] == rows]
    payloads = tuple(inference[k][1] if k in senders else None for k in range(self.num_clients))
    x_own = None if self.label is None else self.predict_features[offset:offset + batch]
    out = jax.device_get(self._infer(batch, s.durable.server, payloads, x_own))
    stood_in = [self.names[k] for k in self.remote if k not in senders]
    if stood_in:
      logger.warning("Predict of the samples %d .. %d: parties %s stood in for", offset, offset + batch - 1, stood_in)
    fields = {"message": msgs.to_bytes(msgs.Prediction(out)), **({"stood_in": stood_in} if stood_in else {})}
    return s.set(inference={k: i for k, i in inference.items() if k not in senders},
                 answers={**s.volatile.answers, **dict.fromkeys(senders, fields)})

  def predict_party(self, s: CoordinatorState, client: int) -> PartyState:
    del client
    return s.durable.server[1]

  def staged_dict(self, s: CoordinatorState) -> dict:
    p = s.volatile.pending
    return {"pending": None if p is None or p.server is None else
            {"position": [p.round, p.step], "server": jax.tree.map(np.asarray, p.server)},
            "committed": sorted(s.volatile.committed)}

  def warm_up(self, s: CoordinatorState) -> None:
    rows, key = self.rows(0, 0)
    ups = tuple(self.zeros(k) if k != self.label else None for k in range(self.num_clients))
    x_own = None if self.features is None else self.features[rows]
    jax.block_until_ready(self._server_step(None, s.durable.server, ups, self.labels[rows], x_own, key))


# ---- the server ----------------------------------------------------------------------------------


class VerticalServer(ConcurrentServer):
  """The label party's server of vertical split learning, behind any transport.

  The shell of `ConcurrentServer` (identities, leases, the lock, checkpoints, status codes)
  around the `Parties` coordinator. Every other party is a client whose id is its index in
  `sl.model.names`; its credentials (a token, or a certificate named as `certificate_names`
  says) must be that party's.

  Args:
    sl: `sljax.vertical_sl(model, ...)`, the same as every party's (optimizers, codecs, loss).
    labels: (N,) int labels of the N aligned samples, in the aligned order.
    input_specs: the parties' columns, one `ArraySpec` (shape without the batch axis, dtype) per
      party in order, or a mapping by party name: the server starts where `sl.init` does on them.
    key: the run key: `init_key, fit_key = split(key)` (see `vertical_schedule`).
    rounds: epochs over the aligned samples.
    batch_size: rows per step.
    local_steps: steps per round, at most N // batch_size (the default: a whole epoch, as `fit`).
    features: (N, ...) the label party's own columns, if its party has a bottom (`label_party`).
    predict_features: the label party's own columns for inference (a label party with a bottom
      only), one row per sample to infer: a `Predict` call names its samples by their rows here
      (`predict_party(..., offset=)`), and every party sends its rows of the same samples.
    aligner: None (`labels`, `features` are of the aligned samples, in the aligned order), or a
      `sljax.transport.Aligner` of the label party's IDs, one per row of `labels` and `features`,
      whose members are the other parties (client id: name): the server first answers the
      parties' `Align` calls (`connect_party(..., ids=...)`) and trains on the shared rows, from the
      first other call once every party has aligned (before that: FAILED_PRECONDITION). With
      `checkpoint_dir`, the aligner's state (`Aligner.saved`: which of its rows each party holds,
      no key and no ID) is saved there (`alignment.msgpack`) as training begins; a server
      restarted on the directory with an `Aligner` of the same IDs resumes it, and its training.
    continue_without: False (the default): a party dropped for its lease has its step discarded and
      every step waits for every party; `Predict` needs every party. True: a party dropped for its
      lease has its step discarded and is absent from the next step on (its place holds its stand-in,
      as `step(..., present=mask)`: zeros, or the learned vector with `replacement="learned"`, which
      the label party trains), until its `Forward` of a step not yet computed brings it back (with
      its state as it last had it: a party absent does not train); `Predict` answers once the
      parties present have sent their rows, or after a lease, standing in for the parties that
      sent none (the response names them).
    tokens, certificate_names, checkpoint_dir, checkpoint_every: as for `ConcurrentServer`.
    lease_seconds, max_message_bytes, max_predict_batch, clock, max_abs_value: as for `ConcurrentServer`.

  Example:
    >>> server = VerticalServer(sl, labels=y, input_specs={"bank": ArraySpec((6,), "float32"),
    ...                         "network": ArraySpec((8,), "float32")}, key=jax.random.key(0), rounds=2,
    ...                         batch_size=32, tokens={"t-network": 1})       # doctest: +SKIP
    >>> running = sljax.transport.serve(server.handle, address="127.0.0.1:0")  # doctest: +SKIP
  """

  algorithm = ALGORITHM

  def __init__(self, sl: VerticalSL, *, labels, input_specs, key: jax.Array, rounds: int, batch_size: int,
               local_steps: int | None = None, features=None, predict_features=None, aligner=None,
               continue_without: bool = False, tokens: Mapping[str, int] | None = None,
               certificate_names: Mapping[str, int] | None = None,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 1,
               lease_seconds: float = 120.0, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
               max_predict_batch: int = 4096, clock: Callable[[], float] = time.monotonic,
               max_abs_value: float | None = wire.DEFAULT_MAX_ABS_VALUE):
    if not isinstance(sl, VerticalSL):
      raise TypeError(f"sl: expected a VerticalSL (sljax.vertical_sl), got {type(sl).__name__}")
    model = sl.model
    names, p_count = model.names, model.num_parties
    labels = np.asarray(labels)
    what = "the label party's samples (one per ID given to the aligner)" if aligner else "the aligned samples"
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
      raise ValueError(f"labels: expected (N,) integer labels of {what}, got {labels.shape} {labels.dtype}")
    specs = _specs(input_specs, names)
    label = names.index(model.label_party) if model.label_party is not None else None
    remote = [p for p in range(p_count) if p != label]
    if aligner is not None:
      from sljax.transport.alignment import Aligner  # noqa: PLC0415 -- alignment imports the PSI library lazily

      if not isinstance(aligner, Aligner):
        raise TypeError(f"aligner: expected a sljax.transport.Aligner, got {type(aligner).__name__}")
      if len(aligner.state.ids) != len(labels):
        raise ValueError(f"labels: expected one label per ID the aligner holds ({len(aligner.state.ids)}), got "
                         f"{len(labels)}")
      expected = {p: names[p] for p in remote}
      if aligner.members != expected:
        raise ValueError(f"aligner: expected the members {expected} (client id: party), got {aligner.members}")
    features = _own_columns("features", features, label, names, specs, rows=len(labels))
    predict_features = _own_columns("predict_features", predict_features, label, names, specs, rows=None)
    for credentials, ids in (("tokens", tokens or {}), ("certificate_names", certificate_names or {})):
      for k in ids.values():
        if k == label:
          raise ValueError(f"{credentials}: client id {k} is the label party {names[k]!r}, which runs this server; "
                           "give ids of the other parties")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    links = SimpleNamespace(uplink=sl.uplinks[remote[0]], downlink=sl.downlinks[remote[0]])
    self._configure(num_clients=p_count, tokens=tokens, certificate_names=certificate_names, sl=links,
                    checkpoint_every=checkpoint_every, lease_seconds=lease_seconds,
                    max_message_bytes=max_message_bytes, max_predict_batch=max_predict_batch, clock=clock,
                    max_abs_value=max_abs_value, num_classes=None)
    self._party_codecs = [wire.codec_fields(SimpleNamespace(uplink=sl.uplinks[p], downlink=sl.downlinks[p]))
                          for p in range(p_count)]
    self.options = {}
    self.aligner = aligner
    self._starting = threading.Lock()
    self._started = False
    run_key = jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) else key
    self._plan = dict(sl=sl, labels=labels, features=features, predict_features=predict_features, specs=specs,
                      label=label, remote=remote, run_key=np.asarray(run_key, np.uint32), rounds=rounds,
                      batch_size=batch_size, local_steps=local_steps, checkpoint_dir=checkpoint_dir,
                      continue_without=bool(continue_without))
    if aligner is None:
      self._start(np.arange(len(labels)))
    elif checkpoint_dir is not None and os.path.exists(self._alignment_path()):
      with open(self._alignment_path(), "rb") as f:  # a restart after the alignment: the same rows, resumed
        aligner.resume(serialization.msgpack_restore(f.read()))
      self._start(aligner.rows)

  def _alignment_path(self) -> str:
    return os.path.join(os.path.abspath(self._plan["checkpoint_dir"]), ALIGNMENT_FILE)

  def _save_alignment(self) -> None:
    """The aligner's state, beside the checkpoints, before the first of them: a restarted server resumes it."""
    os.makedirs(os.path.dirname(self._alignment_path()), exist_ok=True)
    if not os.path.exists(self._alignment_path()):
      part = self._alignment_path() + ".part"
      with open(part, "wb") as f:
        f.write(serialization.msgpack_serialize(self.aligner.saved()))
        f.flush()
        os.fsync(f.fileno())
      os.replace(part, self._alignment_path())

  def _start(self, rows: np.ndarray) -> None:
    """Training on the label party's `rows` (all of them, or the aligner's): the state, the coordinator, the shell."""
    plan = self._plan
    sl, label, specs, batch_size = plan["sl"], plan["label"], plan["specs"], plan["batch_size"]
    labels = plan["labels"][rows]
    features = None if plan["features"] is None else plan["features"][rows]
    n, local_steps, p_count = len(labels), plan["local_steps"], sl.model.num_parties
    if not 1 <= batch_size <= n:
      raise ValueError(f"batch_size: expected an int in [1, {n}] (the aligned samples), got {batch_size!r}")
    if local_steps is None:
      local_steps = n // batch_size
    if not 1 <= local_steps <= n // batch_size:
      raise ValueError(f"local_steps: expected an int in [1, {n // batch_size}] (steps in an epoch of {n} samples "
                       f"in batches of {batch_size}), got {local_steps!r}")
    self.schedule = sched.Schedule(p_count, plan["rounds"], local_steps, batch_size).check()
    self.samples = n
    init_key, epoch = vertical_schedule(plan["run_key"], samples=n, batch_size=batch_size)
    state = sl.init(init_key, tuple(np.zeros((batch_size, *s.shape), s.dtype) for s in specs))
    self._cut_specs = list(state.top.input_spec)
    self.cut_spec = self._cut_specs[plan["remote"][0]]
    self.input_spec = specs
    self._initial_halves = [b"" if p == label else msgs.to_bytes(sched.to_message(state.parties[p]))
                            for p in range(p_count)]
    # what each party's Forward carries: its smashed data through its uplink codec (the codec's payload tree)
    templates = tuple(
        None if p == label else jax.eval_shape(sl.party_forward[p], state.parties[p],
                                               jax.ShapeDtypeStruct((batch_size, *specs[p].shape), specs[p].dtype),
                                               jax.random.key(0))[0]
        for p in range(p_count))
    self._predict_templates = {}
    self._uplinks = sl.uplinks
    self.coordinator = Parties(
        _Plan(ALGORITHM, sl), labels=labels, features=features, predict_features=plan["predict_features"],
        epoch=epoch, continue_without=plan["continue_without"], schedule=self.schedule,
        lease_seconds=self.lease_seconds, smashed_template=templates,
        weights_template=None, max_message_bytes=self.max_message_bytes, max_abs_value=self.max_abs_value,
        num_classes=None)
    if self.aligner is not None and plan["checkpoint_dir"] is not None:
      self._save_alignment()
    own = () if label is None else state.parties[label]
    server = (own, state.top) if state.replacement is None else (own, state.top, state.replacement)
    self._begin(plan["checkpoint_dir"], self.coordinator.initial(server, plan["run_key"]))
    self._started = True

  def handle(self, method: str, request: bytes, *, metadata: Mapping[str, str],
             peer_names: Sequence[str] = ()) -> bytes:
    """`ServiceBase.handle`; with an aligner, training begins (on the aligned rows) with the first
    call other than `Align` once every party has aligned, and such a call before that answers
    FAILED_PRECONDITION."""
    if not self._started and method != "Align" and method in wire.REQUESTS:
      self._authenticate(metadata, peer_names)
      with self._starting:
        if not self._started:
          rows = self.aligner.rows
          if rows is None:
            to_go = ", ".join(self.aligner.pending)
            raise TransportError(_FAILED, f"{method}: the parties are not aligned yet ({to_go} to go): every party "
                                          "aligns its rows first (Align)")
          self._start(rows)
    return super().handle(method, request, metadata=metadata, peer_names=peer_names)

  def _who(self, client: int) -> str:
    return f"party {self._plan['sl'].model.names[client]!r}"

  def _codecs_of(self, client: int) -> dict[str, dict[str, Any]]:
    return self._party_codecs[client]

  def _hello(self, client: int, req: dict) -> None:
    if req["samples"] != self.samples:
      raise TransportError(_FAILED, f"Handshake: {self._who(client)} holds {req['samples']} aligned samples, the "
                                    f"label party {self.samples}: align the parties' rows first (sljax.align), "
                                    "every party the same samples in the same order")

  def _predict(self, client: int, req: dict) -> bytes:
    batch, offset = req["batch"], req.get("offset")
    if not 1 <= batch <= self.max_predict_batch:
      raise wire.invalid(f"Predict: field 'batch' must be in [1, {self.max_predict_batch}], got {batch}")
    if offset is None or offset < 0:
      raise wire.invalid(f"Predict: field 'offset' (the first sample's index) must be an int >= 0, got {offset}")
    message = self._read(self._party_template(batch, client), req["message"], what=f"Predict ({self._who(client)})")
    with self._cond:
      self._seen(client)
      self._expire_if_due()
      fields = self._run(client, lambda s: self.coordinator.on_predict(s, client, offset, batch, message.activations),
                         method="Predict")
    if "error" in fields:
      raise TransportError(*fields["error"])
    return wire.encode(fields)

  def _party_template(self, batch: int, client: int) -> msgs.SmashedData:
    """The `Predict` message of `batch` rows that party `client` sends: its smashed data through its uplink codec."""
    if (batch, client) not in self._predict_templates:
      spec, uplink = self._cut_specs[client], self._uplinks[client]
      cut = jax.ShapeDtypeStruct((batch, *spec.shape), spec.dtype)
      payload = jax.eval_shape(lambda h: uplink.encode(h, uplink.init(h), jax.random.key(0))[0], cut)
      self._predict_templates[batch, client] = msgs.SmashedData(payload)
    return self._predict_templates[batch, client]


def _specs(input_specs, names: tuple[str, ...]) -> tuple[ArraySpec, ...]:
  if isinstance(input_specs, Mapping):
    missing = [name for name in names if name not in input_specs]
    unknown = [name for name in input_specs if name not in names]
    if missing or unknown:
      raise ValueError(f"input_specs: expected one ArraySpec per party {names}, got parties {tuple(input_specs)}")
    input_specs = tuple(input_specs[name] for name in names)
  if not isinstance(input_specs, Sequence) or len(input_specs) != len(names):
    raise ValueError(f"input_specs: expected one ArraySpec per party {names}, got {input_specs!r}")
  for name, spec in zip(names, input_specs, strict=True):
    if not isinstance(spec, ArraySpec):
      raise TypeError(f"input_specs: expected an ArraySpec for party {name!r}, got {type(spec).__name__}")
  return tuple(input_specs)


def _own_columns(what: str, x, label: int | None, names, specs, *, rows: int | None):
  """The label party's own columns, checked against its spec (None where it has no bottom)."""
  if label is None:
    if x is not None:
      raise ValueError(f"{what}: the model has no label party's bottom (vertical_model(..., label_party=...)); "
                       "expected None")
    return None
  if x is None:
    if rows is None:
      return None
    raise ValueError(f"{what}: the label party {names[label]!r} holds a bottom: expected its ({rows}, ...) columns")
  x = np.asarray(x)
  check_batch(f"{what} (party {names[label]!r})", x, specs[label], batch=rows)
  return x


# ---- a party: the client's side ---------------------------------------------------------------------


class PartySession(NamedTuple):
  """What a party knows once connected: who it is, the schedule, its compiled legs, its initial state.

  Attributes:
    transport: how it reaches the label party's server.
    party, index: its name and its index in `sl.model.names` (its client id).
    num_parties: the parties in the model.
    schedule: from the handshake (`num_clients` is the number of parties).
    run_key: the run key's data, from the handshake: rows and keys derive from it (`vertical_schedule`).
    x: its aligned columns, (N, ...).
    epoch: `epoch(round_) -> (rows, step key data)` (`vertical_schedule`).
    forward, backward: `sl.party_forward[index]` and `sl.party_backward[index]`, jitted.
    infer: `infer(state, x) -> uplink payload`: its bottom in eval mode, through its uplink codec
      from a fresh state, as `VerticalSL.predict`; jitted.
    initial: its state at the start of the run, as the server initialised it (`Handover get` of round 0).
    down_template: the CutGradient it accepts.
    timeout: seconds per call; calls that wait for the other parties add `lease_seconds`.
    lease_seconds: the server's lease.
    aligned: with `connect_party(..., ids=)`, the party's `sljax.AlignedRows` (its shared rows of
      `x` as given, in the common order); else None.
  """

  transport: Transport
  party: str
  index: int
  num_parties: int
  schedule: sched.Schedule
  run_key: np.ndarray
  x: np.ndarray
  epoch: Callable[[int], tuple[jax.Array, jax.Array]]
  forward: Callable[..., Any]
  backward: Callable[..., Any]
  infer: Callable[..., Any]
  initial: PartyState
  down_template: msgs.CutGradient
  timeout: float
  lease_seconds: float
  aligned: Any = None


class PartyResult(NamedTuple):
  """What `run_party` returns: the party's final state, and one record per step (round, step,
  applied, bytes_up, bytes_down: the wire bytes of its Forward message and of its CutGradient;
  position: the server's position in the step's Commit answer, None if the step was discarded)."""

  state: PartyState
  history: list[dict]


def connect_party(transport: Transport, sl: VerticalSL, *, party: str, x, ids=None,
                  timeout: float = 60.0) -> PartySession:
  """Handshakes with the label party's server as party `party` and compiles its legs; with `ids`,
  aligns the party's rows with the others' first (`sljax.transport.align`, against the server's
  `aligner`).

  Args:
    transport: `GrpcTransport` or `InProcessTransport`, with this party's credentials.
    sl: the same `sljax.vertical_sl(model, ...)` as the server's.
    party: this party's name in `sl.model.names` (not the label party's).
    x: its columns of the aligned samples, (N, ...), in the aligned order (`sljax.align`); with
      `ids`, of all its samples, one row per ID.
    ids: None (`x` is aligned already), or the party's sample IDs, one per row of `x`: the party
      runs the member's side of the private set intersection (`sljax.transport.align`) over
      `transport` first and trains on its shared rows (`session.aligned` says which).
    timeout: seconds per call.

  Returns:
    The `PartySession`.

  Raises:
    ValueError: naming the party: an unknown name, the label party's, columns its bottom cannot
      take, or columns of another shape than the server's model was built for.
    TransportError: from the handshake: UNAUTHENTICATED, PERMISSION_DENIED (credentials of another
      party), FAILED_PRECONDITION (another algorithm, smashed data of another shape, another
      codec, another number of aligned samples than the label party's: each naming the party).

  Example:
    >>> session = connect_party(GrpcTransport("bank.example:50051", token=token, root_certificates=ca), sl,
    ...                         party="network", x=network_columns)          # doctest: +SKIP
    >>> result = run_party(session)                                          # doctest: +SKIP
    >>> logits = predict_party(session, result.state, network_test_columns)  # doctest: +SKIP
  """
  if not isinstance(sl, VerticalSL):
    raise TypeError(f"sl: expected a VerticalSL (sljax.vertical_sl), got {type(sl).__name__}")
  model = sl.model
  if party not in model.names:
    raise ValueError(f"party: expected one of the parties {model.names}, got {party!r}")
  if party == model.label_party:
    raise ValueError(f"party: {party!r} is the label party, which runs the server (VerticalServer), not a client")
  p = model.names.index(party)
  x = np.asarray(x)
  if x.ndim < 1 or len(x) == 0:
    raise ValueError(f"x (party {party!r}): expected N >= 1 aligned samples, got shape {x.shape}")
  aligned = None
  if ids is not None:
    from sljax.transport.alignment import align  # noqa: PLC0415 -- the PSI library, only where IDs are aligned

    if len(ids) != len(x):
      raise ValueError(f"ids (party {party!r}): expected one ID per row of x ({len(x)}), got {len(ids)}")
    aligned = align(transport, ids, client=p, timeout=timeout)
    x = aligned.take(party, x)
  spec = ArraySpec.of(x)
  bottom = model.bottoms[p]

  def shapes(x):
    params, model_state = bottom.init(jax.random.key(0), x)
    return params, model_state, bottom.apply(params, model_state, x, key=None, train=False)[0]

  try:
    _, _, h1 = jax.eval_shape(shapes, jax.ShapeDtypeStruct((1, *spec.shape), spec.dtype))
  except Exception as e:  # noqa: BLE001 -- re-raised naming the party and its columns
    raise ValueError(f"x (party {party!r}): its bottom cannot take columns of shape {spec.describe()}: {e}") from None
  cut = ArraySpec.of(h1)
  links = wire.codec_fields(SimpleNamespace(uplink=sl.uplinks[p], downlink=sl.downlinks[p]))
  hello = call(transport, "Handshake", {"protocol": msgs.PROTOCOL_VERSION, "client": p, "cut_shape": list(cut.shape),
                                        "cut_dtype": cut.dtype, **links, "samples": len(x)}, timeout=timeout)
  if hello["algorithm"] != ALGORITHM:
    raise TransportError(_FAILED, f"algorithm: the server runs {hello['algorithm']!r}; party {party!r} takes part in "
                                  f"{ALGORITHM!r}")
  if hello["num_clients"] != model.num_parties:
    raise TransportError(_FAILED, f"parties: the server's model has {hello['num_clients']} parties, party "
                                  f"{party!r}'s {model.num_parties} {model.names}")
  schedule = sched.Schedule(hello["num_clients"], hello["rounds"], hello["local_steps"], hello["batch_size"])
  run_key = np.asarray(hello["run_key"], np.uint32)
  _, epoch = vertical_schedule(run_key, samples=len(x), batch_size=schedule.batch_size)
  b = schedule.batch_size
  xb = jax.ShapeDtypeStruct((b, *spec.shape), spec.dtype)
  params, model_state, h = jax.eval_shape(shapes, xb)
  up, down = sl.uplinks[p], sl.downlinks[p]
  half = msgs.ClientHalf(params, model_state, jax.eval_shape(sl.party_optimizers[p].init, params),
                         jax.eval_shape(up.init, h))
  got = call(transport, "Handover", {"client": p, "round": 0, "op": "get", "steps": 0, "wait": 0.0, "message": None},
             timeout=timeout)
  try:
    initial = sched.from_message(msgs.from_bytes(half, got["message"] or b""), spec)
  except msgs.MessageError as e:
    raise ValueError(f"x (party {party!r}): the server's model was built for other columns than these, of shape "
                     f"{spec.describe()}: its initial state for the party does not fit ({e})") from None
  grad = jax.eval_shape(lambda g: down.encode(g, down.init(g), jax.random.key(0))[0], h)
  infer = reuse_program(sl.party_forward[p], ("party inference",),
                        lambda _: jax.jit(functools.partial(_party_infer, bottom, up)))
  forward = reuse_program(sl.party_forward[p], ("party leg",), jax.jit)
  backward = reuse_program(sl.party_backward[p], ("party leg",), jax.jit)
  return PartySession(transport, party, p, model.num_parties, schedule, run_key, x, epoch, forward, backward, infer,
                      initial, msgs.CutGradient(grad), timeout, float(hello["lease_seconds"]), aligned)


def _call(session: PartySession, method: str, fields: dict, *, wait: bool = False) -> dict:
  timeout = session.timeout + (session.lease_seconds if wait else 0.0)
  return call(session.transport, method, {"client": session.index, **fields}, timeout=timeout)


class _Behind(Exception):
  """The server is at an earlier step than the party: it restarted from an older checkpoint."""

  def __init__(self, position: dict):
    super().__init__(f"the server is back at round {position['round']}, step {position['step']}")
    self.position = position


def _is_over(session: PartySession, round_: int, step: int) -> bool:
  """Whether the server has gone past step `step` of round `round_` (applied or discarded).

  Raises:
    _Behind: the server is at an earlier step (it restarted from an older checkpoint).
  """
  position = _call(session, "Status", {})
  if not position["done"] and (position["round"], position["step"]) < (round_, step):
    raise _Behind(position)
  return position["done"] or (position["round"], position["step"]) > (round_, step)


def party_step(session: PartySession, state: PartyState, round_: int, step: int, rows, key_data,
               *, attempts: int = 3, checkpoints: _PartyCheckpoints | None = None) -> tuple[PartyState, dict]:
  """One step of the party: its forward on its rows, `Forward`, its backward on its cut gradient,
  `Commit`. Returns its new state once the step is applied everywhere, or its state as it was if
  the step was discarded (a party dropped during it); and the step's record: round, step, applied,
  bytes_up, bytes_down (the wire bytes of its Forward message and of its CutGradient), and
  `position`, the server's position once the step was applied (None if discarded).

  With `checkpoints`, the step and the party's state before and after it are saved before the
  `Commit` is sent.

  Raises:
    TransportError: the call's error, if the step is neither over nor can be sent again.
  """
  keys = _leg_keys(key_data, session.num_parties)
  smashed, pending = session.forward(state, session.x[np.asarray(rows)], keys[session.index])
  message = msgs.to_bytes(jax.device_get(smashed))
  record = {"round": round_, "step": step, "applied": False, "bytes_up": len(message), "bytes_down": 0,
            "position": None}
  for attempt in range(attempts):
    try:
      answer = _call(session, "Forward", {"round": round_, "step": step, "message": message}, wait=True)
    except TransportError as e:
      if e.code in (grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS, _FAILED) and _is_over(session, round_,
                                                                                                  step):
        return state, record  # discarded: the party keeps its state from before the step
      if e.code != grpc.StatusCode.ABORTED or attempt + 1 == attempts:
        raise
      continue
    record["bytes_down"] = len(answer["message"])
    down = wire.read_message(session.down_template, answer["message"], what="Forward response")
    new = session.backward(state, pending, down)
    if checkpoints is not None:  # durable before the server can apply the step
      checkpoints.save(round_, step, state, new)
    try:
      position = _call(session, "Commit", {"round": round_, "step": step}, wait=True)
    except TransportError as e:
      if e.code in (grpc.StatusCode.ABORTED, _FAILED) and _is_over(session, round_, step):
        return state, record
      if e.code != grpc.StatusCode.ABORTED or attempt + 1 == attempts:
        raise
      continue
    return new, {**record, "applied": True, "position": position}
  raise AssertionError("unreachable")


def run_party(session: PartySession, *, progress: bool = False,
              checkpoint_dir: str | os.PathLike | None = None) -> PartyResult:
  """Every step of every round of the run, from its start: the party's side of `vertical_sl`'s steps.

  A step that is discarded (a party dropped during it) leaves the party's state as it was, as it
  leaves the server's; the next step goes on. The party keeps its state as of the server's latest
  checkpoint (a `Commit` answer whose `durable` equals its `step`): a server restarted from that
  checkpoint, behind the party, has the party roll back to it and go on from there, so no step
  is lost or applied twice.

  With `checkpoint_dir`, the party saves its step and its state before and after it there before
  each `Commit`; a party process that dies and is started again on the same directory (while the
  others wait, within the server's lease) sends its latest `Commit` again, takes the state the
  answer says (after the step if it was applied, before it if not) and goes on at the server's
  position, so the run ends as an uninterrupted one would.

  Returns:
    The `PartyResult`: the party's final state and one record per step it ran (the steps replayed
    after a rollback once, as they were last run; after a restart from a checkpoint, the steps of
    this process).

  Raises:
    TransportError: FAILED_PRECONDITION if the run is under way and the party has no checkpoint of
      it (a party joins from the start), if the server went back to another step than the party's
      latest durable one, or a call's error that retrying does not cure.
  """
  from sljax._progress import progress_bar  # noqa: PLC0415 -- only the driver shows one

  checkpoints = None if checkpoint_dir is None else _PartyCheckpoints(checkpoint_dir, session)
  try:
    return _run_party(session, progress=progress, checkpoints=checkpoints, progress_bar=progress_bar)
  finally:
    if checkpoints is not None:
      checkpoints.close()


def _run_party(session: PartySession, *, progress: bool, checkpoints: _PartyCheckpoints | None,
               progress_bar: Callable) -> PartyResult:
  schedule, state, history = session.schedule, session.initial, []
  saved = None if checkpoints is None else checkpoints.latest()
  if saved is not None:
    state = _resume(session, saved)
  position = _call(session, "Status", {})
  at = (position["round"], position["step"])
  if saved is None and (at != (0, 0) or position["done"]):
    raise TransportError(_FAILED, f"party {session.party!r}: the run is under way (round {position['round']}, step "
                                  f"{position['step']}); a party takes part from the start of the run, or from "
                                  "its checkpoint")
  # the step the server's latest checkpoint is at, and this party's state then (None: not known)
  durable = (at, state) if saved is None or position["durable"] == position["step"] else None
  epoch = None
  with progress_bar(total=schedule.rounds * schedule.local_steps, desc=f"party {session.party}",
                    disable=not progress) as bar:
    while at[0] < schedule.rounds:
      r, s = at
      if epoch is None or epoch[0] != r:
        epoch = (r, *jax.device_get(session.epoch(r)))
      try:
        state, record = party_step(session, state, r, s, epoch[1][s], epoch[2][s], checkpoints=checkpoints)
      except _Behind as behind:
        back = (behind.position["round"], behind.position["step"])
        if durable is None or back != durable[0]:
          kept = "no step" if durable is None else f"round {durable[0][0]}, step {durable[0][1]}"
          raise TransportError(_FAILED, f"party {session.party!r}: the server went back to round {back[0]}, step "
                                        f"{back[1]}, and the party's state is kept as of {kept}") from None
        logger.warning("party %s: the server restarted at round %d, step %d; rolling back to it", session.party,
                       *back)
        state, at = durable[1], back
        history = [h for h in history if (h["round"], h["step"]) < back]
        bar.update(len(history) - bar.n)
        continue
      history.append(record)
      bar.update(1)
      at = (r, s + 1) if s + 1 < schedule.local_steps else (r + 1, 0)
      position = record["position"]
      if position is not None and position["durable"] == position["step"]:
        durable = ((position["round"], position["step"]), state)
      elif position is None and durable is not None and durable[0] == (r, s):  # discarded: both states as they were
        durable = (at, durable[1])
  return PartyResult(state, history)


class _PartyCheckpoints:
  """A party's own checkpoints (orbax): before each `Commit`, the step and its state before and after it."""

  def __init__(self, directory: str | os.PathLike, session: PartySession):
    with _SAVING:
      self._manager = simulation.checkpoint_manager(directory)
    self._steps = session.schedule.local_steps
    half = jax.tree.map(lambda a: np.zeros(np.shape(a), np.asarray(a).dtype), sched.to_message(session.initial))
    self._like = {"position": np.zeros((2,), np.int32), "before": half, "after": half}
    self._input_spec = session.initial.input_spec

  def save(self, round_: int, step: int, before: PartyState, after: PartyState) -> None:
    number = round_ * self._steps + step
    item = {"position": np.array([round_, step], np.int32), "before": jax.device_get(sched.to_message(before)),
            "after": jax.device_get(sched.to_message(after))}
    with _SAVING:
      self._manager.save(number, args=ocp.args.StandardSave(item), force=True)
      self._manager.wait_until_finished()

  def latest(self) -> tuple[int, int, PartyState, PartyState] | None:
    if self._manager.latest_step() is None:
      return None
    with _SAVING:
      item = simulation.restore(self._manager, self._like)
    round_, step = (int(v) for v in np.asarray(item["position"]))
    return (round_, step, sched.from_message(item["before"], self._input_spec),
            sched.from_message(item["after"], self._input_spec))

  def close(self) -> None:
    with _SAVING:
      self._manager.wait_until_finished()
      self._manager.close()


def _resume(session: PartySession, saved: tuple[int, int, PartyState, PartyState]) -> PartyState:
  """The party's state at the server's position, from its latest checkpoint (the step of its latest
  Commit, its state before and after it): the Commit sent again says whether the step was applied."""
  round_, step, before, after = saved
  position = _call(session, "Status", {})
  if not position["done"] and (position["round"], position["step"]) < (round_, step):
    raise TransportError(_FAILED, f"party {session.party!r}: its checkpoint is at step {step} of round {round_}, the "
                                  f"server at step {position['step']} of round {position['round']}")
  try:
    _call(session, "Commit", {"round": round_, "step": step}, wait=True)
  except TransportError as e:
    if e.code not in (grpc.StatusCode.ABORTED, _FAILED):
      raise
    logger.warning("party %s resumes from its checkpoint: step %d of round %d was not applied (%s)", session.party,
                   step, round_, e.details)
    return before  # discarded, or (the server at that step, without it) to be forwarded again
  logger.warning("party %s resumes from its checkpoint after step %d of round %d", session.party, step, round_)
  return after


def predict_party(session: PartySession, state: PartyState, x, *, offset: int = 0, batch_size: int = 1024,
                  return_stood_in: bool = False):
  """Collaborative inference: this party's smashed rows of `x` go to the label party, which waits
  for every other party's rows of the same samples and answers with the model's outputs.

  The samples are named by their index among the samples to infer (the label party's
  `predict_features` rows, if it has a bottom): `x[i]` is sample `offset + i`. Every party calls
  this with its own columns of the same samples and the same `offset` and `batch_size`; each call
  of `batch_size` samples meets the other parties' calls of the same samples, whatever the order
  they arrive in.

  Args:
    session: from `connect_party`.
    state: the party's state (`run_party(...).state`).
    x: its columns of the samples, (M, ...).
    offset: the index of `x[0]` among the samples to infer.
    batch_size: samples per call.
    return_stood_in: also return the names of the parties the label party stood in for (a server
      with `continue_without`), in any call.

  Returns:
    The outputs, (M, ...); with `return_stood_in`, `(outputs, stood_in)`, a sorted tuple of names.

  Raises:
    TransportError: FAILED_PRECONDITION naming the parties that sent no rows within the server's
      lease (a server without `continue_without`); INVALID_ARGUMENT if the parties send other
      samples at once, or samples past the label party's `predict_features`.
  """
  x = np.asarray(x)
  check_batch(f"x (party {session.party!r})", x, session.initial.input_spec)
  if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
    raise ValueError(f"offset: expected an int >= 0 (the index of x[0] among the samples to infer), got {offset!r}")
  outs, stood_in = [], set()
  for start in range(0, len(x), batch_size):
    payload = jax.device_get(session.infer(state, x[start:start + batch_size]))
    batch = len(x[start:start + batch_size])
    answer = _call(session, "Predict", {"batch": batch, "offset": offset + start,
                                        "message": msgs.to_bytes(msgs.SmashedData(payload))}, wait=True)
    outs.append(_read_prediction(answer["message"], batch))
    stood_in.update(answer.get("stood_in", ()))
  out = np.concatenate(outs)
  return (out, tuple(sorted(stood_in))) if return_stood_in else out


def _party_infer(bottom, uplink: codec_lib.Codec, state: PartyState, x):
  """A party's side of `VerticalSL.predict`: its bottom in eval mode, through its uplink codec from a fresh state."""
  smashed = bottom.apply(state.params, state.model_state, x, key=None, train=False)[0]
  return _fresh_encode(uplink, smashed, None, CODEC_STREAM)


def _read_prediction(data: bytes, batch: int) -> np.ndarray:
  """The outputs of a `Prediction` message of `batch` rows (their other dimensions are the label
  party's: the party does not know them beforehand)."""
  try:
    envelope = msgs._restore(data)  # noqa: SLF001 -- the strict reader, without a template
    logits = envelope["body"]["logits"] if envelope.get("kind") == "Prediction" else None
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise wire.invalid(f"Predict response: malformed Prediction message: {e}") from None
  if not isinstance(logits, np.ndarray) or logits.ndim < 1 or len(logits) != batch:
    raise wire.invalid(f"Predict response: expected a Prediction of {batch} rows")
  return logits
