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

from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms.parallel_u import ServerLegs, u_step_keys
from sljax.data.clients import ClientData


def turn_step_key(run_key, round_, client, step) -> jax.Array:
  """The key of step `step` of client `client`'s turn in round `round_`; the protocol's `step`
  splits it among the legs (vanilla: client, server; U-shaped: head, body, tail)."""
  return jax.random.fold_in(jax.random.fold_in(c.round_key_of(run_key, round_), client + 1), step)


def _sequential_timeline(costs, legs, p, steps, order):
  """Sequential SL: clients take turns in index order; the one server serves the one active client.

  A turn: download the relayed client half, `steps` vanilla steps (forward, smashed data up,
  server step, cut gradient down, backward), upload the client half. Everyone else waits.
  """
  del order
  server = costs.server_step_flops / legs.server_flops_per_s
  step = legs.forward + legs.up(costs.smashed_bytes) + server + legs.down(costs.cut_gradient_bytes) + legs.backward
  turn = legs.down(costs.client_weights_bytes) + steps * step + legs.up(costs.client_weights_bytes)
  return float(turn[p].sum()), p.sum() * steps * server


TIMELINE = c.Timeline(
    _sequential_timeline,
    lambda costs, s: (s * costs.smashed_bytes + costs.client_weights_bytes,
                      s * costs.cut_gradient_bytes + costs.client_weights_bytes),
    lambda costs, s: s * (costs.client_forward_flops + costs.client_backward_flops))


def _relay_init(sl, config: c.ScheduleConfig):
  """`init(key, data)` of a relay: one client half and the server half, as `sl.init` on a batch of
  `batch_size` zero rows, from the first half of `key`; the run key from the second."""

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), config.num_clients)
    k_model, k_run = jax.random.split(key)
    st = sl.init(k_model, jnp.zeros((config.batch_size, *data.x.shape[2:]), data.x.dtype))
    return c.SimState(st.client, st.server, jnp.zeros((), jnp.int32), jax.random.key_data(k_run))

  return init


def _relay_round(state: c.SimState, data: ClientData, inputs: c.RoundInputs, order, config: c.ScheduleConfig,
                 one_step, record: tuple[str, ...] = ()):
  """One round of turns: the clients in `order`, each `local_steps` steps of
  `one_step((client, server), x, y, s, k) -> ((client, server), (loss, accuracy, Traffic, sent))` on its
  own batches, a step kept only where client k is active in it. Metrics in client order; each
  participant also receives the client half and hands it on.

  `record`: the directions of the messages `sent` by a step (`one_step` returns () when it is
  empty); then the round also returns its `RoundMessages`: the client half each participant
  receives at the start of its turn, each step's messages, the half it hands back after its last
  step (if it completed the turn), as the network server records a turn."""
  steps = jnp.arange(config.local_steps)
  xs, ys = jax.vmap(lambda s: c.batches(state, data, s, local_steps=config.local_steps,
                                        batch_size=config.batch_size))(steps)  # (S, K, ...)

  def turn(carry, k):
    def step(carry, s):
      new, (loss, acc, traffic, sent) = one_step(carry, xs[s, k], ys[s, k], s, k)
      active = inputs.active()[s, k]
      return c.select(active, new, carry), (loss, acc, active, traffic, sent)

    end, outputs = jax.lax.scan(step, carry, steps)
    halves = (c.half_message(carry[0]), c.half_message(end[0])) if record else ()  # received, handed back
    return end, (outputs, halves)

  (client, server), (outputs, halves) = jax.lax.scan(turn, (state.clients, state.server), order)
  # a scan over clients gives (K, S, ...) in turn order: metrics and messages want (S, K, ...) in client order
  back = jnp.argsort(order)
  losses, accs, active, traffic, sent = jax.tree.map(lambda a: jnp.swapaxes(a[back], 0, 1), outputs)
  relay = c.model_bytes(state.clients.params)
  traffic = traffic.sum(0) + c.Traffic(up=[(relay, inputs.participating)], down=[(relay, inputs.participating)])
  metrics = c.round_metrics(losses, accs, active, traffic, inputs.participating)
  state = state.replace(clients=client, server=server, round=state.round + 1)
  if not record:
    return state, metrics
  received, handed = jax.tree.map(lambda a: a[back], halves)
  # a step's first message (smashed data up) is sent by a client that began the step, the rest where it completes
  masks = [inputs.started()] + [active] * (len(record) - 1)
  return state, metrics, c.RoundMessages((
      c.Sent("down", received, inputs.participating, step=0),
      *(c.Sent(d, m, mask) for d, m, mask in zip(record, sent, masks, strict=True)),
      c.Sent("up", handed, inputs.completed(), step=config.local_steps)), data.client_ids())


