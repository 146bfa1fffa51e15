"""What server and clients must agree on to reproduce the simulation (`sljax.algorithms`) exactly.

The run's schedule (clients, rounds, steps per turn, batch size) and the simulated algorithm it
runs (`algorithm`), whose own `Schedule` gives the step keys, the serving order, the server's step
and the aggregation: nothing here derives them again. Also each client's data order, the client
half as it travels, the shapes of the U-shaped step's messages and what the server answers to
`Predict`, each tested against the simulation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sljax import messages as msgs
from sljax.algorithms import REGISTRY, Algorithm, ScheduleConfig
from sljax.algorithms import _common as algorithms_common
from sljax.data.clients import ClientData, client_batches
from sljax.protocol import ArraySpec, PartyState, SplitState, UShaped, Vanilla
from sljax.split import SplitModel


class Schedule(NamedTuple):
  """A run's schedule: `rounds` rounds of `local_steps` steps per client on batches of `batch_size`.

  In sequential split learning clients 0, 1, ..., `num_clients - 1` take turns in each round, a
  turn being `local_steps` steps; vanilla split learning with one client is `num_clients=1`. In
  parallel SL and SplitFed v1 all clients run the round's `local_steps` steps at once.
  """

  num_clients: int
  rounds: int
  local_steps: int
  batch_size: int

  def check(self) -> "Schedule":
    for name, value in self._asdict().items():
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"schedule.{name}: expected a positive int, got {value!r}")
    return self


def algorithm(name: str, sl: Vanilla, schedule: Schedule, input_spec: ArraySpec, **options) -> Algorithm:
  """The simulation's algorithm `name` (from `sljax.algorithms.REGISTRY`) for the protocol `sl`,
  this run's schedule and inputs like `input_spec`: server and clients follow its `Schedule`
  (keys, order, server step, aggregation), so a run over the network is the simulation's run.
  `options` are the algorithm's own; those left out take the registry entry's `defaults`
  (local-loss SL: `aux_head`, a linear head onto as many outputs as the model has)."""
  if name not in REGISTRY:
    raise ValueError(f"algorithm: expected one of {sorted(REGISTRY)}, got {name!r}")
  entry = REGISTRY[name]
  config = ScheduleConfig(num_clients=schedule.num_clients, batch_size=schedule.batch_size,
                          local_steps=schedule.local_steps)
  defaults = {} if entry.defaults is None else entry.defaults(sl, input_spec)
  return entry.factory(sl, config, **entry.options, **{**defaults, **options})


def stand_in_data(schedule: Schedule, input_spec: ArraySpec) -> ClientData:
  """Zeros shaped like the clients' data (one batch each): what an algorithm's `init` needs to
  build the state a server starts from (it reads shapes, not values)."""
  k, b = schedule.num_clients, schedule.batch_size
  return ClientData(jnp.zeros((k, b, *input_spec.shape), input_spec.dtype), jnp.zeros((k, b), jnp.int32),
                    jnp.full((k,), b, jnp.int32))


def leg_keys(algo: Algorithm) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """`(client_key, server_key)`, each `(run_key, round_, client, step) -> key` and jitted: the keys
  of a client's legs and of the server's step serving it, read from the algorithm's schedule."""
  return (jax.jit(functools.partial(algorithms_common.client_key, algo.schedule)),
          jax.jit(functools.partial(algorithms_common.server_key, algo.schedule)))


def u_shaped_messages(sl: UShaped, state: SplitState, x, labels) -> tuple[msgs.SmashedData, msgs.BodyOutput,
                                                                         msgs.TailGradient, msgs.CutGradient]:
  """Shapes and dtypes of the four messages of a U-shaped step on a batch like `x`, `labels`
  (`jax.ShapeDtypeStruct`s): the templates each side checks what it receives against."""

  def one_step(state, x, labels, key):
    up, head = sl.client_forward(state.client, x, key)
    body, pending = sl.server_forward(state.server, up, key)
    tail_grad, _, _ = sl.client_tail_step(state.client, head, body, labels, key)
    return up, body, tail_grad, sl.server_backward(state.server, pending, tail_grad)[1]

  return jax.eval_shape(one_step, state, x, labels, jax.random.key(0))


def inference_answer(model: SplitModel, sl: Vanilla | UShaped) -> Callable[[PartyState, Any], Any]:
  """`answer(server half, uplink payload) -> message`: the server's side of `Predict`, the
  protocol's own inference leg (`sl.server_infer`): vanilla, a `Prediction`; U-shaped, a
  `BodyOutput` through the downlink codec from a fresh state, as `UShaped.predict`."""
  del model

  def answer(party: PartyState, payload) -> Any:
    return sl.server_infer(party, msgs.SmashedData(payload))

  return answer


def row_order(*, client: int, count: int, batch_size: int, run_key) -> Callable[[int], jax.Array]:
  """`rows(data_step) -> (batch_size,) int32`: the rows of client `client`'s own data (of `count`
  rows) in the batch number `data_step`, exactly as `sljax.data.client_batches` orders them.

  The data order of client k depends only on (run key, k, its row count), so the client does
  not need the other clients' data. `client_batches` is called on a one-client stand-in
  `ClientData` whose features are row numbers, numbered as client k (`first_client=k`), so the
  order is the simulation's by construction.
  """
  rows = np.arange(count, dtype=np.int32)[None, :]
  stand_in = ClientData(jnp.asarray(rows), jnp.zeros((1, count), jnp.int32), jnp.full((1,), count, jnp.int32))
  key = jnp.asarray(run_key)
  return functools.partial(_rows_of, stand_in, key, jnp.int32(client), batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _rows_of(stand_in: ClientData, run_key: jax.Array, client, data_step, *, batch_size: int) -> jax.Array:
  x, _, _ = client_batches(stand_in, data_step, batch_size=batch_size, key=jax.random.wrap_key_data(run_key),
                           first_client=client)
  return x[0]


def data_step(schedule: Schedule, round_: int, step: int) -> int:
  """The batch number a step reads: `round * local_steps + step`, as `sequential_sl` numbers them."""
  return round_ * schedule.local_steps + step


def to_message(party: PartyState) -> msgs.ClientHalf:
  """The client half as it travels: everything but the static input spec (as a simulation records it)."""
  return algorithms_common.half_message(party)


def from_message(message: msgs.ClientHalf, input_spec: ArraySpec) -> PartyState:
  return PartyState(message.params, message.model_state, message.opt_state, input_spec, message.codec_state)
