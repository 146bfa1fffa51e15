"""Parallel split learning (Jeon & Kim, "Privacy-Sensitive Parallel Split Learning", ICOIN 2020)
and local-loss split learning (Han, Bhatti, Lee & Moon, "Accelerating Federated Learning with Split
Learning on Locally Generated Losses", ICML workshop 2021).

Both run all clients at once against one server that makes one update per step from everyone's
smashed data. They differ in what comes back: parallel SL returns each client its cut gradient;
local-loss SL returns nothing, because each client trains its half against a small auxiliary
head of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.data.clients import ClientData, client_batches
from sljax.split import Stage


def _parallel_timeline(costs, legs, p, steps, order):
  """Parallel SL: a barrier per step. Every client forwards and sends; the server waits for the
  last arrival, runs one step on all the smashed data, sends every client its cut gradient; each
  client's next step starts when its own backward is done."""
  del order
  server = costs.server_flops(int(p.sum())) / legs.server_flops_per_s
  end = np.zeros_like(legs.forward)
  server_free = 0.0
  for _ in range(steps):
    arrive = end + legs.forward + legs.up(costs.smashed_bytes)
    server_free = max(server_free, float(arrive[p].max())) + server
    end = np.where(p, server_free + legs.down(costs.cut_gradient_bytes) + legs.backward, end)
  return max(server_free, float(end[p].max())), steps * server


TIMELINE = c.Timeline(
    _parallel_timeline,
    lambda costs, s: (s * costs.smashed_bytes, s * costs.cut_gradient_bytes),
    lambda costs, s: s * (costs.client_forward_flops + costs.client_backward_flops))


def _local_loss_timeline(costs, legs, p, steps, order):
  """Local-loss SL: clients never wait. Each runs its local step, sends its smashed data and goes
  on; the server makes one step per step index, once everyone's smashed data of that step has
  arrived. The round ends when the server has made its last step."""
  del order
  server = costs.server_flops(int(p.sum())) / legs.server_flops_per_s
  transmit = 8.0 * costs.smashed_bytes / legs.up_rate
  server_free = 0.0
  for s in range(steps):
    arrive = (s + 1) * (legs.local_loss + transmit) + legs.latency
    server_free = max(server_free, float(arrive[p].max())) + server
  return max(server_free, float((steps * (legs.local_loss + transmit))[p].max())), steps * server


LOCAL_LOSS_TIMELINE = c.Timeline(
    _local_loss_timeline,
    lambda costs, s: (s * costs.smashed_bytes, 0),
    lambda costs, s: s * costs.local_loss_step_flops)


def _no_hook(sl: protocol.Vanilla, hook: str, algorithm: str) -> None:
  """Raises a ValueError when `sl` has the defense hook `hook`, which `algorithm` would not apply."""
  if getattr(sl, hook) is not None:
    raise ValueError(f"sl.{hook}: {algorithm} does not apply it (its steps are its own), expected None, got "
                     f"{getattr(sl, hook)!r}")


def _traffic(up_size: int, down_size: int, participating_K, active_K) -> c.Traffic:
  """A step's messages: smashed data up from every participant, a cut gradient down to every
  client whose step completes."""
  return c.Traffic(up=[(up_size, participating_K)], down=[(down_size, active_K)])


def _init_stacked(vanilla_init, key, data: ClientData, num_clients: int, batch_size: int) -> c.SimState:
  k_model, k_run = jax.random.split(key)
  st = vanilla_init(k_model, jnp.zeros((batch_size, *data.x.shape[2:]), data.x.dtype))
  return c.SimState(c.stack_party(st.client, num_clients), st.server, jnp.zeros((), jnp.int32),
                    jax.random.key_data(k_run))


