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
import numpy as np

from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms import aggregation as agg
from sljax.algorithms.parallel import _init_stacked
from sljax.data.clients import ClientData


def _splitfed_v1_timeline(costs, legs, p, steps, order):
  """SplitFed v1: each client alternates with its own server copy; the copies share the server,
  which serves requests first come, first served (ties: lower client index). FedAvg of the client
  halves at the end of the round (the server copies are averaged on the server, for free)."""
  del order
  server = costs.server_step_flops / legs.server_flops_per_s
  up, down = legs.up(costs.smashed_bytes), legs.down(costs.cut_gradient_bytes)
  arrive = np.where(p, legs.forward + up, np.inf)
  left = np.where(p, steps, 0)
  end = np.zeros_like(legs.forward)
  server_free = 0.0
  for _ in range(int(left.sum())):
    k = int(np.argmin(arrive))  # the earliest request waiting (np.argmin takes the first of ties)
    server_free = max(server_free, float(arrive[k])) + server
    end[k] = server_free + down[k] + legs.backward[k]
    left[k] -= 1
    arrive[k] = end[k] + legs.forward[k] + up[k] if left[k] else np.inf
  return c.fedavg_exchange(end, legs, p, costs.client_weights_bytes), p.sum() * steps * server


def _splitfed_v2_timeline(costs, legs, p, steps, order):
  """SplitFed v2: clients forward in parallel; at every step the one server takes their smashed
  data one client at a time in the round's order, each client waiting for its turn and its cut
  gradient. FedAvg of the client halves at the end of the round."""
  server = costs.server_step_flops / legs.server_flops_per_s
  up, down = legs.up(costs.smashed_bytes), legs.down(costs.cut_gradient_bytes)
  end = np.zeros_like(legs.forward)
  server_free = 0.0
  for _ in range(steps):
    arrive = end + legs.forward + up
    for k in order:
      if p[k]:
        server_free = max(server_free, float(arrive[k])) + server
        end[k] = server_free + down[k] + legs.backward[k]
  return c.fedavg_exchange(end, legs, p, costs.client_weights_bytes), p.sum() * steps * server


def _split_traffic(costs, s):
  """Bytes of one participant's round: its steps' messages, and its client half's weights up and
  back down for the average."""
  return s * costs.smashed_bytes + costs.client_weights_bytes, s * costs.cut_gradient_bytes + costs.client_weights_bytes


def _split_client_flops(costs, s):
  return s * (costs.client_forward_flops + costs.client_backward_flops)


TIMELINE_V1 = c.Timeline(_splitfed_v1_timeline, _split_traffic, _split_client_flops)
TIMELINE_V2 = c.Timeline(_splitfed_v2_timeline, _split_traffic, _split_client_flops)


