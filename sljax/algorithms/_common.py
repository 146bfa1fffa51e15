"""What the multi-client algorithms share: their state, participation, averaging, masking, bytes."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils

from sljax import codecs
from sljax import messages as msgs
from sljax.data.clients import ClientData, client_batches
from sljax.execution import Executor, vmap
from sljax.protocol import (ArraySpec, Centralized, PartyState, UShaped, Vanilla, apply_update, check_batch,
                            softmax_cross_entropy)

PyTree = Any
Loss = Callable[[jax.Array, jax.Array], jax.Array]


@struct.dataclass
class SimState:
  """The whole state of a simulation: everything a resumed run needs.

  Attributes:
    clients: the client parties; stacked on a leading client axis (K, ...) except in sequential
      split learning, where one client half is relayed from client to client.
    server: the server party; stacked (K, ...) in SplitFed v1 (one copy per client).
    round: rounds completed; also the cursor of every client's data order.
    key: raw PRNG key data (uint32); round r draws from `fold_in(key, r)`.
  """

  clients: PyTree
  server: PyTree
  round: jax.Array
  key: jax.Array


class RoundInputs(NamedTuple):
  """Who takes part in a round: `participating` (K,) and `dropped` (local_steps, K) booleans.

  `dropped[s, k]` means client k disconnects during step s, after its forward pass and before its
  backward pass. Its step s is discarded everywhere (it leaves no trace on the server nor on its
  own state) and it is gone for the rest of the round: no more steps and no part in averaging.
  """

  participating: jax.Array
  dropped: jax.Array

  def active(self) -> jax.Array:
    """(local_steps, K): the clients whose step s completes."""
    gone = jnp.cumsum(self.dropped.astype(jnp.int32), axis=0) > 0
    return self.participating[None, :] & ~gone

  def completed(self) -> jax.Array:
    """(K,): the clients that took part and finished the round."""
    return self.active()[-1]

  def started(self) -> jax.Array:
    """(local_steps, K): the clients that begin step s, sending its first message (those that drop
    in step s included; gone only from the next)."""
    dropped = self.dropped.astype(jnp.int32)
    return self.participating[None, :] & (jnp.cumsum(dropped, axis=0) - dropped == 0)


class Timeline(NamedTuple):
  """An algorithm's round on the simulated clock (`sljax.network.round_time`), next to its `round`.

  - `run(costs, legs, participating, local_steps, order) -> (wall_s, server_busy_s)`: when each
    leg of each client happens, from the legs' seconds (`sljax.network` builds `legs`: per-client
    `forward`, `backward`, `local_loss`, `model_step` seconds, `up(nbytes)` / `down(nbytes)`
    transmission times and the server's FLOP/s).
  - `traffic(costs, local_steps) -> (bytes up, bytes down)` of one participant in one round.
  - `client_flops(costs, local_steps) -> float`: one participant's FLOPs in one round.
  """

  run: Callable[..., tuple[float, float]]
  traffic: Callable[..., tuple[int, int]]
  client_flops: Callable[..., float]


class Schedule(NamedTuple):
  """An algorithm's schedule, defined once next to its `round`.

  The fused `round`, the network server (`sljax.transport`) and the simulated clock
  (`sljax.network`) all read these; none derives a key, an order or an average of its own.
  `run_key` is the run's raw key data (`SimState.key`), `round_` and `step` count from 0. The
  functions of clients take `ids=None`: the clients' ids in their population (`ClientData.ids`);
  None means all K clients, 0..K-1. What client k draws depends on its id, never on which other
  clients take part, so a round on participants gathered out of a population (`sljax.population`)
  equals the round on the whole stack with the others absent.

  Attributes:
    client_keys: `(run_key, round_, step, ids=None) -> (K,) keys`: the key of each client's legs
      in a step (the client's forward pass, and its backward).
    server_keys: `(run_key, round_, step, ids=None) -> (K,) keys`: the key of the server's step
      that serves client k (one server step on all clients reads entry 0; U-shaped parallel SL
      gives each client's downlink codec its own entry).
    order: `(run_key, round_, ids=None) -> (K,) int32`: the order in which the server serves the
      clients within a step (or, in sequential split learning, the order of the turns), as
      positions among the clients given.
    server_step: the server's step on the clients present, with the keys above; its signature is
      the algorithm's (see its module), None where the server takes no step (FedAvg).
    aggregate: the end-of-round aggregation (FedAvg of client halves, of server copies), None if
      nothing is averaged.
    timeline: the round on the simulated clock.
    client_step: the client's whole step where it is not the protocol's legs (local-loss SL:
      `(client, x, y, key) -> (client, SmashedData)`, its own update before it sends); None else.
    client_half: `(client party) -> the protocol's client half` where the client holds more
      (local-loss SL: its auxiliary head), for inference; None: the party is the half.
    clients: a `ClientView` where the clients differ (heterogeneous parallel SL); None else.
  """

  client_keys: Callable[..., jax.Array]
  server_keys: Callable[..., jax.Array]
  order: Callable[..., jax.Array]
  server_step: Callable[..., Any] | None
  aggregate: Callable[..., Any] | None
  timeline: Timeline | None
  client_step: Callable[..., Any] | None = None
  client_half: Callable[..., Any] | None = None
  clients: ClientView | None = None


class ClientView(NamedTuple):
  """Where an algorithm's clients differ from one another (heterogeneous parallel SL: a cut per
  client), what each one runs and holds. `Schedule.clients` is None where every client runs the
  protocol the algorithm was built with, holds entry k of the stacked `SimState.clients`, and is
  served at inference by that protocol's `server_infer`.

  Attributes:
    protocol: `protocol(k)`: the protocol whose legs client k runs (its own cut).
    party: `party(state, k)`: client k's party in a `SimState`.
    server_infer: `server_infer(server, k, SmashedData) -> Prediction`: the server's inference leg
      for client k (the counterpart of `protocol(k).server_infer`); `k` static.
  """

  protocol: Callable[[int], Any]
  party: Callable[[Any, int], Any]
  server_infer: Callable[[Any, int, Any], Any]


class ClientAxes(NamedTuple):
  """Which parts of a `SimState` carry a leading client axis (K, ...): what `simulation.shard`
  places over the devices of the client mesh (the rest is replicated), and what
  `sljax.population` keeps per client.

  Attributes:
    clients: `SimState.clients` is stacked (K, ...) (not in sequential SL, which relays one half).
    server: `SimState.server` is stacked too (SplitFed v1: one server copy per client).
    server_codec: the server keeps one downlink codec state per client, stacked (K, ...) in
      `SimState.server.codec_state` (parallel SL, U-shaped parallel SL).
    averaged: the fields of the stacked parties (`PartyState` names, e.g. "params") that every
      round ends with the same value for every client, participant or not (FedAvg's average,
      sent to all): a population keeps one copy of them, not one per client.
  """

  clients: bool = True
  server: bool = False  # SplitFed v1: one server copy per client
  server_codec: bool = False
  averaged: tuple[str, ...] = ()


class Algorithm(NamedTuple):
  """A multi-client algorithm as pure functions.

  - `init(key, data) -> SimState`
  - `round(state, data, inputs=None) -> (state, metrics)`: one round, a pure function to jit.
    `inputs` (a `RoundInputs`) overrides the participation and drops sampled from the round key.
    `metrics` is a `RoundMetrics`: arrays, and the exact int64 bytes computed on the host.
    Every split-learning algorithm's round also takes `record=True` (static) and then returns
    `(state, metrics, RoundMessages)`: the messages it exchanged, for a transcript.
  - `predict(state, x, client=0) -> logits`: inference with client `client`'s half, an array
    (B, ...) of the model's outputs (`client` may be traced, except where the halves differ in shape).
  - `schedule`: its `Schedule` (keys, order, server step, aggregation, timeline), which `round`
    itself is built from.
  `client_axes` says which parts of `SimState` carry a leading client axis. `shared_model` says
  that every client ends a round with the same model (averaged or relayed halves: SplitFed,
  FedAvg, sequential SL, centralized), so `sljax.evaluate` tests one model; otherwise each client
  keeps its own half and is tested with it. `config` is the `ScheduleConfig` it was built with.
  """

  name: str
  init: Callable[..., SimState]
  round: Callable[..., tuple[SimState, dict]]
  predict: Callable[..., jax.Array]
  local_steps: int
  client_axes: ClientAxes = ClientAxes()
  schedule: Schedule | None = None
  shared_model: bool = False
  config: ScheduleConfig | None = None


def round_key(state: SimState) -> jax.Array:
  return round_key_of(state.key, state.round)


def round_key_of(run_key, round_) -> jax.Array:
  """The key of round `round_`: `fold_in(wrap_key_data(run_key), round_)`."""
  return jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(run_key)), round_)


def step_key(run_key, round_, step) -> jax.Array:
  """The key of step `step` of round `round_`, shared by everything that happens in that step."""
  return jax.random.fold_in(round_key_of(run_key, round_), step + 1)


def ids_or_all(ids, num_clients: int) -> jax.Array:
  """`ids` as int32, or the ids 0..K-1 of a whole stack when `ids` is None."""
  return jnp.arange(num_clients, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)


def per_client_keys(key, ids) -> jax.Array:
  """`fold_in(key, id)` for each client id: (len(ids),) keys. A client's key depends on its id
  only, not on which other clients are in the round (O(len(ids)), whatever the population)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def lockstep_client_keys(num_clients: int) -> Callable[..., jax.Array]:
  """`client_keys` of the algorithms whose clients all step at once: client k's key is
  `fold_in(fold_in(step_key, 0), k)`, k its id in the population (entry k of the K keys when
  `ids` is None)."""

  def client_keys(run_key, round_, step, ids=None):
    base = jax.random.fold_in(step_key(run_key, round_, step), 0)
    return per_client_keys(base, ids_or_all(ids, num_clients))

  return client_keys


def lockstep_server_keys(num_clients: int) -> Callable[..., jax.Array]:
  """`server_keys` of one server step on all clients: `fold_in(step_key, 1)` for everyone."""

  def server_keys(run_key, round_, step, ids=None):
    key = jax.random.fold_in(step_key(run_key, round_, step), 1)
    return jnp.broadcast_to(key, ids_or_all(ids, num_clients).shape)

  return server_keys


def index_order(num_clients: int) -> Callable[..., jax.Array]:
  """The order 0, 1, ..., K-1 in every round (the clients by increasing id)."""

  def order(run_key, round_, ids=None):
    del run_key, round_
    return jnp.arange(ids_or_all(ids, num_clients).shape[0], dtype=jnp.int32)

  return order


def random_order(num_clients: int, stream: int) -> Callable[..., jax.Array]:
  """A fresh random order of the clients every round: by increasing random priority, client k's
  priority drawn from `fold_in(fold_in(round_key, stream), k)` (ties by id). The order of any
  subset of the clients (ids sorted ascending) is the whole order restricted to them, so a round
  on the participants gathered from a population serves them as the whole stack would."""

  def order(run_key, round_, ids=None):
    ids = ids_or_all(ids, num_clients)
    base = jax.random.fold_in(round_key_of(run_key, round_), stream)
    priority = jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(per_client_keys(base, ids))
    return jnp.argsort(priority, stable=True).astype(jnp.int32)

  return order


def client_key(schedule: Schedule, run_key, round_, client, step) -> jax.Array:
  """Client `client`'s key in a step: entry `client` of `schedule.client_keys`."""
  return schedule.client_keys(run_key, round_, step)[client]


def server_key(schedule: Schedule, run_key, round_, client, step) -> jax.Array:
  """The key of the server's step serving `client`: entry `client` of `schedule.server_keys`."""
  return schedule.server_keys(run_key, round_, step)[client]


def fedavg_exchange(ready, legs, participating, nbytes: int) -> float:
  """On the clock: the end-of-round FedAvg barrier. Every participant uploads its weights when
  `ready`, the server averages once all have arrived, and sends the average back. Returns the
  wall time."""
  p = participating
  averaged = np.max((ready + legs.up(nbytes))[p])
  return float(np.max((averaged + legs.down(nbytes))[p]))


def num_participants(participation: float, num_clients: int) -> int:
  """How many clients take part in a round: `max(1, round(participation * K))`."""
  return max(1, int(round(participation * num_clients)))


def participants(key, num_clients: int, m: int) -> jax.Array:
  """`m` distinct client ids out of `num_clients`, drawn uniformly, sorted ascending: (m,) int32.

  Floyd's sampling without replacement: O(m^2) work whatever `num_clients`, so a round that
  draws 64 participants out of a million costs what it costs out of a hundred.
  """
  if not 1 <= m <= num_clients:
    raise ValueError(f"participants: expected 1 <= m <= num_clients={num_clients}, got m={m}")

  def draw(i, chosen):
    top = num_clients - m + i  # draw t in [0, top]; if already chosen, take top (new by construction)
    t = jax.random.randint(jax.random.fold_in(key, i), (), 0, top + 1, dtype=jnp.int32)
    return chosen.at[i].set(jnp.where(jnp.any(chosen == t), top, t))

  chosen = jax.lax.fori_loop(0, m, draw, jnp.full((m,), -1, jnp.int32))
  return jnp.sort(chosen)


def sample_drops(key, ids, *, local_steps: int, drop_rate: float) -> jax.Array:
  """(local_steps, len(ids)) bools: client k drops in step s, drawn from `fold_in(key, k)`, k its id."""
  return jax.vmap(lambda k: jax.random.bernoulli(k, drop_rate, (local_steps,)), out_axes=1)(
      per_client_keys(key, ids))


def sample_inputs(key, num_clients: int, *, local_steps: int, participation: float, drop_rate: float) -> RoundInputs:
  """Exactly `max(1, round(participation * K))` clients take part (`participants`); each may drop
  at each step (`sample_drops`). A pure function of `(key, K)`: the same draws that
  `sljax.population` makes for a round run on the participants alone."""
  k_part, k_drop = jax.random.split(key)
  chosen = participants(k_part, num_clients, num_participants(participation, num_clients))
  participating = jnp.zeros((num_clients,), bool).at[chosen].set(True)
  dropped = sample_drops(k_drop, jnp.arange(num_clients), local_steps=local_steps,
                         drop_rate=drop_rate) & participating[None, :]
  return RoundInputs(participating, dropped)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
  """How a multi-client algorithm runs its rounds; checked once, when built. Frozen and hashable.

  Attributes:
    num_clients: K, the clients on the data's leading axis.
    batch_size: each client's batch in a step.
    local_steps: steps per round.
    participation: the fraction of the clients that take part in a round: exactly
      `max(1, round(participation * K))` of them, drawn per round.
    drop_rate: the probability that a participant drops in a step, after its forward pass.
    executor: how the client axis runs (`sljax.execution`); sequential split learning runs one
      client at a time and does not use it.

  Example:
    >>> config = ScheduleConfig(num_clients=8, batch_size=32, local_steps=2, participation=0.5)
    >>> config.executor.name
    'vmap'
  """

  num_clients: int
  batch_size: int
  local_steps: int = 1
  participation: float = 1.0
  drop_rate: float = 0.0
  executor: Executor = vmap()

  def __post_init__(self):
    for name in ("num_clients", "batch_size", "local_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
      object.__setattr__(self, name, int(value))  # numpy ints hash and compare as Python ints
    check_fraction("participation", self.participation, allow_zero=False)
    check_fraction("drop_rate", self.drop_rate, allow_zero=True)
    if not isinstance(self.executor, Executor):
      raise TypeError(f"executor: expected a sljax.execution.Executor (e.g. sljax.execution.vmap()), got "
                      f"{type(self.executor).__name__}")


def check_protocol(sl, kind: type, algorithm: str, *, name: str = "sl") -> None:
  """Raises a TypeError unless `sl` (the argument `name`) is the protocol object `algorithm` takes
  (`Vanilla`, `Centralized`)."""
  if not isinstance(sl, kind):
    factory = {Vanilla: "sljax.vanilla", UShaped: "sljax.u_shaped", Centralized: "sljax.centralized"}.get(
        kind, kind.__name__)
    raise TypeError(f"{name}: {algorithm} expected a {kind.__name__} protocol (from {factory}(model, ...)), got "
                    f"{type(sl).__name__}")


def check_config(config) -> ScheduleConfig:
  """Raises a TypeError unless `config` is a `ScheduleConfig`; returns it."""
  if not isinstance(config, ScheduleConfig):
    raise TypeError(f"config: expected a sljax.algorithms.ScheduleConfig, got {type(config).__name__}")
  return config


def begin_round(state: SimState, data: ClientData, inputs: RoundInputs | None, *, spec: ArraySpec,
                config: ScheduleConfig) -> tuple[jax.Array, RoundInputs]:
  """Checks the data, derives the round key and, unless given, samples who takes part."""
  num_clients, local_steps = config.num_clients, config.local_steps
  check_data(data, spec, num_clients)
  key = round_key(state)
  if inputs is None and config.participation == 1.0 and config.drop_rate == 0.0:
    # what sampling would give, as constants: XLA then drops the masking work
    inputs = RoundInputs(jnp.ones((num_clients,), bool), jnp.zeros((local_steps, num_clients), bool))
  if inputs is None:
    inputs = sample_inputs(jax.random.fold_in(key, 0), num_clients, local_steps=local_steps,
                           participation=config.participation, drop_rate=config.drop_rate)
  return key, inputs


def check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
  interval = "[0, 1]" if allow_zero else "(0, 1]"
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}: expected a fraction in {interval}, got {value!r}")
  lo_ok = value >= 0 if allow_zero else value > 0
  if not (lo_ok and value <= 1):
    raise ValueError(f"{name}: expected a fraction in {interval}, got {value}")


def check_data(data: ClientData, spec: ArraySpec, num_clients: int | None = None) -> None:
  """Trace-time check of client data against the model's input spec."""
  if not isinstance(data, ClientData):
    raise TypeError(f"data: expected sljax.data.ClientData (from stack_clients), got {type(data).__name__}")
  if num_clients is not None and data.x.shape[0] != num_clients:
    raise ValueError(f"data: expected {num_clients} clients (the state's), got {data.x.shape[0]}")
  check_batch("data.x (per client)", data.x[0], spec)


def where(mask: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per-client select: `new` where `mask` (K,) is True, else `old` (stacked trees)."""

  def pick(n, o):
    return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)

  return jax.tree.map(pick, new, old)


def select(flag: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Scalar select between two trees of the same structure."""
  return jax.tree.map(lambda n, o: jnp.where(flag, n, o), new, old)


def weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
  """Average over the leading client axis with weights (K,) (FedAvg); zeros if every weight is 0.
  Entries of weight 0 are left out, even when they hold NaN or infinities."""
  w = weights / jnp.maximum(weights.sum(), 1e-12)

  def leaf(a):
    if not jnp.issubdtype(a.dtype, jnp.inexact):
      return a[0]
    present = (weights > 0).reshape(weights.shape + (1,) * (a.ndim - 1))
    return jnp.tensordot(w.astype(a.dtype), jnp.where(present, a, jnp.zeros((), a.dtype)), axes=1)

  return jax.tree.map(leaf, tree)


def averaged_or_kept(finished: jax.Array, average: PyTree, before: PyTree) -> PyTree:
  """FedAvg's `average`, or, when no client finished the round (`finished` False), `before`: the
  averages the round started from (stacked parties hold them in every entry at a round's start),
  as the network server keeps the last average rather than average nothing."""
  return select(finished, average, first(before))


def broadcast(tree: PyTree, num_clients: int) -> PyTree:
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), tree)


