"""SplitFed v1 and v2 (Thapa, Chamikara, Camtepe & Sun, "SplitFed: When Federated Learning Meets
Split Learning", AAAI 2022).

SplitFed runs the clients in parallel like federated learning and averages their client halves
with FedAvg at the end of each round. v1 gives each client its own copy of the server half and
averages those copies too; v2 keeps one server half that takes the clients' smashed data one
client at a time.

On v2's order: the paper describes clients computing in parallel while the server processes their
smashed data sequentially, in a random order, with one server model. The public reference code
instead lets each client run its whole local epoch against the server before the next client
starts (from the same round-start client model). We follow the paper: at every step all clients
run their forward pass, the server takes them one at a time in an order drawn per round, and the
clients finish their backward passes; the client halves are averaged at the end of the round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms.parallel import _init_stacked
from sljax.data.clients import ClientData
from sljax.execution import Executor, vmap
from sljax.split import SplitModel


def _average_clients(parties, weights, num_clients):
  """FedAvg of params and model state (e.g. batch statistics); optimizer states stay local."""
  avg = c.weighted_mean((parties.params, parties.model_state), weights)
  params, model_state = c.broadcast(avg, num_clients)
  return parties.replace(params=params, model_state=model_state)


def splitfed(
    model: SplitModel,
    *,
    version: int,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    num_clients: int,
    batch_size: int,
    local_steps: int = 1,
    loss: c.Loss = c.DEFAULT_LOSS,
    executor: Executor = vmap(),
    participation: float = 1.0,
    drop_rate: float = 0.0,
    uplink=None,
    downlink=None,
) -> c.Algorithm:
  """SplitFed v1 (`version=1`) or v2 (`version=2`).

  Who updates what:
    v1, per step: every participating client k runs a full vanilla split step with ITS OWN copy
      of the server half (client params/optimizer state and server-copy params/optimizer state k
      all update). At the end of the round the client halves and the server copies are each
      averaged over the participating clients (FedAvg, weighted by the clients' sample counts)
      and the averages are sent to every client and every server copy. Optimizer states stay
      per copy.
    v2, per step: every participating client runs its forward pass; the ONE server half takes
      their smashed data one client at a time, in an order drawn per round, making one update
      per client (params and optimizer state); each client then receives its cut gradient and
      updates its half. At the end of the round the client halves are averaged as in v1.
  A client that drops after its forward has that step discarded: it keeps its state, and (v2)
  the server skips its update; (v1) its server copy keeps its state. It is then gone for the
  round and, like a non-participant, left out of the average; every client receives the averages.
  Traffic per round adds the client half's weights, up and down, for each participant.
  `uplink`/`downlink` are codecs on the smashed data and the cut gradient (see `vanilla`); each
  client keeps its own codec state.
  """
  if version not in (1, 2):
    raise ValueError(f"version: expected 1 or 2, got {version}")
  c.check_schedule(participation=participation, drop_rate=drop_rate)
  vanilla = protocol.vanilla(model, client_optimizer=client_optimizer, server_optimizer=server_optimizer, loss=loss,
                             uplink=uplink, downlink=downlink)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    state = _init_stacked(vanilla.init, key, data, num_clients, batch_size)
    if version == 1:
      state = state.replace(server=c.stack_party(state.server, num_clients))
    return state

  def step_v1(clients, servers, x, y, keys, active):
    def one(client, server, x, y, k):
      new, metrics = vanilla.step(protocol.SplitState(client, server, jnp.zeros((), jnp.int32)), (x, y), k)
      return new.client, new.server, metrics

    new_clients, new_servers, m = executor(one, clients, servers, x, y, keys)
    bytes_per_client = (m["bytes_up"], m["bytes_down"])
    return (c.where(active, new_clients, clients), c.where(active, new_servers, servers), m["loss"], m["accuracy"],
            bytes_per_client)

  def step_v2(clients, server, x, y, keys, active, order):
    ups = executor(lambda *a: vanilla.client_forward(*a)[0], clients, x, y, keys)

    def serve(server, k):
      message = jax.tree.map(lambda a: a[k], ups)
      new, down, m = vanilla.server_step(server, message, jax.random.fold_in(keys[k], 1))
      return c.select(active[k], new, server), (down.grad, m["loss"], m["accuracy"])

    server, (g_in_order, l_in_order, a_in_order) = jax.lax.scan(serve, server, order)
    inverse = jnp.argsort(order)
    g, losses, accs = jax.tree.map(lambda a: a[inverse], g_in_order), l_in_order[inverse], a_in_order[inverse]
    bytes_per_client = (msgs.wire_size(c.first(ups)), msgs.wire_size(msgs.CutGradient(c.first(g))))
    def backward(client, x, y, k, g):
      _, pending = vanilla.client_forward(client, x, y, k)
      return vanilla.client_backward(client, pending, msgs.CutGradient(g))

    updated = executor(backward, clients, x, y, keys, g)
    return c.where(active, updated, clients), server, losses, accs, bytes_per_client

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    key, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, num_clients=num_clients,
                                local_steps=local_steps, participation=participation, drop_rate=drop_rate)
    order = jax.random.permutation(jax.random.fold_in(key, local_steps + 1), num_clients)

    def step(carry, s):
      clients, server = carry
      x, y, _, keys = c.step_inputs(state, data, key, s, num_clients=num_clients, local_steps=local_steps,
                                    batch_size=batch_size)
      active = inputs.active()[s]
      if version == 1:
        clients, server, losses, accs, (up, down) = step_v1(clients, server, x, y, keys, active)
      else:
        clients, server, losses, accs, (up, down) = step_v2(clients, server, x, y, keys, active, order)
      up, down = up * inputs.participating, down * active
      return (clients, server), (losses, accs, active, up, down)

    (clients, server), (losses, accs, active, up, down) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    weights = data.count.astype(jnp.float32) * inputs.completed()
    clients = _average_clients(clients, weights, num_clients)
    one_client = jax.tree.map(lambda a: a[0], clients.params)
    weight_bytes = c.model_bytes(one_client)
    if version == 1:
      server = _average_clients(server, weights, num_clients)
    metrics = c.round_metrics(losses, accs, active, up, down, inputs.participating,
                              weight_bytes * inputs.completed(), weight_bytes * inputs.participating)
    return state.replace(clients=clients, server=server, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    one = jax.tree.map(lambda a: a[client], state.clients)
    server = jax.tree.map(lambda a: a[client], state.server) if version == 1 else state.server
    return vanilla.predict(protocol.SplitState(one, server, state.round), x)[0]

  stacked = ("clients", "server") if version == 1 else ("clients",)
  return c.Algorithm(f"splitfed_v{version}", init, round_fn, predict, local_steps, stacked)