def splitfed(sl: protocol.Vanilla, config: c.ScheduleConfig, *, version: int,
             aggregation: agg.Aggregator | None = None) -> c.Algorithm:
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
  Each client's legs and the server's step are `sl`'s (`sljax.vanilla(...)`): its model,
  optimizers, loss, codecs (on the smashed data and the cut gradient; each client keeps its own
  codec state) and defense hooks. The schedule comes from `config`. `aggregation` replaces
  FedAvg's weighted mean of the client halves (and of v1's server copies) with a robust
  aggregator from `sljax.algorithms.aggregation` (`median()`, `trimmed_mean(f)`,
  `centered_clipping(r)`), which bounds what one poisoning client can do to the shared model.

  Args:
    sl: the vanilla protocol, `sljax.vanilla(model, ...)`: model, optimizers, loss, codecs, hooks.
    config: a `ScheduleConfig`: clients, batch size, local steps, participation, drops, executor.
    version: 1 (a server copy per client, averaged each round) or 2 (one server, clients in turn).
    aggregation: the aggregator of the client halves (and v1's server copies); None is FedAvg's
      weighted mean.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`.

  Example:
    >>> import optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(), 1), client_optimizer=optax.adam(1e-3),
    ...                    server_optimizer=optax.adam(1e-3))
    >>> algo = splitfed(sl, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=32), version=2)
  """
  if version not in (1, 2):
    raise ValueError(f"version: expected 1 or 2, got {version}")
  aggregation = agg.mean() if aggregation is None else agg.check(aggregation)
  c.check_protocol(sl, protocol.Vanilla, f"splitfed_v{version}")
  config = c.check_config(config)
  num_clients, batch_size, local_steps, executor = (config.num_clients, config.batch_size, config.local_steps,
                                                    config.executor)

  lockstep_keys = c.lockstep_client_keys(num_clients)
  if version == 1:
    # each client runs `vanilla.step` with its own server copy: its key split in two, as `step` splits it
    def client_keys(run_key, round_, step, ids=None):
      return jax.vmap(lambda k: jax.random.split(k, 2)[0])(lockstep_keys(run_key, round_, step, ids))

    def server_keys(run_key, round_, step, ids=None):
      return jax.vmap(lambda k: jax.random.split(k, 2)[1])(lockstep_keys(run_key, round_, step, ids))

    order = c.index_order(num_clients)  # no order: each copy serves its own client
  else:
    client_keys = lockstep_keys

    def server_keys(run_key, round_, step, ids=None):
      return jax.vmap(lambda k: jax.random.fold_in(k, 1))(lockstep_keys(run_key, round_, step, ids))

    # the per-round order in which the one server half takes the clients
    order = c.random_order(num_clients, local_steps + 1)

  def server_step(server, message, key):
    """The server's step for one client: `(server half, SmashedData, key) -> (server half,
    CutGradient, loss, accuracy)`, with `key` the client's entry of `server_keys`. v1: `server` is
    that client's server copy; v2 the one server half, as the clients before this one in the
    round's order left it."""
    new, down, metrics = sl.server_step(server, message, key)
    return new, down, metrics["loss"], metrics["accuracy"]

  def aggregate(weights, server, w):
    """End of round: `(handed-in client weights {"params", "model_state"} stacked (K, ...), server,
    w (K,)) -> (average client weights, server)`: FedAvg (or `aggregation`) with weights `w` (sample
    counts of the clients that finished the round). v1 also averages the server copies' params and
    model state (optimizer states stay per copy); v2's one server half is left as it is."""
    average = aggregation(weights, w)
    if version == 1:
      params, model_state = c.broadcast(aggregation((server.params, server.model_state), w), num_clients)
      server = server.replace(params=params, model_state=model_state)
    return average, server

  timeline = TIMELINE_V1 if version == 1 else TIMELINE_V2
  schedule = c.Schedule(client_keys, server_keys, order, server_step, aggregate, timeline)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    state = _init_stacked(sl.init, key, data, num_clients, batch_size)
    if version == 1:
      state = state.replace(server=c.stack_party(state.server, num_clients))
    return state

  def step_v1(clients, servers, x, y, keys, server_keys_K):
    """Every client with its own server copy: forward, the copy's step, backward."""
    def one(client, server, x, y, k_client, k_server):
      up, pending = sl.client_forward(client, x, y, k_client)
      server, down, loss_k, acc_k = server_step(server, up, k_server)
      return sl.client_backward(client, pending, down), server, up, down, loss_k, acc_k

    return executor(one, clients, servers, x, y, keys, server_keys_K)

  def step_v2(clients, server, x, y, keys, server_keys_K, active, rank):
    """Every client forwards; the one server half takes them in the round's order; backward."""
    ups = executor(lambda *a: sl.client_forward(*a)[0], clients, x, y, keys)

    def serve(server, k):
      message = jax.tree.map(lambda a: a[k], ups)
      new, down, loss_k, acc_k = server_step(server, message, server_keys_K[k])
      return c.select(active[k], new, server), (down, loss_k, acc_k)

    server, (downs, losses, accs) = jax.lax.scan(serve, server, rank)
    downs, losses, accs = jax.tree.map(lambda a: a[jnp.argsort(rank)], (downs, losses, accs))

    def backward(client, x, y, k, down):
      _, pending = sl.client_forward(client, x, y, k)
      return sl.client_backward(client, pending, down)

    return executor(backward, clients, x, y, keys, downs), server, ups, downs, losses, accs

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)

    ids = data.client_ids()
    rank = order(state.key, state.round, ids)

    def step(carry, s):
      clients, server = carry
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      keys, server_keys_K = client_keys(state.key, state.round, s, ids), server_keys(state.key, state.round, s, ids)
      active = inputs.active()[s]
      if version == 1:
        new_clients, new_server, ups, downs, losses, accs = step_v1(clients, server, x, y, keys, server_keys_K)
        server = c.where(active, new_server, server)
      else:
        new_clients, server, ups, downs, losses, accs = step_v2(clients, server, x, y, keys, server_keys_K, active,
                                                                rank)
      clients = c.where(active, new_clients, clients)
      traffic = c.Traffic(up=[(msgs.wire_size(c.first(ups)), inputs.participating)],
                          down=[(msgs.wire_size(c.first(downs)), active)])
      return (clients, server), (losses, accs, active, traffic, (ups, downs) if record else ())

    (clients, server), (losses, accs, active, traffic, sent) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    weights = data.count.astype(jnp.float32) * inputs.completed()
    handed = {"params": clients.params, "model_state": clients.model_state}  # what each client hands in
    average, new_server = aggregate(handed, server, weights)
    finished = weights.sum() > 0
    average = c.averaged_or_kept(finished, average, {"params": state.clients.params,
                                                     "model_state": state.clients.model_state})
    if version == 1:  # the server copies too
      kept = c.broadcast(c.first((state.server.params, state.server.model_state)), num_clients)
      params, model_state = c.select(finished, (new_server.params, new_server.model_state), kept)
      new_server = new_server.replace(params=params, model_state=model_state)
    server = new_server
    average = c.broadcast(average, num_clients)
    clients = clients.replace(params=average["params"], model_state=average["model_state"])
    # the client halves up for the average from those that finished, and the average down to every participant
    weight_bytes = c.model_bytes(jax.tree.map(lambda a: a[0], clients.params))
    traffic = traffic.sum(0) + c.Traffic(up=[(weight_bytes, inputs.completed())],
                                         down=[(weight_bytes, inputs.participating)])
    metrics = c.round_metrics(losses, accs, active, traffic, inputs.participating)
    state = state.replace(clients=clients, server=server, round=state.round + 1)
    if record:  # each step's messages; the client halves handed in after the last step; the average fetched
      # before the next round (as the network server records them: a Handover put, then the next round's get)
      return state, metrics, c.RoundMessages((
          *c.step_exchange(*sent, inputs),
          c.Sent("up", msgs.ModelWeights(handed), inputs.completed(), step=local_steps),
          c.Sent("down", msgs.ModelWeights(average), inputs.participating, step=0, next_round=True)), ids)
    return state, metrics

  def predict(state: c.SimState, x, client: int = 0):
    one = jax.tree.map(lambda a: a[client], state.clients)
    server = jax.tree.map(lambda a: a[client], state.server) if version == 1 else state.server
    return sl.predict(protocol.SplitState(one, server, state.round), x)[0]

  # v1: a server copy per client; the halves (and v1's server copies) averaged and sent to all every round
  axes = c.ClientAxes(server=version == 1, averaged=("params", "model_state"))
  return c.Algorithm(f"splitfed_v{version}", init, round_fn, predict, local_steps, axes, schedule,
                     shared_model=True, config=config)
