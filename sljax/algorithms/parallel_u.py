"""Parallel split learning with U-shaped legs: every client at once, the labels on every client.

U-shaped split learning (Vepakomma, Gupta, Swedish & Raskar, "Split learning for health:
Distributed deep learning without sharing raw patient data", arXiv:1812.00564, 2018) keeps the
labels and the loss on the client: the client holds the first layers (head) and the last (tail),
the server only the middle (body). Parallel split
learning (Jeon & Kim, "Privacy-Sensitive Parallel Split Learning", ICOIN 2020) runs all clients at
once against one server that makes one update per step. Here both at once, one step:

    every client   head(x)          --- SmashedData(activations) --->   body on all K*B rows
                                                                        (server_forward)
    every client   tail, own loss   <-- BodyOutput ---
                                    --- TailGradient --->               body backward, ONE update
                                                                        (server_backward)
    every client   head backward    <-- CutGradient ---
                   update head and tail

The client legs are `sljax.u_shaped`'s; the server's two legs, `server_forward` and
`server_backward` (`ServerLegs`, the algorithm's `Schedule.server_step`), are pure functions that
the fused round calls, and that the network server (`sljax.transport.coordinators.LockstepU`)
calls, one per barrier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sljax import codecs
from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms.parallel import _init_stacked
from sljax.data.clients import ClientData


def _parallel_u_timeline(costs, legs, p, steps, order):
  """U-shaped parallel SL: two barriers per step. Every client runs its head and sends its smashed
  data; once the last has arrived the server runs its body on all of it and sends each client its
  body output; each client runs its tail and sends the gradient at the body's output; once the
  last has arrived the server backpropagates through the body, makes its update and sends every
  client its cut gradient; each client's next step starts when its own backward is done.

  The body's forward on m batches costs `m * costs.server_forward_flops`, its backward and update
  the rest of `costs.server_flops(m)`; measure the costs on the three-part model (`step_costs`
  then times `u_shaped`'s legs and fills in the tail's fields)."""
  del order
  m = int(p.sum())
  step = costs.server_flops(m) / legs.server_flops_per_s
  forward = min(step, m * costs.server_forward_flops / legs.server_flops_per_s)
  end = np.zeros_like(legs.forward)
  server_free = 0.0
  for _ in range(steps):
    arrive = end + legs.forward + legs.up(costs.smashed_bytes)
    server_free = max(server_free, float(arrive[p].max())) + forward
    back = server_free + legs.down(costs.body_output_bytes) + legs.tail + legs.up(costs.tail_gradient_bytes)
    server_free = max(server_free, float(back[p].max())) + step - forward
    end = np.where(p, server_free + legs.down(costs.cut_gradient_bytes) + legs.backward, end)
  return max(server_free, float(end[p].max())), steps * step


TIMELINE = c.Timeline(
    _parallel_u_timeline,
    lambda costs, s: (s * (costs.smashed_bytes + costs.tail_gradient_bytes),
                      s * (costs.body_output_bytes + costs.cut_gradient_bytes)),
    lambda costs, s: s * (costs.client_forward_flops + costs.tail_step_flops + costs.client_backward_flops))


class ServerLegs(NamedTuple):
  """The server's step of U-shaped parallel SL in its two legs (`Schedule.server_step`).

  - `forward(server, ups, run_key, round_, step) -> (bodies, pending)`: `ups` the clients'
    `SmashedData` stacked (K, ...); `bodies` their `BodyOutput`s (K, ...); `pending` what the
    server keeps until the tail gradients come (the body's pullback: never sent).
  - `backward(server, pending, tail_grads, weights) -> (server, cut_grads)`: `tail_grads` the
    clients' `TailGradient`s (K, ...), `weights` (K,) (1: the client completes the step, 0: its
    step is discarded); `cut_grads` their `CutGradient`s (K, ...). One update of the body.
  """

  forward: Callable[..., tuple[msgs.BodyOutput, protocol.ServerPending]]
  backward: Callable[..., tuple[protocol.PartyState, msgs.CutGradient]]


def u_step_keys(key) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(head key, body key, tail key) of a U-shaped step key, split in three as `u_shaped(...).step`
  splits it."""
  k_head, k_body, k_tail = jax.random.split(key, 3)
  return k_head, k_body, k_tail


