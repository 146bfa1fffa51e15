"""Parallel split learning with a different cut layer per client, around one shared server body.

Clients differ in what they can compute: a sensor can run one layer, a phone three. Each client
k holds `layers[:cuts[k]]`; the server holds the shared body `layers[max(cuts):]` and, for every
shallower cut c, a bridge `layers[c:max(cuts)]` that carries that group's smashed data to the
body's input. Clients with the same cut form a group, vmapped together; everything else follows
parallel split learning (`sljax.algorithms.parallel_sl`): one server update per step from all
clients' smashed data, and each client gets the gradient of its own mean loss at its own cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms.parallel import TIMELINE, _no_hook
from sljax.data.clients import ClientData
from sljax.split import cut, sequential


def heterogeneous_parallel_sl(sl: protocol.Vanilla, config: c.ScheduleConfig, *, cuts: Sequence[int]) -> c.Algorithm:
  """Parallel split learning where client k cuts the model's layer stack at `cuts[k]`.

  Who updates what, per step: each participating client runs its own `layers[:cuts[k]]` and
  sends SmashedData of its cut's width. The server passes each group's smashed data through that
  group's bridge (shared by the group's clients; empty for the deepest cut), runs the shared body
  once on all of it, and makes ONE update of bridges, body and its optimizer state from the
  weighted mean of the clients' mean losses. Each client receives the gradient at its cut and
  updates its own half and optimizer state. Drops and participation as in `parallel_sl`.

  The model is `sl.model`, a layer stack cut anywhere (`sljax.cut(layers, k)`): the algorithm
  re-cuts `layers` at each client's cut. Optimizers, loss, codecs and `client_loss` come from `sl`;
  client k runs the legs of `sljax.vanilla(sljax.cut(layers, cuts[k]), ...)` with them
  (`Schedule.clients.protocol(k)`), over the network too: a client needs only its own protocol.

  All parts start from one initialisation of the whole stack, so client, bridge and body weights
  of the same layer start equal. `SimState.clients` is a tuple with one client-stacked party per
  group, in increasing order of cut (`Schedule.clients.party(state, k)` picks client k's);
  `SimState.server.params` is `{"bridges": (...), "body": ...}`. The data's clients are in the
  order of `cuts`.

  `sl.uplink`/`sl.downlink` are codecs on the smashed data and the cut gradients, as in
  `parallel_sl`: each client keeps its uplink codec state, the server one downlink codec state per
  client (`SimState.server.codec_state`, a tuple with one client-stacked state per group).

  Args:
    sl: `sljax.vanilla(sljax.cut(layers, k), ...)` for any k: the layer stack, optimizers, loss, codecs.
    config: a `ScheduleConfig`, whose `num_clients` is `len(cuts)`.
    cuts: client k's cut index into the layer stack, 1 <= cuts[k] < len(layers).

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`.

  Example:
    >>> import optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16, 16)), 1), client_optimizer=optax.adam(1e-3),
    ...                    server_optimizer=optax.adam(1e-3))
    >>> algo = heterogeneous_parallel_sl(sl, sljax.algorithms.ScheduleConfig(num_clients=3, batch_size=8),
    ...                                  cuts=[1, 2, 1])
  """
  if not isinstance(sl, protocol.Vanilla):
    raise TypeError(f"sl: expected the vanilla protocol sljax.vanilla(model, ...), got {type(sl).__name__}")
  if sl.model.is_u_shaped or not sl.model.client.layers or not sl.model.server.layers:
    raise ValueError("sl.model: heterogeneous parallel SL re-cuts the model's layer stack at each client's cut; "
                     "expected a two-part model cut from a stack, sljax.cut(layers, k)")
  _no_hook(sl, "cut_gradient_transform", "heterogeneous_parallel_sl")
  config = c.check_config(config)
  layers = sl.model.client.layers + sl.model.server.layers
  cuts = [int(k) for k in cuts]
  n = len(layers)
  for i, k in enumerate(cuts):
    if not 1 <= k <= n - 1:
      raise ValueError(f"cuts[{i}]: cut index must be in [1, {n - 1}] for a stack of {n} layers, got {k}")
  num_clients, batch_size, local_steps, executor = (config.num_clients, config.batch_size, config.local_steps,
                                                    config.executor)
  if len(cuts) != num_clients:
    raise ValueError(f"cuts: expected one cut per client (config.num_clients={num_clients}), got {len(cuts)} cuts")
  client_optimizer, server_optimizer, loss = sl.client_optimizer, sl.server_optimizer, sl.loss
  levels = sorted(set(cuts))
  deepest = levels[-1]
  groups = [np.flatnonzero(np.asarray(cuts) == k) for k in levels]
  group_of = [levels.index(k) for k in cuts]  # client -> its group
  index_in_group = [int(np.flatnonzero(groups[group_of[k]] == k)[0]) for k in range(num_clients)]
  order = np.concatenate(groups)  # client ids, group by group
  inverse = np.argsort(order)  # group order back to client order
  members = [np.isin(np.arange(num_clients), g) for g in groups]  # (K,) masks, in client order
  # one vanilla protocol per group: its client half, and as "server" the bridge then the body
  protocols = [protocol.vanilla(cut(layers, k), client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                                loss=loss, uplink=sl.uplink, downlink=sl.downlink, client_loss=sl.client_loss)
               for k in levels]
  up_codec, down_codec = sl.uplink, sl.downlink
  client_stages = [sequential(*layers[:k]) for k in levels]
  bridges = [sequential(*layers[k:deepest]) if k < deepest else None for k in levels]
  body = sequential(*layers[deepest:])

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    k_model, k_run = jax.random.split(key)
    whole = sequential(*layers)
    x0 = jnp.zeros((batch_size, *data.x.shape[2:]), data.x.dtype)
    params, model_state = jax.jit(whole.init)(k_model, x0)
    clients, down_states = [], []
    for k, g, stage in zip(levels, groups, client_stages):
      spec = protocol.ArraySpec.of(x0)
      smashed = jax.eval_shape(lambda k=k, stage=stage: stage.apply(params[:k], model_state[:k], x0, key=None,
                                                                     train=False)[0])
      party = protocol.PartyState(params[:k], model_state[:k], client_optimizer.init(params[:k]), spec,
                                  up_codec.init(smashed))
      clients.append(c.stack_party(party, len(g)))
      down_states.append(c.broadcast(down_codec.init(smashed), len(g)))
    server_params = {"bridges": tuple(params[k:deepest] for k in levels), "body": params[deepest:]}
    server_state = {"bridges": tuple(model_state[k:deepest] for k in levels), "body": model_state[deepest:]}
    deepest_client = client_stages[-1]
    body_in = jax.eval_shape(lambda: deepest_client.apply(params[:deepest], model_state[:deepest], x0, key=None,
                                                          train=False)[0])
    server = protocol.PartyState(server_params, server_state, server_optimizer.init(server_params),
                                 protocol.ArraySpec.of(body_in), tuple(down_states))
    return c.SimState(tuple(clients), server, jnp.zeros((), jnp.int32), jax.random.key_data(k_run))

  def server_apply(params, model_state, hs, key, train):
    """Bridges then body on every group's smashed data; returns per-group outputs."""
    ins, bridge_states = [], []
    for i, (bridge, h) in enumerate(zip(bridges, hs)):
      flat = h.reshape(-1, *h.shape[2:])
      if bridge is not None:
        flat, s = bridge.apply(params["bridges"][i], model_state["bridges"][i], flat,
                               key=jax.random.fold_in(key, i), train=train)
      else:
        s = model_state["bridges"][i]
      ins.append(flat)
      bridge_states.append(s)
    out, body_state = body.apply(params["body"], model_state["body"], jnp.concatenate(ins),
                                 key=jax.random.fold_in(key, len(hs)), train=train)
    sizes = np.cumsum([h.shape[0] * h.shape[1] for h in hs])[:-1]
    outs = [o.reshape(h.shape[0], h.shape[1], *o.shape[1:]) for o, h in zip(jnp.split(out, sizes), hs)]
    return outs, {"bridges": tuple(bridge_states), "body": body_state}

  client_keys, server_keys = c.lockstep_client_keys(num_clients), c.lockstep_server_keys(num_clients)

  def server_step(server, ups, weights, run_key, round_, step):
    """The server's side of one step: `(server, ups (one SmashedData per client, in client order),
    weights (K,), run_key, round_, step) -> (server, downlink payloads (one per client), losses (K,),
    accuracies (K,))`. One update of bridges and body from the weighted mean of the clients'
    losses; a client of weight 0 keeps its downlink codec state."""
    ups = [jax.tree.map(lambda *a: jnp.stack(a), *[ups[k] for k in g]) for g in groups]  # per group
    server, payloads, losses, accs = server_step_grouped(server, ups, weights[order], run_key, round_, step)
    per_client = tuple(jax.tree.map(lambda a, i=index_in_group[k]: a[i], payloads[group_of[k]])
                       for k in range(num_clients))
    return server, per_client, losses[inverse], accs[inverse]

  def server_step_grouped(server, ups, weights, run_key, round_, step):
    """`server_step` on the clients' messages stacked per group (what the fused round holds),
    weights, losses and accuracies in group order."""
    total = weights.sum()
    k_server = server_keys(run_key, round_, step)[0]

    def objective(params, hs):
      outs, model_state = server_apply(params, server.model_state, hs, k_server, True)
      losses = jnp.concatenate([c.per_client_losses(o, u.labels, loss) for o, u in zip(outs, ups)])
      accs = jnp.concatenate([jnp.mean(jnp.argmax(o, -1) == u.labels, axis=-1) for o, u in zip(outs, ups)])
      return (losses * weights).sum() / jnp.maximum(total, 1.0), (losses, accs, model_state)

    hs = [jax.vmap(up_codec.decode)(u.activations) for u in ups]
    (_, (losses, accs, model_state)), (g_params, g_hs) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(server.params, hs)
    new = c.select(total > 0, c.apply_update(server, g_params, server_optimizer, model_state), server)
    scale = jnp.where(weights > 0, total / jnp.where(weights > 0, weights, 1.0), 0.0)
    codec_keys = c.codec_keys(c.step_key(run_key, round_, step), num_clients)
    payloads, codec_states, start = [], [], 0
    for g, g_h, codec_state in zip(groups, g_hs, server.codec_state):
      sc, active = scale[start : start + len(g)], weights[start : start + len(g)] > 0
      g_h = g_h * sc.reshape(-1, *(1,) * (g_h.ndim - 1)).astype(g_h.dtype)
      payload, new_state = jax.vmap(down_codec.encode)(g_h, codec_state, codec_keys[g])
      payloads.append(payload)
      codec_states.append(c.where(active, new_state, codec_state))
      start += len(g)
    return new.replace(codec_state=tuple(codec_states)), payloads, losses, accs

  def server_infer(server, client: int, message: msgs.SmashedData) -> msgs.Prediction:
    """Inference, the server's leg for client `client`: its group's bridge, then the body, in eval
    mode on the decoded smashed data."""
    g = group_of[client]
    h = up_codec.decode(message.activations)
    params, model_state = server.params, server.model_state
    if bridges[g] is not None:
      h, _ = bridges[g].apply(params["bridges"][g], model_state["bridges"][g], h, key=None, train=False)
    return msgs.Prediction(body.apply(params["body"], model_state["body"], h, key=None, train=False)[0])

  def party(state: c.SimState, client: int) -> protocol.PartyState:
    return jax.tree.map(lambda a: a[index_in_group[client]], state.clients[group_of[client]])

  view = c.ClientView(lambda client: protocols[group_of[client]], party, server_infer)
  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, TIMELINE,
                        clients=view)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients[0].input_spec, config=config)
    active_all = inputs.active()

    def step(carry, s):
      clients, server = carry
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      keys = client_keys(state.key, state.round, s)
      ups = [executor(lambda *a, p=p: p.client_forward(*a)[0], party, x[g], y[g], keys[g])
             for p, party, g in zip(protocols, clients, groups)]
      w = active_all[s][order].astype(jnp.float32)
      server, payloads, losses, accs = server_step_grouped(server, ups, w, state.key, state.round, s)
      new_clients, up, down = [], [], []
      for p, party, g, member, payload, u in zip(protocols, clients, groups, members, payloads, ups):
        g_cut = jax.vmap(down_codec.decode)(payload)
        grads, model_states, client_codec = executor(c.client_gradient(p), party, x[g], y[g], keys[g], g_cut)
        updated = executor(lambda pt, gr, ms, cs: c.apply_update(pt, gr, client_optimizer, ms).replace(codec_state=cs),
                           party, grads, model_states, client_codec)
        new_clients.append(c.where(active_all[s][g], updated, party))
        # the group's messages have the group's sizes: counted for its members only
        up.append((msgs.wire_size(c.first(u)), inputs.participating & member))
        down.append((msgs.wire_size(msgs.CutGradient(c.first(payload))), active_all[s] & member))
      traffic = c.Traffic(up=up, down=down)
      sent = tuple((u, msgs.CutGradient(p)) for u, p in zip(ups, payloads)) if record else ()  # per group
      return (tuple(new_clients), server), (losses[inverse], accs[inverse], active_all[s], traffic, sent)

    (clients, server), (losses, accs, active, traffic, sent) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, traffic.sum(0), inputs.participating)
    state = state.replace(clients=clients, server=server, round=state.round + 1)
    if record:  # each group's messages have its own shapes: one stack per group and direction
      started = inputs.started()
      return state, metrics, c.RoundMessages(tuple(
          c.Sent(direction, messages, mask[:, g], clients=tuple(int(k) for k in g))
          for g, group_sent in zip(groups, sent)
          for direction, messages, mask in zip(("up", "down"), group_sent, (started, active))), data.client_ids())
    return state, metrics

  def predict(state: c.SimState, x, client: int = 0):
    up = protocols[group_of[client]].client_infer(party(state, client), x)  # the client's inference leg
    return server_infer(state.server, client, up).logits

  return c.Algorithm("heterogeneous_parallel_sl", init, round_fn, predict, local_steps, schedule=schedule,
                     shared_model=False, config=config)