def stack_party(party: PartyState, num_clients: int) -> PartyState:
  """K tied copies of a party (same params and optimizer state)."""
  return broadcast(party, num_clients)


def batches(state: SimState, data: ClientData, step_in_round, *, local_steps: int, batch_size: int):
  """Every client's batch for one step of this round; depends only on (data, round, step)."""
  step = state.round * local_steps + step_in_round
  x, y, _ = client_batches(data, step, batch_size=batch_size, key=jax.random.wrap_key_data(state.key))
  return x, y


def first(tree: PyTree) -> PyTree:
  """Client 0's slice of a client-stacked tree."""
  return jax.tree.map(lambda a: a[0], tree)


def codec_keys(key, num_clients: int, ids=None) -> jax.Array:
  """Per-client keys for the server's downlink codec: `fold_in(fold_in(key, 2), k)`, k the client's id."""
  return per_client_keys(jax.random.fold_in(key, 2), ids_or_all(ids, num_clients))


def model_bytes(params_one: PyTree) -> int:
  """Exact wire bytes of one half's weights, sent for averaging (static)."""
  return msgs.wire_size(msgs.ModelWeights(params_one))


def per_client_losses(outputs_KxB: jax.Array, labels_KxB: jax.Array, loss: Loss) -> jax.Array:
  """`loss` of each client's own batch: (K,)."""
  return jax.vmap(loss)(outputs_KxB, labels_KxB)