def parallel_sl(
    sl: protocol.Vanilla,
    config: c.ScheduleConfig,
    *,
    sync_clients: bool = False,
    server_chunk: int | None = None,
    server_step: Callable[..., tuple] | None = None,
) -> c.Algorithm:
  """Parallel split learning: every client at once, one server, one server update per step.

  The model, the optimizers, the loss, the codecs and the client's `client_loss` come from the
  protocol `sl` (`sljax.vanilla(...)`); clients, batches, steps, participation, drops and the
  executor from `config`. The server's step here is its own (one update on all clients), so `sl`
  must not have a `cut_gradient_transform`.

  Who updates what, per step (a round is `local_steps` steps):
    1. Every participating client k runs its own half on its batch (under `jax.vjp`) and sends
       SmashedData(activations, labels).
    2. The server runs its half once on all the smashed data (K*B rows), takes the weighted mean
       of the clients' mean losses (weight 1 per client that completes the step) and makes ONE
       update of its params and optimizer state.
    3. Each client receives the gradient of its own mean loss at its cut and updates its own
       half and its own optimizer state. With `sync_clients=True` the client gradients are
       first averaged over the clients that completed the step, so client halves that start
       tied stay tied (the synchronised client layers of Jeon & Kim); the run then equals
       centralized training with batch K*B.
  A client that drops after its forward (`config.drop_rate`, or `RoundInputs.dropped`) has its
  step discarded: its smashed data gets weight 0 on the server and its state is left as it was.
  A client that does not participate in the round (`config.participation`) does nothing.
  `sl.uplink`/`sl.downlink` are codecs on the smashed data and the cut gradients; each client
  keeps its uplink codec state, and the server one downlink codec state per client.

  Memory: by default a step holds every client's activations, the server's activations for all
  K*B rows and their gradients at once. `server_chunk=C` (C divides K) runs each step C clients
  at a time instead: their batches, forward passes, the server's forward and backward on their
  rows, their cut gradients, backward passes and updates, written in place into the client
  state; the server's gradient is summed over the chunks and applied once after the last, so it
  is the same step. Peak memory then holds the state (donate it: `jax.jit(round,
  donate_argnums=0)`, as `sljax.simulation.run` does) plus one chunk's temporaries. The result
  equals the unchunked step's (up to float summation order) for server halves without batch
  statistics or dropout; with batch statistics they are a chunk's, with dropout the server draws
  its masks per chunk (`fold_in(key, chunk)`). `config.executor` is not used then: each chunk
  is vmapped. Not with `sync_clients`.

  Args:
    sl: the protocol (`sljax.vanilla(...)`), without a `cut_gradient_transform`.
    config: the schedule: clients, batch size, local steps, participation, drops, executor.
    sync_clients: average the client gradients over the clients that completed each step.
    server_chunk: run each step this many clients at a time (it divides `config.num_clients`);
      None runs all at once.
    server_step: a server's step in place of parallel SL's own, with its signature (see
      `schedule.server_step`): the honest clients' round around another server, e.g. a malicious
      one (`sljax.privacy.hijacking.hijacking_server`). The server state is then what that step
      takes (the algorithm's `init` still makes parallel SL's). Not with `server_chunk`.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) whose state holds one client half per client.

  Example:
    >>> import optax, sljax
    >>> ds = sljax.data.load_digits(image=False)
    >>> data = sljax.data.stack_clients(ds.x_train, ds.y_train, sljax.data.iid(ds.y_train, num_clients=4, seed=0))
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(), 1), client_optimizer=optax.adam(1e-3),
    ...                    server_optimizer=optax.adam(1e-3))
    >>> algo = parallel_sl(sl, ScheduleConfig(num_clients=4, batch_size=32))
    >>> state = algo.init(jax.random.key(0), data)
    >>> state, metrics = jax.jit(algo.round)(state, data)
  """
  c.check_protocol(sl, protocol.Vanilla, "parallel_sl")
  config = c.check_config(config)
  _no_hook(sl, "cut_gradient_transform", "parallel_sl")
  num_clients, batch_size, local_steps = config.num_clients, config.batch_size, config.local_steps
  model, loss, executor = sl.model, sl.loss, config.executor
  if server_chunk is not None:
    if isinstance(server_chunk, bool) or not isinstance(server_chunk, int) or server_chunk < 1 or (
        num_clients % server_chunk):
      raise ValueError(f"server_chunk: expected a positive int that divides num_clients={num_clients}, "
                       f"got {server_chunk!r}")
    if sync_clients:
      raise ValueError("server_chunk: not available with sync_clients=True (the client gradients are averaged "
                       "over all clients before any update)")
  if server_step is not None and server_chunk is not None:
    raise ValueError("server_step: not available with server_chunk (the chunked step is parallel SL's own server)")
  up_codec, down_codec = sl.uplink, sl.downlink

  client_keys, server_keys = c.lockstep_client_keys(num_clients), c.lockstep_server_keys(num_clients)

  def downlink_keys(run_key, round_, step, ids=None):
    """The server's downlink codec key for each client's cut gradient."""
    return c.codec_keys(c.step_key(run_key, round_, step), num_clients, ids)

  def own_server_step(server, ups, weights, run_key, round_, step, ids=None):
    """The server's side of one step: `(server, ups (K, ...), weights (K,), run_key, round_, step,
    ids=None) -> (server, downlink payloads (K, ...), losses (K,), accuracies (K,))`.

    One update from the weighted mean of the clients' losses (weight 0: a client absent or whose
    step is discarded; its downlink codec state stays as it was). `ids`: the clients' ids (None:
    0..K-1), which key their downlink codecs.
    """
    h = jax.vmap(up_codec.decode)(ups.activations)
    new, g_h, losses, accs = c.server_step_on_all(
        model.server, server, h, ups.labels, weights, server_keys(run_key, round_, step)[0], loss=loss,
        optimizer=sl.server_optimizer)
    payload, codec_state = jax.vmap(down_codec.encode)(g_h, server.codec_state,
                                                       downlink_keys(run_key, round_, step, ids))
    new = new.replace(codec_state=c.where(weights > 0, codec_state, server.codec_state))
    return new, payload, losses, accs

  server_step = own_server_step if server_step is None else server_step  # the round's and the schedule's
  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, TIMELINE)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    state = _init_stacked(sl.init, key, data, num_clients, batch_size)
    server = state.server.replace(codec_state=c.broadcast(state.server.codec_state, num_clients))
    return state.replace(server=server)

  def update(party, grads, model_state, codec_state):
    return c.apply_update(party, grads, sl.client_optimizer, model_state).replace(codec_state=codec_state)

  def backward_and_update(party, x, y, key, g_cut, active):
    grads, model_state, codec_state = c.client_gradient(sl)(party, x, y, key, g_cut)
    return c.select(active, update(party, grads, model_state, codec_state), party)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)
    ids = data.client_ids()
    if record and server_chunk is not None:
      raise ValueError("record: a round whose server steps in chunks (server_chunk) does not return its messages")

    def step(carry, s):
      clients, server = carry
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      keys = client_keys(state.key, state.round, s, ids)
      active = inputs.active()[s]
      ups = executor(lambda *a: sl.client_forward(*a)[0], clients, x, y, keys)
      server, payload, losses, accs = server_step(server, ups, active.astype(jnp.float32), state.key, state.round, s,
                                                  ids)
      g_cut = jax.vmap(down_codec.decode)(payload)
      if sync_clients:
        grads, model_states, codec_states = executor(c.client_gradient(sl), clients, x, y, keys, g_cut)
        grads = c.broadcast(c.weighted_mean(grads, active.astype(jnp.float32)), num_clients)
        updated = executor(update, clients, grads, model_states, codec_states)
        clients = c.where(active, updated, clients)
      else:
        # one pass per client: backward, update, keep or discard (no K-wide gradient temporaries)
        clients = executor(backward_and_update, clients, x, y, keys, g_cut, active)
      traffic = _traffic(msgs.wire_size(c.first(ups)), msgs.wire_size(msgs.CutGradient(c.first(payload))),
                         inputs.participating, active)
      sent = (ups, msgs.CutGradient(payload)) if record else ()  # the step's messages, (K, ...) each
      return (clients, server), (losses, accs, active, traffic, sent)

    if server_chunk is not None:
      step = _chunked_step(state, data, inputs)
    (clients, server), (losses, accs, active, traffic, sent) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, traffic.sum(0), inputs.participating)
    state = state.replace(clients=clients, server=server, round=state.round + 1)
    if record:
      return state, metrics, c.RoundMessages(c.step_exchange(*sent, inputs), ids)
    return state, metrics

  def _chunked_step(state: c.SimState, data: ClientData, inputs: c.RoundInputs):
    """One step, `server_chunk` clients at a time (see the docstring); the schedule's keys."""
    size, num_chunks = server_chunk, num_clients // server_chunk
    data_key = jax.random.wrap_key_data(state.key)

    ids = data.client_ids()

    def step(carry, s):
      clients, server = carry
      keys_K = client_keys(state.key, state.round, s, ids)
      codec_keys_K = downlink_keys(state.key, state.round, s, ids)
      active_K = inputs.active()[s]
      weights_K = active_K.astype(jnp.float32)
      total = weights_K.sum()
      k_server = server_keys(state.key, state.round, s)[0]
      data_step = state.round * local_steps + s

      def chunk(carry, j):
        clients, server_codec, model_state, g_sum = carry
        start = j * size
        take = lambda tree: jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), tree)  # noqa: E731
        part, codec_part = take(clients), take(server_codec)
        keys, active, weights = take(keys_K), take(active_K), take(weights_K)
        x, y, _ = client_batches(take(data.replace(ids=ids)), data_step, batch_size=batch_size, key=data_key)
        ups = jax.vmap(lambda *a: sl.client_forward(*a)[0])(part, x, y, keys)
        h = jax.vmap(up_codec.decode)(ups.activations)

        def objective(params, h):
          flat = h.reshape(size * batch_size, *h.shape[2:])
          out, new_state = model.server.apply(params, model_state, flat, key=jax.random.fold_in(k_server, j),
                                              train=True)
          out = out.reshape(size, batch_size, *out.shape[1:])
          losses = c.per_client_losses(out, y, loss)
          return (losses * weights).sum() / jnp.maximum(total, 1.0), (losses, out, new_state)

        (_, (losses, out, new_state)), (g_params, g_h) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(server.params, h)
        # d(weighted mean)/dh_k = w_k / total * d loss_k / dh_k: rescale to each client's own loss.
        scale = jnp.where(weights > 0, total / jnp.where(weights > 0, weights, 1.0), 0.0)
        g_h = g_h * scale.reshape(size, *(1,) * (g_h.ndim - 1)).astype(g_h.dtype)
        payload, codec_state = jax.vmap(down_codec.encode)(g_h, codec_part, take(codec_keys_K))
        g_cut = jax.vmap(down_codec.decode)(payload)
        # The chunk's new state is computed whole before it is written back: a conditional is never
        # fused, so no fusion both reads the old state and writes the new one, and the writes happen
        # in place (without it XLA:CPU copied two K-wide optimizer arrays per chunk). Always true.
        updated = jax.lax.cond(j < num_chunks, lambda p: jax.vmap(backward_and_update)(p, x, y, keys, g_cut, active),
                               lambda p: p, part)
        put = lambda tree, new: jax.tree.map(  # noqa: E731
            lambda a, n: jax.lax.dynamic_update_slice_in_dim(a, n, start, 0), tree, new)
        clients = put(clients, updated)
        server_codec = put(server_codec, c.where(active, codec_state, codec_part))
        g_sum = jax.tree.map(jnp.add, g_sum, g_params)
        accs = jnp.mean(jnp.argmax(out, -1) == y, axis=-1)
        sizes.update(up=msgs.wire_size(c.first(ups)), down=msgs.wire_size(msgs.CutGradient(c.first(payload))))
        return (clients, server_codec, new_state, g_sum), (losses, accs)

      zeros = jax.tree.map(jnp.zeros_like, server.params)
      sizes = {}  # the messages' wire bytes, static: filled in when `chunk` is traced
      (clients, server_codec, model_state, g_sum), (losses, accs) = jax.lax.scan(
          chunk, (clients, server.codec_state, server.model_state, zeros), jnp.arange(num_chunks))
      updated = c.apply_update(server, g_sum, sl.server_optimizer, model_state)
      server = c.select(total > 0, updated, server).replace(codec_state=server_codec)
      traffic = _traffic(sizes["up"], sizes["down"], inputs.participating, active_K)
      return (clients, server), (losses.reshape(num_clients), accs.reshape(num_clients), active_K, traffic, ())

    return step

  def predict(state: c.SimState, x, client: int = 0):
    one = jax.tree.map(lambda a: a[client], state.clients)
    return sl.predict(protocol.SplitState(one, state.server, state.round), x)[0]

  return c.Algorithm("parallel_sl", init, round_fn, predict, local_steps, c.ClientAxes(server_codec=True), schedule,
                     shared_model=False, config=config)


