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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sljax import codecs
from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms.parallel import TIMELINE
from sljax.data.clients import ClientData
from sljax.split import cut, sequential


def heterogeneous_parallel_sl(
    layers: Sequence[Any],
    config: c.ScheduleConfig,
    *,
    cuts: Sequence[int],
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    loss: c.Loss = c.DEFAULT_LOSS,
    uplink: codecs.Codec | None = None,
    downlink: codecs.Codec | None = None,
) -> c.Algorithm:
  """Parallel split learning where client k cuts the stack at `cuts[k]`.

  Who updates what, per step: each participating client runs its own `layers[:cuts[k]]` and
  sends SmashedData of its cut's width. The server passes each group's smashed data through that
  group's bridge (shared by the group's clients; empty for the deepest cut), runs the shared body
  once on all of it, and makes ONE update of bridges, body and its optimizer state from the
  weighted mean of the clients' mean losses. Each client receives the gradient at its cut and
  updates its own half and optimizer state. Drops and participation as in `parallel_sl`.

  All parts start from one initialisation of the whole stack, so client, bridge and body weights
  of the same layer start equal. `SimState.clients` is a tuple with one client-stacked party per
  group, in increasing order of cut; `SimState.server.params` is `{"bridges": (...), "body": ...}`.
  The data's clients are in the order of `cuts`.

  `uplink`/`downlink` are codecs on the smashed data and the cut gradients, as in `parallel_sl`:
  each client keeps its uplink codec state, the server one downlink codec state per client
  (`SimState.server.codec_state`, a tuple with one client-stacked state per group).

  There is no one protocol object here (one cut per group), so the optimizers, the loss and the
  codecs are arguments; the schedule comes from `config`, whose `num_clients` is `len(cuts)`.

  Example:
    >>> import optax, sljax
    >>> algo = heterogeneous_parallel_sl(sljax.models.mlp(hidden=(16, 16)),
    ...                                  sljax.algorithms.ScheduleConfig(num_clients=3, batch_size=8),
    ...                                  cuts=[1, 2, 1], client_optimizer=optax.adam(1e-3),
    ...                                  server_optimizer=optax.adam(1e-3))
  """
  config = c.check_config(config)
  cuts = [int(k) for k in cuts]
  n = len(layers)
  for i, k in enumerate(cuts):
    if not 1 <= k <= n - 1:
      raise ValueError(f"cuts[{i}]: cut index must be in [1, {n - 1}] for a stack of {n} layers, got {k}")
  num_clients, batch_size, local_steps, executor = (config.num_clients, config.batch_size, config.local_steps,
                                                    config.executor)
  if len(cuts) != num_clients:
    raise ValueError(f"cuts: expected one cut per client (config.num_clients={num_clients}), got {len(cuts)} cuts")
  levels = sorted(set(cuts))
  deepest = levels[-1]
  groups = [np.flatnonzero(np.asarray(cuts) == k) for k in levels]
  order = np.concatenate(groups)  # client ids, group by group
  members = [np.isin(np.arange(num_clients), g) for g in groups]  # (K,) masks, in client order
  # one vanilla protocol per group: its client half, and as "server" the bridge then the body
  protocols = [protocol.vanilla(cut(layers, k), client_optimizer=client_optimizer,
                                server_optimizer=server_optimizer, loss=loss, uplink=uplink, downlink=downlink)
               for k in levels]
  up_codec, down_codec = uplink or codecs.identity(), downlink or codecs.identity()
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
    """The server's side of one step: `(server, ups (one SmashedData per group), weights (K,) in
    group order, run_key, round_, step) -> (server, downlink payloads per group, losses (K,),
    accuracies (K,))`, losses and accuracies in group order. One update of bridges and body from
    the weighted mean of the clients' losses; a client of weight 0 keeps its downlink codec state."""
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

  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, TIMELINE)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients[0].input_spec, config=config)
    active_all = inputs.active()
    inverse = np.argsort(order)  # group order back to client order

    def step(carry, s):
      clients, server = carry
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      keys = client_keys(state.key, state.round, s)
      ups = [executor(lambda *a, p=p: p.client_forward(*a)[0], party, x[g], y[g], keys[g])
             for p, party, g in zip(protocols, clients, groups)]
      w = active_all[s][order].astype(jnp.float32)
      server, payloads, losses, accs = server_step(server, ups, w, state.key, state.round, s)
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
      return (tuple(new_clients), server), (losses[inverse], accs[inverse], active_all[s], traffic)

    (clients, server), (losses, accs, active, traffic) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, traffic.sum(0), inputs.participating)
    return state.replace(clients=clients, server=server, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    gi = levels.index(cuts[client])
    party = jax.tree.map(lambda a: a[int(np.flatnonzero(groups[gi] == client)[0])], state.clients[gi])
    h = up_codec.decode(protocols[gi].client_infer(party, x).activations)  # the group's inference leg
    params, model_state = state.server.params, state.server.model_state
    if bridges[gi] is not None:
      h, _ = bridges[gi].apply(params["bridges"][gi], model_state["bridges"][gi], h, key=None, train=False)
    return body.apply(params["body"], model_state["body"], h, key=None, train=False)[0]

  return c.Algorithm("heterogeneous_parallel_sl", init, round_fn, predict, local_steps, schedule=schedule,
                     shared_model=False)

