"""Sequential (relay) split learning (Gupta & Raskar, "Distributed learning of deep neural network
over multiple agents", J. Network and Computer Applications, 2018).

Clients take turns against one server. Each trains on its own data, then hands its client half
to the next client: in the peer-to-peer mode of the paper directly, in the centralized mode via
the server. With K clients the run equals vanilla split learning on the sequence of the clients'
batches, which the tests check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sljax import protocol
from sljax.algorithms import _common as c
from sljax.data.clients import ClientData
from sljax.execution import Executor
from sljax.split import SplitModel


def sequential_sl(
    model: SplitModel,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    num_clients: int,
    batch_size: int,
    local_steps: int = 1,
    loss: c.Loss = c.DEFAULT_LOSS,
    executor: Executor | None = None,
    participation: float = 1.0,
    drop_rate: float = 0.0,
    uplink=None,
    downlink=None,
) -> c.Algorithm:
  """Sequential split learning: one client at a time, the client half relayed between clients.

  Who updates what, per round: clients 0, 1, ..., K-1 take turns (`lax.scan` over clients). In
  its turn, client k receives the client half AND its optimizer state from the previous client,
  runs `local_steps` vanilla split steps on its own batches with the one server (both halves and
  both optimizer states update at every step), and passes the client half on. The state holds one
  client half. A client that does not participate is skipped; a step from which a client drops
  is discarded on both sides. Traffic adds the client half's weights, handed on once per turn.

  `executor` is accepted for a uniform signature and ignored: the clients run one at a time.
  `uplink`/`downlink` are codecs on the smashed data and the cut gradient (see `vanilla`).
  """
  del executor
  c.check_schedule(participation=participation, drop_rate=drop_rate)
  vanilla = protocol.vanilla(model, client_optimizer=client_optimizer, server_optimizer=server_optimizer, loss=loss,
                             uplink=uplink, downlink=downlink)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    k_model, k_run = jax.random.split(key)
    st = vanilla.init(k_model, jnp.zeros((batch_size, *data.x.shape[2:]), data.x.dtype))
    return c.SimState(st.client, st.server, jnp.zeros((), jnp.int32), jax.random.key_data(k_run))

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    key, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, num_clients=num_clients,
                                local_steps=local_steps, participation=participation, drop_rate=drop_rate)
    # all batches of the round up front: (S, K, B, ...)
    xs, ys = jax.vmap(lambda s: c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size))(
        jnp.arange(local_steps))

    def turn(carry, k):
      def step(carry, s):
        split_state = protocol.SplitState(*carry, jnp.zeros((), jnp.int32))
        new, m = vanilla.step(split_state, (xs[s, k], ys[s, k]), jax.random.fold_in(jax.random.fold_in(key, k + 1), s))
        active = inputs.active()[s, k]
        client, server = c.select(active, (new.client, new.server), carry)
        return (client, server), (m["loss"], m["accuracy"], active, m["bytes_up"], m["bytes_down"])

      carry, out = jax.lax.scan(step, carry, jnp.arange(local_steps))
      return carry, out

    (client, server), (losses, accs, active, up, down) = jax.lax.scan(
        turn, (state.clients, state.server), jnp.arange(num_clients))
    # scan over clients gives (K, S): metrics want (S, K)
    losses, accs, active, up, down = losses.T, accs.T, active.T, up.T, down.T
    up = up * inputs.participating[None, :]
    down = down * active
    relay = c.model_bytes(state.clients.params) * inputs.participating
    metrics = c.round_metrics(losses, accs, active, up, down, inputs.participating, relay, relay)
    return state.replace(clients=client, server=server, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    del client  # one client half, shared by all
    return vanilla.predict(protocol.SplitState(state.clients, state.server, state.round), x)[0]

  return c.Algorithm("sequential_sl", init, round_fn, predict, local_steps, stacked=())