def sequential_sl(sl: protocol.Vanilla, config: c.ScheduleConfig) -> c.Algorithm:
  """Sequential split learning: one client at a time, the client half relayed between clients.

  Who updates what, per round: clients 0, 1, ..., K-1 take turns (`lax.scan` over clients). In
  its turn, client k receives the client half AND its optimizer state from the previous client,
  runs `local_steps` vanilla split steps on its own batches with the one server (both halves and
  both optimizer states update at every step), and passes the client half on. The state holds one
  client half. A client that does not participate is skipped; a step from which a client drops
  is discarded on both sides. Traffic adds the client half's weights, handed on once per turn.

  Each step is `sl`'s (`sljax.vanilla(...)`): its model, optimizers, loss, codecs and defense
  hooks. `config.executor` is ignored: the clients run one at a time.

  Args:
    sl: the vanilla protocol, `sljax.vanilla(model, ...)`: model, optimizers, loss, codecs, hooks.
    config: a `ScheduleConfig`: clients, batch size, local steps, participation, drops.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`; its state holds one client half.

  Example:
    >>> import optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(), 1), client_optimizer=optax.adam(1e-3),
    ...                    server_optimizer=optax.adam(1e-3))
    >>> algo = sequential_sl(sl, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=32))
  """
  c.check_protocol(sl, protocol.Vanilla, "sequential_sl")
  config = c.check_config(config)
  num_clients, local_steps = config.num_clients, config.local_steps

  def client_keys(run_key, round_, step, ids=None):
    return jax.vmap(lambda k: jax.random.split(turn_step_key(run_key, round_, k, step), 2)[0])(
        c.ids_or_all(ids, num_clients))

  def server_keys(run_key, round_, step, ids=None):
    return jax.vmap(lambda k: jax.random.split(turn_step_key(run_key, round_, k, step), 2)[1])(
        c.ids_or_all(ids, num_clients))

  def server_step(server, message, key):
    """The server's step in a client's turn: `(server, SmashedData, key) -> (server, CutGradient,
    loss, accuracy)`, with `key` the client's entry of `server_keys`."""
    new, down, metrics = sl.server_step(server, message, key)
    return new, down, metrics["loss"], metrics["accuracy"]

  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, TIMELINE)

  init = _relay_init(sl, config)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)

    ids = data.client_ids()

    def one_step(carry, x, y, s, k):
      client, server = carry
      one = ids[k][None]  # this turn's client: its keys only, not every client's
      up, pending = sl.client_forward(client, x, y, client_keys(state.key, state.round, s, one)[0])
      new_server, down, loss, acc = server_step(server, up, server_keys(state.key, state.round, s, one)[0])
      new_client = sl.client_backward(client, pending, down)
      traffic = c.Traffic(up=[(msgs.wire_size(up), inputs.participating[k])],
                          down=[(msgs.wire_size(down), inputs.active()[s, k])])
      return (new_client, new_server), (loss, acc, traffic, (up, down) if record else ())

    return _relay_round(state, data, inputs, schedule.order(state.key, state.round, ids), config, one_step,
                        ("up", "down") if record else ())

  def predict(state: c.SimState, x, client: int = 0):
    del client  # one client half, shared by all
    return sl.predict(protocol.SplitState(state.clients, state.server, state.round), x)[0]

  return c.Algorithm("sequential_sl", init, round_fn, predict, local_steps, c.ClientAxes(clients=False), schedule,
                     shared_model=True, config=config)