def client_gradient(vanilla):
  """`(client, x, y, key, cut_grad) -> (grads, model_state, codec_state)`: the client's backward pass.

  In simulation the client's forward pass is recomputed here instead of carrying the pullback
  from `client_forward` through the executor: a pullback is a closure, which `lax.map` and the
  loop executor cannot stack. Inside one jitted round XLA sees both forward passes.
  """

  def backward(client, x, y, key, g):
    _, pending = vanilla.client_forward(client, x, y, key)
    g = codecs.cotangent(vanilla.uplink, pending.sent, g)  # through the uplink codec, as `client_backward`
    return pending.pullback(g)[0], pending.model_state, pending.codec_state

  return backward


@jax.tree_util.register_pytree_node_class
class Traffic:
  """The messages of a round (or of a step) in each direction: how many, and the bytes of each.

  `up` and `down` are tuples of `(size, count)`: `size` the exact wire bytes of one message (a
  Python int, `messages.wire_size` at trace time), `count` how many such messages each client
  sends or receives (an int32 array: (K,), or (S, K) out of a `lax.scan` over the steps). The
  sizes are the pytree's static structure and the counts its leaves, so a jitted round returns
  small counts and the bytes, count x size, are computed on the host as int64 (`RoundMetrics`):
  never inside the program, where int32 would wrap past 2**31 bytes.

  Example:
    >>> t = Traffic(up=[(1000, jnp.array([1, 0]))], down=[(10, jnp.array([1, 1]))])
    >>> (t + t).bytes("up", (2,)).tolist()
    [2000, 0]
  """

  def __init__(self, up=(), down=()):
    self.up = tuple((int(size), jnp.asarray(count, jnp.int32)) for size, count in up)
    self.down = tuple((int(size), jnp.asarray(count, jnp.int32)) for size, count in down)

  def __add__(self, other: Traffic) -> Traffic:
    return _traffic(self.up + other.up, self.down + other.down)

  def sum(self, axis: int = 0) -> Traffic:
    """The counts summed over `axis` (e.g. over the steps of a round)."""
    return jax.tree.map(lambda a: a.sum(axis, dtype=jnp.int32), self)

  def bytes(self, direction: str, shape: tuple[int, ...]) -> np.ndarray:
    """The exact bytes of `direction` ("up" or "down") per client, an int64 array of the counts'
    `shape`, on the host: the counts must be concrete (the round has returned)."""
    total = np.zeros(shape, np.int64)
    for size, count in getattr(self, direction):
      if isinstance(count, jax.core.Tracer):
        raise TypeError(f"bytes_{direction}: expected concrete message counts, got a traced one: the byte counts are "
                        "exact int64 on the host; read them from the metrics a round returns, outside jit")
      total = total + _host(count).astype(np.int64) * np.int64(size)
    return total

  def __repr__(self) -> str:
    return f"Traffic(up={list(self.up)}, down={list(self.down)})"

  def tree_flatten(self):
    counts = ([count for _, count in self.up], [count for _, count in self.down])
    return counts, (tuple(size for size, _ in self.up), tuple(size for size, _ in self.down))

  @classmethod
  def tree_unflatten(cls, sizes, counts):
    return _traffic(zip(sizes[0], counts[0]), zip(sizes[1], counts[1]))


