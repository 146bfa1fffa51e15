"""Parallel split learning (Jeon & Kim, "Privacy-Sensitive Parallel Split Learning", ICOIN 2020)
and local-loss split learning (Han, Bhatti, Lee & Moon, "Accelerating Federated Learning with Split
Learning on Locally Generated Losses", ICML workshop 2021).

Both run all clients at once against one server that makes one update per step from everyone's
smashed data. They differ in what comes back: parallel SL returns each client its cut gradient;
local-loss SL returns nothing, because each client trains its half against a small auxiliary
head of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sljax import codecs
from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.data.clients import ClientData
from sljax.execution import Executor, vmap
from sljax.split import SplitModel, Stage


def _init_stacked(vanilla_init, key, data: ClientData, num_clients: int, batch_size: int) -> c.SimState:
  k_model, k_run = jax.random.split(key)
  st = vanilla_init(k_model, jnp.zeros((batch_size, *data.x.shape[2:]), data.x.dtype))
  return c.SimState(c.stack_party(st.client, num_clients), st.server, jnp.zeros((), jnp.int32),
                    jax.random.key_data(k_run))


def parallel_sl(
    model: SplitModel,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    num_clients: int,
    batch_size: int,
    local_steps: int = 1,
    loss: c.Loss = c.DEFAULT_LOSS,
    executor: Executor = vmap(),
    participation: float = 1.0,
    drop_rate: float = 0.0,
    sync_clients: bool = False,
    uplink: codecs.Codec | None = None,
    downlink: codecs.Codec | None = None,
) -> c.Algorithm:
  """Parallel split learning: every client at once, one server, one server update per step.

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
  A client that drops after its forward (`drop_rate`, or `RoundInputs.dropped`) has its step
  discarded: its smashed data gets weight 0 on the server and its state is left as it was. A
  client that does not participate in the round (`participation`) does nothing.
  `uplink`/`downlink` are codecs on the smashed data and the cut gradients; each client keeps
  its uplink codec state, and the server one downlink codec state per client.

  Example:
    >>> import optax, sljax
    >>> ds = sljax.data.load_digits(image=False)
    >>> data = sljax.data.stack_clients(ds.x_train, ds.y_train, sljax.data.iid(ds.y_train, num_clients=4, seed=0))
    >>> algo = parallel_sl(sljax.cut(sljax.models.mlp(), 1), client_optimizer=optax.adam(1e-3),
    ...                    server_optimizer=optax.adam(1e-3), num_clients=4, batch_size=32)
    >>> state = algo.init(jax.random.key(0), data)
    >>> state, metrics = jax.jit(algo.round)(state, data)
  """
  c.check_schedule(participation=participation, drop_rate=drop_rate)
  vanilla = protocol.vanilla(model, client_optimizer=client_optimizer, server_optimizer=server_optimizer, loss=loss,
                             uplink=uplink, downlink=downlink)
  up_codec, down_codec = uplink or codecs.identity(), downlink or codecs.identity()

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    state = _init_stacked(vanilla.init, key, data, num_clients, batch_size)
    server = state.server.replace(codec_state=c.broadcast(state.server.codec_state, num_clients))
    return state.replace(server=server)

  def update(party, grads, model_state, codec_state):
    return c.apply_update(party, grads, client_optimizer, model_state).replace(codec_state=codec_state)

  def backward_and_update(party, x, y, key, g_cut, active):
    grads, model_state, codec_state = c.client_gradient(vanilla)(party, x, y, key, g_cut)
    return c.select(active, update(party, grads, model_state, codec_state), party)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    key, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, num_clients=num_clients,
                                local_steps=local_steps, participation=participation, drop_rate=drop_rate)

    def step(carry, s):
      clients, server = carry
      x, y, k_step, keys = c.step_inputs(state, data, key, s, num_clients=num_clients, local_steps=local_steps,
                                         batch_size=batch_size)
      active = inputs.active()[s]
      ups = executor(lambda *a: vanilla.client_forward(*a)[0], clients, x, y, keys)
      h = jax.vmap(up_codec.decode)(ups.activations)
      server, g_h, losses, accs = c.server_step_on_all(
          model.server, server, h, y, active.astype(jnp.float32), jax.random.fold_in(k_step, 1),
          loss=loss, optimizer=server_optimizer)
      payload, codec_state = jax.vmap(down_codec.encode)(g_h, server.codec_state, c.codec_keys(k_step, num_clients))
      server = server.replace(codec_state=c.where(active, codec_state, server.codec_state))
      g_cut = jax.vmap(down_codec.decode)(payload)
      if sync_clients:
        grads, model_states, codec_states = executor(c.client_gradient(vanilla), clients, x, y, keys, g_cut)
        grads = c.broadcast(c.weighted_mean(grads, active.astype(jnp.float32)), num_clients)
        updated = executor(update, clients, grads, model_states, codec_states)
        clients = c.where(active, updated, clients)
      else:
        # one pass per client: backward, update, keep or discard (no K-wide gradient temporaries)
        clients = executor(backward_and_update, clients, x, y, keys, g_cut, active)
      up = msgs.wire_size(c.first(ups)) * inputs.participating
      down = msgs.wire_size(msgs.CutGradient(c.first(payload))) * active
      return (clients, server), (losses, accs, active, up, down)

    (clients, server), (losses, accs, active, up, down) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, up, down, inputs.participating)
    return state.replace(clients=clients, server=server, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    one = jax.tree.map(lambda a: a[client], state.clients)
    return vanilla.predict(protocol.SplitState(one, state.server, state.round), x)[0]

  return c.Algorithm("parallel_sl", init, round_fn, predict, local_steps)


def linear_head(num_classes: int) -> Stage:
  """The default auxiliary head of local-loss split learning: flatten, then one dense layer."""
  from flax import linen as nn

  from sljax.split import flatten, function_stage, linen_stage, sequential

  return sequential(function_stage(flatten), linen_stage(nn.Dense(num_classes)))


def local_loss_client_step(model: SplitModel, aux_head: Stage, *, client_optimizer: optax.GradientTransformation,
                           loss: c.Loss = c.DEFAULT_LOSS, uplink: codecs.Codec | None = None):
  """A local-loss client's whole step: `(client, x, y, key) -> (client, SmashedData)`.

  The client half and the auxiliary head learn from the head's loss; the smashed data goes up
  detached (and encoded with `uplink`), labels with it.
  """
  up_codec = uplink or codecs.identity()

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


def local_loss_sl(
    model: SplitModel,
    *,
    aux_head: Stage,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    num_clients: int,
    batch_size: int,
    local_steps: int = 1,
    loss: c.Loss = c.DEFAULT_LOSS,
    executor: Executor = vmap(),
    participation: float = 1.0,
    drop_rate: float = 0.0,
    uplink: codecs.Codec | None = None,
) -> c.Algorithm:
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
  model state are `{"client": ..., "aux": ...}`. `uplink` is a codec on the smashed data.
  """
  c.check_schedule(participation=participation, drop_rate=drop_rate)
  vanilla = protocol.vanilla(model, client_optimizer=client_optimizer, server_optimizer=server_optimizer, loss=loss,
                             uplink=uplink)
  up_codec = uplink or codecs.identity()

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    k_model, k_aux, k_run = jax.random.split(key, 3)
    st = vanilla.init(k_model, jnp.zeros((batch_size, *data.x.shape[2:]), data.x.dtype))
    h, _ = model.client.apply(st.client.params, st.client.model_state, data.x[0, :1], key=None, train=False)
    aux_params, aux_state = aux_head.init(k_aux, h)
    params = {"client": st.client.params, "aux": aux_params}
    model_state = {"client": st.client.model_state, "aux": aux_state}
    client = st.client.replace(params=params, model_state=model_state, opt_state=client_optimizer.init(params))
    return c.SimState(c.stack_party(client, num_clients), st.server, jnp.zeros((), jnp.int32),
                      jax.random.key_data(k_run))

  client_local_step = local_loss_client_step(model, aux_head, client_optimizer=client_optimizer, loss=loss,
                                             uplink=uplink)

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    key, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, num_clients=num_clients,
                                local_steps=local_steps, participation=participation, drop_rate=drop_rate)

    def step(carry, s):
      clients, server = carry
      x, y, k_step, keys = c.step_inputs(state, data, key, s, num_clients=num_clients, local_steps=local_steps,
                                         batch_size=batch_size)
      active = inputs.active()[s]
      updated, ups = executor(client_local_step, clients, x, y, keys)
      server, _, losses, accs = c.server_step_on_all(
          model.server, server, jax.vmap(up_codec.decode)(ups.activations), y, active.astype(jnp.float32),
          jax.random.fold_in(k_step, 1),
          loss=loss, optimizer=server_optimizer)
      clients = c.where(active, updated, clients)
      up = msgs.wire_size(c.first(ups)) * inputs.participating
      return (clients, server), (losses, accs, active, up, jnp.zeros_like(up))

    (clients, server), (losses, accs, active, up, down) = jax.lax.scan(
        step, (state.clients, state.server), jnp.arange(local_steps))
    metrics = c.round_metrics(losses, accs, active, up, down, inputs.participating)
    return state.replace(clients=clients, server=server, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    one = jax.tree.map(lambda a: a[client], state.clients)
    one = one.replace(params=one.params["client"], model_state=one.model_state["client"])
    return vanilla.predict(protocol.SplitState(one, state.server, state.round), x)[0]

  return c.Algorithm("local_loss_sl", init, round_fn, predict, local_steps)