def linear_head(num_classes: int) -> Stage:
  """The default auxiliary head of local-loss split learning: flatten, then one dense layer.

  Args:
    num_classes: the head's outputs (the dense layer's width), as many as the model's.

  Returns:
    A `Stage` mapping smashed data (B, ...) to logits (B, num_classes).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> head = linear_head(10)
    >>> params, state = head.init(jax.random.key(0), jnp.ones((2, 4, 4)))
    >>> logits, state = head.apply(params, state, jnp.ones((2, 4, 4)), key=None, train=False)
    >>> logits.shape
    (2, 10)
  """
  from flax import linen as nn

  from sljax.split import flatten, function_stage, linen_stage, sequential

  return sequential(function_stage(flatten), linen_stage(nn.Dense(num_classes)))


def local_loss_defaults(sl: protocol.Vanilla, input_spec: protocol.ArraySpec) -> dict:
  """Local-loss SL's default options for inputs like `input_spec`: `aux_head`, a linear head onto
  as many outputs as the model has (`linear_head`)."""
  x = jax.ShapeDtypeStruct((1, *input_spec.shape), input_spec.dtype)
  outputs = jax.eval_shape(lambda x: sl.predict(sl.init(jax.random.key(0), x), x)[0], x)
  return {"aux_head": linear_head(outputs.shape[-1])}