def _traffic(up, down) -> Traffic:
  """A `Traffic` holding `up` and `down` as they are (pytree operations give leaves of any type)."""
  traffic = object.__new__(Traffic)
  traffic.up, traffic.down = tuple(up), tuple(down)
  return traffic


def _host(value) -> np.ndarray:
  """A host copy of an array, gathered from the other hosts when its client axis is sharded there."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(value)


# The byte metrics every round reports, computed on the host from its `Traffic`.
BYTE_METRICS = ("bytes_up_per_client", "bytes_down_per_client", "bytes_up", "bytes_down")


@jax.tree_util.register_pytree_node_class
class RoundMetrics(Mapping):
  """A round's metrics, the one convention of every algorithm; read it like a dict.

  `loss`, `accuracy` (means over the steps completed), `participating` (K,) and
  `completed_steps` (K,) are arrays out of the jitted round. `bytes_up_per_client` and
  `bytes_down_per_client` (K,) and their totals `bytes_up` and `bytes_down` are exact int64,
  computed on the host when read, from the round's `Traffic` (message counts, arrays, times
  static message sizes): exact however far a round passes 2**31 bytes. They are computed from
  concrete counts only: read them from what a (jitted) round returns, not inside a trace.

  As a pytree its leaves are the arrays and the message counts, so `jax.device_get`,
  `jax.tree.map` and a `lax.scan` over rounds carry it whole.
  """

  def __init__(self, arrays: Mapping[str, Any], traffic: Traffic):
    self._arrays = dict(arrays)
    self.traffic = traffic

  def __getitem__(self, name: str) -> Any:
    if name in self._arrays:
      return self._arrays[name]
    if name in BYTE_METRICS:
      direction = "up" if name.startswith("bytes_up") else "down"
      per_client = self.traffic.bytes(direction, np.shape(self._arrays["participating"]))
      return per_client if name.endswith("per_client") else per_client.sum(-1)
    raise KeyError(name)

  def __iter__(self) -> Iterator[str]:
    names = list(self._arrays)
    at = names.index("accuracy") + 1 if "accuracy" in names else len(names)
    return iter([*names[:at], *BYTE_METRICS, *names[at:]])

  def __len__(self) -> int:
    return len(self._arrays) + len(BYTE_METRICS)

  def __repr__(self) -> str:
    return f"RoundMetrics({self._arrays}, {self.traffic})"

  def tree_flatten(self):
    return (self._arrays, self.traffic), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


@struct.dataclass
class Sent:
  """Messages of one kind that a round sent, stacked, with who sent (or got) each one.

  Attributes:
    direction: "up" (client to server) or "down".
    messages: a message of `sljax.messages` whose arrays are stacked (S, K, ...) (one per step and
      client) when `step` is None, else (K, ...) (once in the round, at step `step`).
    mask: (S, K) or (K,) bools: which of them were sent (an absent client's entries are placeholders).
    step: None (every step), or the step a once-per-round message is recorded at, as the network
      server records it (a hand-over after the last step: `local_steps`).
    next_round: the message belongs to the next round (what the clients fetch before it: the average
      of the client halves), as the network server records it.
    clients: the positions (among the round's K clients) of the K entries, where they are only some
      of them (heterogeneous parallel SL: one stack per group of clients with the same cut); None: all.
  """

  direction: str = struct.field(pytree_node=False)
  messages: Any
  mask: jax.Array
  step: int | None = struct.field(pytree_node=False, default=None)
  next_round: bool = struct.field(pytree_node=False, default=False)
  clients: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)


class RoundMessages(NamedTuple):
  """The messages of a round, returned by `round(..., record=True)` (and only then: recording
  compiles another program, and the plain round carries nothing extra): one `Sent` per kind of
  message, in the order a client sends and gets them within a step, and `ids` (K,) the clients' ids.
  `sljax.simulation.run(..., transcript=)` writes them (`sljax.privacy.transcript.RoundRecording`)."""

  sent: tuple[Sent, ...]
  ids: jax.Array


def step_exchange(up: Any, down: Any, inputs: RoundInputs) -> tuple[Sent, Sent]:
  """The messages of steps in which each client sends one message and gets one back (smashed data
  up, cut gradient down), stacked (S, K, ...): sent up by each client that began the step, down
  to each that completed it."""
  return Sent("up", up, inputs.started()), Sent("down", down, inputs.active())


def half_message(party: PartyState) -> msgs.ClientHalf:
  """A client half as it travels (from the server at the start, or relayed): everything but the
  static input spec."""
  return msgs.ClientHalf(party.params, party.model_state, party.opt_state, party.codec_state)


def client_party(algorithm: Algorithm, state: SimState, client: int) -> PartyState:
  """Client `client`'s party (its position on the client axis) in a `SimState` of `algorithm`."""
  view = algorithm.schedule.clients if algorithm.schedule is not None else None
  if view is not None:
    return view.party(state, client)
  return jax.tree.map(lambda a: a[client], state.clients) if algorithm.client_axes.clients else state.clients


def round_metrics(losses_SxK, accs_SxK, active_SxK, traffic: Traffic, participating_K) -> RoundMetrics:
  """Per-round metrics from per-step, per-client values (S steps, K clients) and the round's
  `traffic` (counts per client, (K,): sum a per-step `Traffic` over the steps first)."""
  if not isinstance(traffic, Traffic):
    raise TypeError(f"traffic: expected a Traffic (message counts per client and static sizes), got "
                    f"{type(traffic).__name__}")
  w = active_SxK.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  return RoundMetrics({
      "loss": (losses_SxK * w).sum() / n,
      "accuracy": (accs_SxK * w).sum() / n,
      "participating": participating_K,
      "completed_steps": active_SxK.sum(0).astype(jnp.int32),
  }, traffic)


DEFAULT_LOSS = softmax_cross_entropy


def server_step_on_all(server_stage, server: PartyState, h_KxB, y_KxB, weights_K, key, *, loss: Loss,
                       optimizer: optax.GradientTransformation):
  """One server update on the smashed data of all clients at once.

  The server runs its half once on the concatenated (K*B) batch: one large matmul rather than K
  small ones. Its loss is the weighted mean of the clients' own mean losses, so with all weights
  1 it equals centralized training on the K*B batch. The gradient returned for client k is that
  of its own mean loss (what vanilla split learning would send it); clients of weight 0 get zeros,
  and when all weights are 0 the server does not move.

  Returns:
    (server, grads_KxB, losses_K, accuracies_K)
  """
  k, b = h_KxB.shape[:2]
  total = weights_K.sum()

  def objective(params, h_KxB):
    out, model_state = server_stage.apply(params, server.model_state, h_KxB.reshape(k * b, *h_KxB.shape[2:]),
                                          key=key, train=True)
    out_KxB = out.reshape(k, b, *out.shape[1:])
    losses_K = per_client_losses(out_KxB, y_KxB, loss)
    return (losses_K * weights_K).sum() / jnp.maximum(total, 1.0), (losses_K, out_KxB, model_state)

  (_, (losses_K, out_KxB, model_state)), (g_params, g_h) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True)(server.params, h_KxB)
  # d(weighted mean)/dh_k = w_k / total * d loss_k / dh_k: rescale to each client's own loss.
  scale_K = jnp.where(weights_K > 0, total / jnp.where(weights_K > 0, weights_K, 1.0), 0.0)
  g_h = g_h * scale_K.reshape(k, *(1,) * (g_h.ndim - 1)).astype(g_h.dtype)
  updated = apply_update(server, g_params, optimizer, model_state)
  server = select(total > 0, updated, server)
  accs_K = jnp.mean(jnp.argmax(out_KxB, -1) == y_KxB, axis=-1)
  return server, g_h, losses_K, accs_K