def u_shaped_parallel_sl(sl: protocol.UShaped, config: c.ScheduleConfig) -> c.Algorithm:
  """Parallel split learning with U-shaped legs: the server holds the body only; the labels, the
  loss and the tail stay on every client.

  The model, the optimizers, the loss and the codecs come from the protocol `sl`
  (`sljax.u_shaped(...)`); clients, batches, steps, participation, drops and the executor from
  `config`.

  Who updates what, per step (a round is `config.local_steps` steps):
    1. Every participating client k runs its head on its batch (`sl.client_forward`) and sends
       SmashedData(activations): no labels.
    2. The server runs its body once on all the smashed data (K*B rows) and sends each client
       its BodyOutput (`server_forward`).
    3. Each client runs its tail on its body output, computes its own loss and sends back the
       TailGradient, the gradient of its loss at the body's output (`sl.client_tail_step`).
    4. The server backpropagates all the tail gradients through the body at once and makes ONE
       update of its params and optimizer state, from the weighted mean of the clients' losses
       as parallel SL weights them: weight 1 per client that completes the step
       (`server_backward`). Each client gets the gradient of its own loss at its cut.
    5. Each client updates its head and its tail with its own optimizer state
       (`sl.client_backward`).
  A client that drops after its forward (`config.drop_rate`, or `RoundInputs.dropped`) has sent its
  smashed data and is gone: it gets no body output, sends no tail gradient, gets no cut
  gradient; its rows get weight 0 on the server and its step leaves no trace anywhere. A client
  that does not participate in the round (`config.participation`) does nothing.

  Codecs are `sl`'s: `sl.uplink` on the smashed data and the tail gradient, `sl.downlink` on the
  body output and the cut gradient, each message with its own codec state as in `u_shaped`: each
  client keeps its uplink states, the server one pair of downlink states per client.

  Keys: client k's step key is entry k of `c.lockstep_client_keys`; it splits it in three as
  `u_shaped(...).step` does (`u_step_keys`) and takes the head's and the tail's. `server_keys`
  gives client k's body key (the middle one): the one body pass on everyone's rows takes entry 0,
  client k's downlink codec its own entry, as `u_shaped`'s `server_forward` would. So one client
  is `sl.step` with key `client_keys(...)[0]`, exactly.

  Args:
    sl: the U-shaped protocol, `sljax.u_shaped(model, ...)`: model, optimizers, loss, codecs.
    config: a `ScheduleConfig`: clients, batch size, local steps, participation, drops, executor.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`.

  Example:
    >>> import optax, sljax
    >>> ds = sljax.data.load_digits(image=False)
    >>> data = sljax.data.stack_clients(ds.x_train, ds.y_train, sljax.data.iid(ds.y_train, num_clients=4, seed=0))
    >>> sl = sljax.u_shaped(sljax.cut(sljax.models.mlp(hidden=(32, 32)), 1, 2),
    ...                     client_optimizer=optax.adam(1e-3), server_optimizer=optax.adam(1e-3))
    >>> algo = u_shaped_parallel_sl(sl, ScheduleConfig(num_clients=4, batch_size=32))
    >>> state = algo.init(jax.random.key(0), data)
    >>> state, metrics = jax.jit(algo.round)(state, data)
  """
  if not isinstance(sl, protocol.UShaped):
    raise TypeError(f"sl: expected the U-shaped protocol sljax.u_shaped(model, ...), got {type(sl).__name__}")
  config = c.check_config(config)
  num_clients, batch_size, local_steps, executor = (config.num_clients, config.batch_size, config.local_steps,
                                                    config.executor)
  model, up_codec, down_codec = sl.model, sl.uplink, sl.downlink

  client_keys = c.lockstep_client_keys(num_clients)

  def server_keys(run_key, round_, step, ids=None):
    """Client k's body key; the body pass on all clients reads entry 0."""
    return jax.vmap(lambda key: u_step_keys(key)[1])(client_keys(run_key, round_, step, ids))

  def server_forward(server, ups, run_key, round_, step, ids=None):
    """The body on every client's smashed data at once (see `ServerLegs.forward`); `ids` the
    clients' ids (None: 0..K-1), which key their downlink codecs."""
    keys = server_keys(run_key, round_, step, ids)
    h_KxB = jax.vmap(up_codec.decode)(ups.activations)
    protocol.check_batch("ups.activations (per client)", h_KxB[0], server.input_spec)
    k, b = h_KxB.shape[:2]

    def body(params, h_KxB):
      out, model_state = model.server.apply(params, server.model_state, h_KxB.reshape(k * b, *h_KxB.shape[2:]),
                                            key=keys[0], train=True)
      return out.reshape(k, b, *out.shape[1:]), model_state

    out_KxB, pullback, model_state = jax.vjp(body, server.params, h_KxB, has_aux=True)
    codec_keys = jax.vmap(lambda key: jax.random.fold_in(key, protocol.CODEC_STREAM))(keys)
    payload, body_codec = jax.vmap(down_codec.encode)(out_KxB, server.codec_state["body"], codec_keys)
    pending = protocol.ServerPending(pullback, model_state, {**server.codec_state, "body": body_codec},
                                     jax.vmap(lambda key: jax.random.fold_in(key, 1))(codec_keys), payload)
    return msgs.BodyOutput(payload), pending

  def server_backward(server, pending, tail_grads, weights):
    """The tail gradients through the body at once, one update (see `ServerLegs.backward`)."""
    g_KxB = jax.vmap(lambda sent, g: codecs.cotangent(down_codec, sent, up_codec.decode(g)))(pending.sent,
                                                                                              tail_grads.grad)
    k = g_KxB.shape[0]
    total = weights.sum()
    mean = jnp.maximum(total, 1.0)  # the weighted mean of the clients' losses, as `c.server_step_on_all`
    g_params, g_h = pending.pullback(g_KxB * (weights / mean).reshape(k, *(1,) * (g_KxB.ndim - 1)).astype(g_KxB.dtype))
    # d(weighted mean)/dh_k = w_k / mean * d loss_k / dh_k: rescale to each client's own loss.
    scale_K = jnp.where(weights > 0, mean / jnp.where(weights > 0, weights, 1.0), 0.0)
    g_h = g_h * scale_K.reshape(k, *(1,) * (g_h.ndim - 1)).astype(g_h.dtype)
    payload, cut_codec = jax.vmap(down_codec.encode)(g_h, pending.codec_state["cut_grad"], pending.codec_key)
    updated = c.apply_update(server, g_params, sl.server_optimizer, pending.model_state)
    codec_state = c.where(weights > 0, {**pending.codec_state, "cut_grad": cut_codec}, server.codec_state)
    return c.select(total > 0, updated, server).replace(codec_state=codec_state), msgs.CutGradient(payload)

  server_step = ServerLegs(server_forward, server_backward)
  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, TIMELINE)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    state = _init_stacked(sl.init, key, data, num_clients, batch_size)
    return state.replace(server=state.server.replace(codec_state=c.broadcast(state.server.codec_state, num_clients)))

  # The client's legs, one client at a time (the executor maps them over the client axis). Each
  # recomputes the legs before it rather than carrying their pullbacks through the executor (a
  # pullback is a closure, which `lax.map` and the loop executor cannot stack); inside one jitted
  # round XLA sees both.
  def client_head(client, x, key):
    return sl.client_forward(client, x, u_step_keys(key)[0])[0]

  def client_tail(client, x, y, key, body):
    k_head, _, k_tail = u_step_keys(key)
    _, head = sl.client_forward(client, x, k_head)
    return sl.client_tail_step(client, head, body, y, k_tail)

  def client_tail_grad(client, x, y, key, body):
    tail_grad, _, metrics = client_tail(client, x, y, key, body)
    return tail_grad, metrics["loss"], metrics["accuracy"]

  def client_backward(client, x, y, key, body, cut_grad, active):
    _, tail, _ = client_tail(client, x, y, key, body)
    return c.select(active, sl.client_backward(client, tail, cut_grad), client)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)

    started = inputs.started()  # who sends smashed data in step s: the participants not gone in an earlier step
    ids = data.client_ids()

    def step(carry, s):
      clients, server = carry
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      keys = client_keys(state.key, state.round, s, ids)
      active = inputs.active()[s]
      ups = executor(client_head, clients, x, keys)
      bodies, pending = server_forward(server, ups, state.key, state.round, s, ids)
      tail_grads, losses, accs = executor(client_tail_grad, clients, x, y, keys, bodies)
      server, cut_grads = server_backward(server, pending, tail_grads, active.astype(jnp.float32))
      clients = executor(client_backward, clients, x, y, keys, bodies, cut_grads, active)
      size = lambda messages: msgs.wire_size(c.first(messages))  # noqa: E731
      traffic = c.Traffic(up=[(size(ups), started[s]), (size(tail_grads), active)],
                          down=[(size(bodies), active), (size(cut_grads), active)])
      sent = (ups, bodies, tail_grads, cut_grads) if record else ()  # the step's messages, (K, ...) each
      return (clients, server), (losses, accs, active, traffic, sent)

    (clients, server), (losses, accs, active, traffic, sent) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, traffic.sum(0), inputs.participating)
    state = state.replace(clients=clients, server=server, round=state.round + 1)
    if record:  # in a client's order: smashed data up, body output down, tail gradient up, cut gradient down
      ups, bodies, tail_grads, cut_grads = sent
      return state, metrics, c.RoundMessages((c.Sent("up", ups, started), c.Sent("down", bodies, active),
                                              c.Sent("up", tail_grads, active), c.Sent("down", cut_grads, active)), ids)
    return state, metrics

  def predict(state: c.SimState, x, client: int = 0):
    one = jax.tree.map(lambda a: a[client], state.clients)
    return sl.predict(protocol.SplitState(one, state.server, state.round), x)[0]  # fresh codec states

  return c.Algorithm("parallel_sl_u", init, round_fn, predict, local_steps, c.ClientAxes(server_codec=True), schedule,
                     shared_model=False, config=config)