def local_loss_client_step(sl: protocol.Vanilla, aux_head: Stage):
  """A local-loss client's whole step: `(client, x, y, key) -> (client, SmashedData)`.

  The client half (`sl.model.client`) and the auxiliary head learn from the head's loss
  (`sl.loss`) with `sl.client_optimizer`; the smashed data goes up detached (and encoded with
  `sl.uplink`), labels with it.

  Args:
    sl: the protocol (`sljax.vanilla(...)`): its model's client half, loss, client optimizer and
      uplink codec.
    aux_head: the client's auxiliary head on the smashed data (e.g. `linear_head(10)`).

  Returns:
    `step(client, x, y, key) -> (client, SmashedData)`, where `client` is a `PartyState` whose
    params, model state and optimizer state are `{"client": ..., "aux": ...}`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8,)), 1), client_optimizer=optax.sgd(0.1),
    ...                    server_optimizer=optax.sgd(0.1))
    >>> x, y = jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32)
    >>> party = sl.init(jax.random.key(0), x).client
    >>> head = linear_head(10)
    >>> aux_params, aux_state = head.init(jax.random.key(1), jnp.ones((4, 8)))
    >>> params = {"client": party.params, "aux": aux_params}
    >>> party = party.replace(params=params, model_state={"client": party.model_state, "aux": aux_state},
    ...                       opt_state=sl.client_optimizer.init(params))
    >>> party, up = jax.jit(local_loss_client_step(sl, head))(party, x, y, jax.random.key(2))
    >>> up.activations.shape
    (4, 8)
  """
  c.check_protocol(sl, protocol.Vanilla, "local_loss_client_step")
  model, loss, client_optimizer, up_codec = sl.model, sl.loss, sl.client_optimizer, sl.uplink

  def step(client, x, y, key):
    protocol.check_batch("x", x, client.input_spec)

    def objective(params):
      h, client_state = model.client.apply(params["client"], client.model_state["client"], x, key=key, train=True)
      out, aux_state = aux_head.apply(params["aux"], client.model_state["aux"], h, key=None, train=True)
      return loss(out, y), (h, {"client": client_state, "aux": aux_state})

    (_, (h, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(client.params)
    payload, codec_state = up_codec.encode(jax.lax.stop_gradient(h), client.codec_state,
                                           jax.random.fold_in(key, protocol.CODEC_STREAM))
    client = c.apply_update(client, grads, client_optimizer, model_state).replace(codec_state=codec_state)
    return client, msgs.SmashedData(payload, y)

  return step


def local_loss_sl(sl: protocol.Vanilla, config: c.ScheduleConfig, *, aux_head: Stage) -> c.Algorithm:
  """Local-loss split learning: clients learn from an auxiliary head; no gradient comes back.

  Who updates what, per step:
    1. Each participating client k runs its half and its auxiliary head (`aux_head`, e.g.
       `linear_head(10)`) on its batch, computes the local loss, and updates its half, its head
       and its optimizer state at once: it never waits for the server.
    2. It sends SmashedData(activations, labels) (activations detached: no gradient flows back).
    3. The server runs its half once on everyone's smashed data and makes one update of its
       params and optimizer state from the weighted mean of the clients' losses.
  Nothing goes down, so downlink bytes are zero. A client that drops after its forward keeps
  its state from before the step, and the server ignores its smashed data. Client params and
  model state are `{"client": ..., "aux": ...}`.

  The model, the optimizers, the loss and the uplink codec on the smashed data come from the
  protocol `sl` (`sljax.vanilla(...)`; nothing goes down, so its downlink is unused, and its
  defense hooks have no place here: `sl` must have none); the schedule from `config`.

  Args:
    sl: the protocol (`sljax.vanilla(...)`), without `client_loss` or `cut_gradient_transform`.
    config: the schedule: clients, batch size, local steps, participation, drops, executor.
    aux_head: each client's auxiliary head on its smashed data (e.g. `linear_head(10)`).

  Returns:
    An `Algorithm` (`init`, `round`, `predict`); `predict` runs the client half without its head.

  Example:
    >>> import optax, sljax
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(), 1), client_optimizer=optax.adam(1e-3),
    ...                    server_optimizer=optax.adam(1e-3))
    >>> algo = local_loss_sl(sl, ScheduleConfig(num_clients=4, batch_size=32), aux_head=linear_head(10))
  """
  c.check_protocol(sl, protocol.Vanilla, "local_loss_sl")
  config = c.check_config(config)
  for hook in ("client_loss", "cut_gradient_transform"):
    _no_hook(sl, hook, "local_loss_sl")
  num_clients, batch_size, local_steps = config.num_clients, config.batch_size, config.local_steps
  model, loss, executor, up_codec = sl.model, sl.loss, config.executor, sl.uplink

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    k_model, k_aux, k_run = jax.random.split(key, 3)
    st = sl.init(k_model, jnp.zeros((batch_size, *data.x.shape[2:]), data.x.dtype))
    h, _ = model.client.apply(st.client.params, st.client.model_state, data.x[0, :1], key=None, train=False)
    aux_params, aux_state = aux_head.init(k_aux, h)
    params = {"client": st.client.params, "aux": aux_params}
    model_state = {"client": st.client.model_state, "aux": aux_state}
    client = st.client.replace(params=params, model_state=model_state, opt_state=sl.client_optimizer.init(params))
    return c.SimState(c.stack_party(client, num_clients), st.server, jnp.zeros((), jnp.int32),
                      jax.random.key_data(k_run))

  client_local_step = local_loss_client_step(sl, aux_head)
  client_keys, server_keys = c.lockstep_client_keys(num_clients), c.lockstep_server_keys(num_clients)

  def server_step(server, ups, weights, run_key, round_, step):
    """The server's side of one step: `(server, ups (K, ...), weights (K,), run_key, round_, step) ->
    (server, losses (K,), accuracies (K,))`; one update, nothing goes down."""
    server, _, losses, accs = c.server_step_on_all(
        model.server, server, jax.vmap(up_codec.decode)(ups.activations), ups.labels, weights,
        server_keys(run_key, round_, step)[0], loss=loss, optimizer=sl.server_optimizer)
    return server, losses, accs

  def client_half(party):
    """The client half without the auxiliary head (what inference runs)."""
    return party.replace(params=party.params["client"], model_state=party.model_state["client"])

  schedule = c.Schedule(client_keys, server_keys, c.index_order(num_clients), server_step, None, LOCAL_LOSS_TIMELINE,
                        client_step=client_local_step, client_half=client_half)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None, *, record: bool = False):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)

    ids = data.client_ids()

    def step(carry, s):
      clients, server = carry
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      active = inputs.active()[s]
      updated, ups = executor(client_local_step, clients, x, y, client_keys(state.key, state.round, s, ids))
      server, losses, accs = server_step(server, ups, active.astype(jnp.float32), state.key, state.round, s)
      clients = c.where(active, updated, clients)
      traffic = c.Traffic(up=[(msgs.wire_size(c.first(ups)), inputs.participating)])  # nothing comes down
      return (clients, server), (losses, accs, active, traffic, ups if record else ())

    (clients, server), (losses, accs, active, traffic, ups) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, traffic.sum(0), inputs.participating)
    state = state.replace(clients=clients, server=server, round=state.round + 1)
    if record:  # smashed data up from each client that began the step; nothing comes down
      return state, metrics, c.RoundMessages((c.Sent("up", ups, inputs.started()),), ids)
    return state, metrics

  def predict(state: c.SimState, x, client: int = 0):
    one = client_half(jax.tree.map(lambda a: a[client], state.clients))
    return sl.predict(protocol.SplitState(one, state.server, state.round), x)[0]

  return c.Algorithm("local_loss_sl", init, round_fn, predict, local_steps, schedule=schedule, shared_model=False,
                     config=config)