def sequential_sl_u(sl: protocol.UShaped, config: c.ScheduleConfig) -> c.Algorithm:
  """Sequential split learning with U-shaped legs: clients take turns, the labels and the loss stay
  on the client, the server holds the body only (Vepakomma et al. 2018's U-shaped configuration,
  relayed as in `sequential_sl`).

  Who updates what, per round: clients 0, 1, ..., K-1 take turns. In its turn, client k receives
  the client half (head, tail and their optimizer state) from the previous client and runs
  `local_steps` U-shaped steps (`sl.step`'s legs) on its own batches with the one server: head
  forward, the server's body forward, the tail and the loss on the client, the body's backward
  and update on the server, the head's backward; then it passes the client half on. A client that
  does not participate is skipped; a step from which a client drops is discarded on both sides.

  Keys: step s of client k's turn in round r takes `turn_step_key(run_key, r, k, s)`, split in
  three as `sl.step` splits its key (head, body, tail): `Schedule.client_keys` gives the whole
  turn step key, `Schedule.server_keys` the body's.

  Args:
    sl: the U-shaped protocol, `sljax.u_shaped(model, ...)`: model, optimizers, loss, codecs.
    config: a `ScheduleConfig`: clients, batch size, local steps, participation, drops.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`; its state holds one
    client half (head and tail).

  Example:
    >>> import optax, sljax
    >>> sl = sljax.u_shaped(sljax.cut(sljax.models.mlp(hidden=(32, 32)), 1, 2), client_optimizer=optax.adam(1e-3),
    ...                     server_optimizer=optax.adam(1e-3))
    >>> algo = sequential_sl_u(sl, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=32))
  """
  c.check_protocol(sl, protocol.UShaped, "sequential_sl_u")
  config = c.check_config(config)
  num_clients, local_steps = config.num_clients, config.local_steps

  def client_keys(run_key, round_, step, ids=None):
    return jax.vmap(lambda k: turn_step_key(run_key, round_, k, step))(c.ids_or_all(ids, num_clients))

  def server_keys(run_key, round_, step, ids=None):
    return jax.vmap(lambda key: u_step_keys(key)[1])(client_keys(run_key, round_, step, ids))

  # The server's two legs in a client's turn, with `key` the client's entry of `server_keys`:
  # forward(server, SmashedData, key) -> (BodyOutput, pending),
  # backward(server, pending, TailGradient) -> (server, CutGradient).
  server_step = ServerLegs(sl.server_forward, sl.server_backward)
  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, None)

  init = _relay_init(sl, config)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)

    ids = data.client_ids()

    def one_step(carry, x, y, s, k):
      client, server = carry
      k_head, k_body, k_tail = u_step_keys(client_keys(state.key, state.round, s, ids[k][None])[0])
      up, head = sl.client_forward(client, x, k_head)
      body, pending = server_step.forward(server, up, k_body)
      tail_grad, tail, metrics = sl.client_tail_step(client, head, body, y, k_tail)
      new_server, down = server_step.backward(server, pending, tail_grad)
      new_client = sl.client_backward(client, tail, down)
      active = inputs.active()[s, k]
      traffic = c.Traffic(up=[(msgs.wire_size(up), inputs.participating[k]), (msgs.wire_size(tail_grad), active)],
                          down=[(msgs.wire_size(body), active), (msgs.wire_size(down), active)])
      sent = (up, body, tail_grad, down) if record else ()
      return (new_client, new_server), (metrics["loss"], metrics["accuracy"], traffic, sent)

    return _relay_round(state, data, inputs, schedule.order(state.key, state.round, ids), config, one_step,
                        ("up", "down", "up", "down") if record else ())

  def predict(state: c.SimState, x, client: int = 0):
    del client  # one client half, shared by all
    return sl.predict(protocol.SplitState(state.clients, state.server, state.round), x)[0]

  return c.Algorithm("sequential_sl_u", init, round_fn, predict, local_steps, c.ClientAxes(clients=False), schedule,
                     shared_model=True, config=config)
