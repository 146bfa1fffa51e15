"""Feature-space hijacking: a malicious server that steers the client half into a space it can invert.

Pasquini, Ateniese and Bernaschi, "Unleashing the Tiger: Inference Attacks on Split Learning",
ACM CCS 2021. The server does not train its honest half. On auxiliary public data from the
client's distribution it trains a *pilot* network (input -> a feature space it chooses) and its
*inverse* (feature space -> input) as an autoencoder, and a *discriminator* that tells the pilot's
features from the client's smashed data. Instead of the gradient of the task loss it sends the
client the gradient that makes the discriminator take the client's smashed data for pilot
features. The client, running its unchanged legs, follows it: its half converges to a map into the
pilot's space, and the inverse then decodes the client's smashed data into its private inputs.
The client cannot tell from any single message: a cut gradient is a cut gradient.

Two ways to run it, with one server step (`_server_update`):

- `hijacking_server(sl, config, knowledge=)`: the malicious server as an `Algorithm`, the way the
  threat model has it: honest clients run parallel split learning's legs, keys and data order
  unchanged (their own `sl.client_forward`/`sl.client_backward`, codecs, optimizer and defense
  hooks), and the server's step is the attacker's. `sljax.simulation.run` drives it (and records
  its messages with `transcript=`), and the network server serves it to unmodified clients
  (`sljax.transport.ConcurrentServer(..., algorithm="parallel_sl", simulated=...)`: the clients are
  told they run parallel SL). `decoder(knowledge, state.server)` decodes what the clients send.
- `feature_space_hijacking(sl, client, batches, knowledge, key=)`: one client's legs and given
  batches, every step in one jitted `lax.scan`; returns the client as the attack left it and the
  inverse.

The discriminator is, as in the paper, a Wasserstein critic with a gradient penalty (Gulrajani et
al., 2017): with a plain GAN discriminator the tests' small nets did not converge (the
discriminator either won outright or was fooled by smashed data far from the pilot's).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms.parallel import parallel_sl
from sljax.privacy.attacks import Reconstruction, _score


@dataclasses.dataclass(frozen=True)
class HijackingKnowledge:
  """What the malicious server knows and uses: auxiliary inputs and its three networks.

  Attributes:
    aux_inputs: (M, ...) public inputs from the client's data distribution (no labels needed).
    pilot: a Flax Linen module, input -> features of the smashed data's shape (e.g. a guess at the
      client half's architecture).
    inverse: a Flax Linen module, features -> input (any shape with the input's size: reshaped).
    discriminator: a Flax Linen module, features -> one score per example ((B,) or (B, 1)): the
      Wasserstein critic, high on pilot features.
    learning_rate: Adam's, for the pilot and the inverse.
    discriminator_learning_rate: Adam's for the critic.
    batch_size: auxiliary examples per step.
    gradient_penalty: the weight of the critic's gradient penalty.
    pretrain_steps: autoencoder steps the server takes on the auxiliary data before the first
      client step (offline: the client sees nothing of them), so that the client is pulled towards
      a feature space that has settled.
    seed: the networks' initialisation and the auxiliary batches' order.
  """

  aux_inputs: Any
  pilot: nn.Module
  inverse: nn.Module
  discriminator: nn.Module
  learning_rate: float = 1e-3
  discriminator_learning_rate: float = 1e-4
  batch_size: int = 64
  pretrain_steps: int = 0
  gradient_penalty: float = 10.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Hijacking:
  """The attack's outcome.

  Attributes:
    client: the client's `PartyState` after the hijacked steps (the client keeps training it).
    invert: `invert(smashed) -> inputs`, the trained inverse: decodes smashed data the client sends.
    reconstruction: the last step's smashed data decoded, scored against the client's batch.
    losses: per step, the autoencoder's reconstruction loss on auxiliary data, the discriminator's
      loss and the client's adversarial loss (what the server made the client minimise).
  """

  client: Any
  invert: Callable[[Any], np.ndarray]
  reconstruction: Reconstruction
  losses: dict[str, np.ndarray]


def hijacking_server(sl, config: c.ScheduleConfig, *, knowledge: HijackingKnowledge) -> c.Algorithm:
  """Pasquini et al.'s malicious server as an `Algorithm` that honest parallel-SL clients train against.

  The clients are parallel split learning's (`sljax.algorithms.parallel_sl(sl, config)`): the same
  initial halves, keys, data order, participation and drops, and their own legs, codecs and
  optimizer; only the server's step is replaced, by the attacker's (see `feature_space_hijacking`):
  per step, one autoencoder step on an auxiliary batch, one critic step on every present client's
  smashed data, and to each client the gradient of its own adversarial loss `-mean D(smashed)`
  through its downlink codec. The server trains no task half: its state's `params` are the
  attacker's networks (`{"pilot", "inverse", "critic"}`), its `opt_state` their Adam states, its
  `codec_state` one downlink codec state per client; the metrics' "loss" is the clients'
  adversarial loss and their "accuracy" 0. The autoencoder's `knowledge.pretrain_steps` offline
  steps run when the algorithm is built (offline, before any client calls).

  Over the network the same algorithm is served to unmodified clients (`sljax.transport`'s client
  driver) as parallel SL: `ConcurrentServer(model, sl, algorithm="parallel_sl", simulated=algo, ...)`
  (a research tool built from Python: `sljax serve` has no such option). That server refuses
  `Predict` (FAILED_PRECONDITION): it holds no task half.

  Args:
    sl: the clients' protocol (`sljax.vanilla(...)`), as parallel SL takes it.
    config: the schedule: clients, batch size, local steps, participation, drops, executor.
    knowledge: the auxiliary data and the server's networks.

  Returns:
    An `Algorithm` named "feature_space_hijacking" whose `round` takes `record=True` like parallel
    SL's; its `predict` raises (there is no task half). Decode with `decoder(knowledge, state.server)`.

  Raises:
    ValueError: when the pilot's features are not of the smashed data's shape, or (from `init`)
      `knowledge.aux_inputs` not of the clients' input shape (the errors name the argument).

  Example:
    >>> import flax.linen as nn, jax, optax, sljax
    >>> ds = sljax.data.load_digits(image=False)  # flat: 64 pixels
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.adam(1e-2),
    ...                    server_optimizer=optax.adam(1e-2))
    >>> k = HijackingKnowledge(aux_inputs=ds.x_train[256:], pilot=nn.Sequential([nn.Dense(16), nn.relu]),
    ...                        inverse=nn.Dense(64), discriminator=nn.Dense(1))
    >>> data = sljax.data.stack_clients(ds.x_train[:256], ds.y_train[:256], sljax.data.iid(ds.y_train[:256],
    ...                                 num_clients=2, seed=0))
    >>> algo = hijacking_server(sl, sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=32, local_steps=4),
    ...                         knowledge=k)
    >>> state, records = sljax.simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=1)
    >>> invert = decoder(k, state.server)
    >>> invert(sl.client_infer(jax.tree.map(lambda a: a[0], state.clients), ds.x_test[:5]).activations).shape
    (5, 64)
  """
  honest = parallel_sl(sl, config)  # checks sl and config
  num_clients, local_steps = config.num_clients, config.local_steps
  aux = jnp.asarray(knowledge.aux_inputs)
  try:
    cut_shape = jax.eval_shape(sl.init, jax.random.key(0), aux[:1]).server.input_spec.shape
  except (TypeError, ValueError) as e:
    raise ValueError(f"knowledge.aux_inputs: the client half does not take examples of shape {aux.shape[1:]}: "
                     f"{e}") from None
  # the attacker's offline work, before any client calls: its networks and the autoencoder's pretraining
  attacker = jax.jit(lambda aux: _init_attacker(knowledge, aux, aux.shape[1:], cut_shape))(aux)
  server_keys = honest.schedule.server_keys
  up_codec, down_codec = sl.uplink, sl.downlink

  def server_step(server, ups, weights, run_key, round_, step, ids=None):
    """The attacker's step in parallel SL's place: `(server, ups (K, ...), weights (K,), run_key,
    round_, step, ids=None) -> (server, downlink payloads (K, ...), adversarial losses (K,), zeros (K,))`."""
    h = jax.vmap(up_codec.decode)(ups.activations)
    k_server = server_keys(run_key, round_, step)[0]
    index = knowledge.pretrain_steps + round_ * local_steps + step
    params, opt_state, losses, g_h = _server_update(knowledge, aux, server.params, server.opt_state,
                                                    h.astype(jnp.float32), weights, index,
                                                    jax.random.fold_in(k_server, 2))[:4]
    updated = server.replace(params=params, opt_state=opt_state)
    codec_keys = c.codec_keys(c.step_key(run_key, round_, step), num_clients, ids)
    payload, codec_state = jax.vmap(down_codec.encode)(g_h.astype(h.dtype), server.codec_state, codec_keys)
    new = c.select(weights.sum() > 0, updated, server)
    new = new.replace(codec_state=c.where(weights > 0, codec_state, server.codec_state))
    return new, payload, losses, jnp.zeros_like(losses)

  def init(key, data) -> c.SimState:
    state = honest.init(key, data)  # the clients' halves as parallel SL starts them
    if tuple(data.x.shape[2:]) != aux.shape[1:]:
      raise ValueError(f"knowledge.aux_inputs: expected examples of the client's input shape {data.x.shape[2:]}, "
                       f"got {aux.shape[1:]}")
    params, opt_state = jax.tree.map(jnp.copy, attacker)  # copies: a donated state must not take them
    server = protocol.PartyState(params, (), opt_state, state.server.input_spec, state.server.codec_state)
    return state.replace(server=server)

  # parallel SL's round (honest clients: their legs, keys, batches, drops and messages) around the attacker's step
  attacked = parallel_sl(sl, config, server_step=server_step)

  def predict(state, x, client: int = 0):
    del state, x, client
    raise ValueError("predict: the hijacking server trains no task half; decode the clients' smashed data with "
                     "decoder(knowledge, state.server)")

  return c.Algorithm("feature_space_hijacking", init, attacked.round, predict, local_steps,
                     c.ClientAxes(server_codec=True), attacked.schedule, shared_model=False, config=config)


def decoder(knowledge: HijackingKnowledge, server) -> Callable[[Any], np.ndarray]:
  """The malicious server's inverse: `invert(smashed) -> inputs`, shaped like `knowledge.aux_inputs`' rows.

  Args:
    knowledge: the attack's knowledge (its inverse network).
    server: the server's state of a `hijacking_server` run (`SimState.server`, or the network
      server's `ConcurrentServer.state.server`).

  Returns:
    `invert(smashed (N, ...)) -> (N, *input shape)` numpy array.
  """
  return _invert(knowledge, server.params["inverse"])


def _invert(knowledge: HijackingKnowledge, inverse) -> Callable[[Any], np.ndarray]:
  apply = jax.jit(knowledge.inverse.apply)
  shape = np.shape(knowledge.aux_inputs)[1:]

  def invert(z: Any) -> np.ndarray:
    z = jnp.asarray(z, jnp.float32)
    return np.asarray(apply(inverse, z)).reshape(z.shape[0], *shape)

  return invert


def feature_space_hijacking(sl, client, batches, knowledge: HijackingKnowledge, *, key) -> Hijacking:
  """Pasquini et al.'s malicious server against the client legs of `sl`, for `len(batches[0])` steps.

  Each step: the client runs `sl.client_forward` on its batch and sends its smashed data (through
  its uplink codec); the server takes one Adam step on the pilot/inverse autoencoder (auxiliary
  batch), one on the critic (`mean D(smashed) - mean D(pilot features)` plus the gradient
  penalty), and answers with the gradient of `-mean D(smashed)`, which moves the client's smashed
  data towards the pilot's features, as the client's `CutGradient` (through the downlink codec,
  from a fresh codec state); the client applies it with `sl.client_backward`. The server's step is
  `hijacking_server`'s.

  Args:
    sl: a vanilla split-learning protocol (`sljax.vanilla`): its client legs and codecs are used.
    client: the client's `PartyState` (e.g. `sl.init(...).client`).
    batches: `(x_SxB, labels_SxB)`, the client's private batches for S steps (the labels go up as
      in vanilla SL; the attack does not use them). The inputs are used only to score the
      reconstruction of the last step.
    knowledge: the auxiliary data and the server's networks.
    key: PRNG key of the run (the client's step keys and nothing of the server's are derived from it).

  Returns:
    A `Hijacking`: the client after the attack, the inverse, the last batch reconstructed and scored.

  Raises:
    ValueError: `batches` is not (S, B, ...) inputs and (S, B) labels, or the pilot's features have
      not the smashed data's shape.

  Example:
    >>> import flax.linen as nn, jax, optax, sljax
    >>> ds = sljax.data.load_digits(image=False)  # flat: 64 pixels
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.adam(1e-2),
    ...                    server_optimizer=optax.adam(1e-2))
    >>> k = HijackingKnowledge(aux_inputs=ds.x_train[256:], pilot=nn.Sequential([nn.Dense(16), nn.relu]),
    ...                        inverse=nn.Dense(64), discriminator=nn.Dense(1))
    >>> batches = (ds.x_train[:256].reshape(4, 64, 64), ds.y_train[:256].reshape(4, 64))
    >>> out = feature_space_hijacking(sl, sl.init(jax.random.key(0), batches[0][0]).client, batches, k,
    ...                               key=jax.random.key(1))
    >>> out.invert(sl.client_infer(out.client, ds.x_test[:5]).activations).shape, out.losses["autoencoder"].shape
    ((5, 64), (4,))
  """
  x_SxB, y_SxB = (jnp.asarray(a) for a in batches)
  if x_SxB.ndim < 3 or y_SxB.shape != x_SxB.shape[:2]:
    raise ValueError(f"batches: expected (x, labels) of shapes (S, B, ...) and (S, B), got {x_SxB.shape} and "
                     f"{y_SxB.shape}")
  aux = jnp.asarray(knowledge.aux_inputs, x_SxB.dtype)
  smashed_shape = jax.eval_shape(
      lambda c, x, y: sl.uplink.decode(sl.client_forward(c, x, y, jax.random.key(0))[0].activations), client,
      x_SxB[0], y_SxB[0]).shape
  params, opt_state = _init_attacker(knowledge, aux, x_SxB.shape[2:], smashed_shape[1:])

  def body(carry, inputs):
    client, params, opt_state = carry
    x, y, step = inputs
    k_client, k_server = jax.random.split(jax.random.fold_in(key, step))
    up, pending = sl.client_forward(client, x, y, k_client)
    z = sl.uplink.decode(up.activations)
    params, opt_state, _, g_z, values = _server_update(knowledge, aux, params, opt_state, z[None].astype(jnp.float32),
                                                       jnp.ones((1,), jnp.float32), knowledge.pretrain_steps + step,
                                                       jax.random.fold_in(k_server, 2))
    g_z = g_z[0].astype(z.dtype)
    payload, _ = sl.downlink.encode(g_z, sl.downlink.init(g_z), jax.random.fold_in(k_server, 1))
    client = sl.client_backward(client, pending, msgs.CutGradient(payload))
    return (client, params, opt_state), (values, z)

  @jax.jit
  def run(client, params, opt_state):
    (client, params, _), (losses, z_S) = jax.lax.scan(body, (client, params, opt_state),
                                                      (x_SxB, y_SxB, jnp.arange(x_SxB.shape[0])))
    return client, params, losses, z_S[-1]

  client, params, losses, last = run(client, params, opt_state)
  invert = _invert(knowledge, params["inverse"])
  reconstruction = _score("feature_space_hijacking", invert(last), np.asarray(x_SxB[-1]))
  return Hijacking(client, invert, reconstruction, {k: np.asarray(v) for k, v in losses.items()})


def _aux_rows(knowledge: HijackingKnowledge, count: int, index) -> jax.Array:
  """The auxiliary rows of the server's autoencoder step `index` (its offline steps first, then one per
  hijacked step): drawn from `knowledge.seed` alone."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(knowledge.seed), 3), index)
  return jax.random.randint(key, (min(knowledge.batch_size, count),), 0, count)


def _ae_loss(knowledge: HijackingKnowledge, ae, xa) -> jax.Array:
  features = knowledge.pilot.apply(ae["pilot"], xa)
  return jnp.mean(jnp.square(knowledge.inverse.apply(ae["inverse"], features).reshape(xa.shape) - xa))


def _init_attacker(knowledge: HijackingKnowledge, aux, input_shape, cut_shape) -> tuple[dict, dict]:
  """The attacker's networks `{"pilot", "inverse", "critic"}` and their Adam states, after the offline
  autoencoder steps; checks the auxiliary inputs' and the pilot's shapes."""
  if tuple(aux.shape[1:]) != tuple(input_shape):
    raise ValueError(f"knowledge.aux_inputs: expected examples of the client's input shape {tuple(input_shape)}, "
                     f"got {aux.shape[1:]}")
  batch = min(knowledge.batch_size, aux.shape[0])
  k_pilot, k_inverse, k_critic = jax.random.split(jax.random.key(knowledge.seed), 3)
  feature_shape = jax.eval_shape(lambda: knowledge.pilot.apply(knowledge.pilot.init(k_pilot, aux[:batch]),
                                                               aux[:batch])).shape
  if tuple(feature_shape[1:]) != tuple(cut_shape):
    raise ValueError(f"knowledge.pilot: maps inputs to features of shape {feature_shape[1:]}, expected the smashed "
                     f"data's {tuple(cut_shape)}")
  opt = optax.adam(knowledge.learning_rate)
  features = jnp.zeros(feature_shape, jnp.float32)
  ae = {"pilot": knowledge.pilot.init(k_pilot, aux[:batch]), "inverse": knowledge.inverse.init(k_inverse, features)}
  critic = knowledge.discriminator.init(k_critic, features)

  def pretrain(carry, index):
    ae, state = carry
    updates, state = opt.update(jax.grad(functools.partial(_ae_loss, knowledge))(
        ae, aux[_aux_rows(knowledge, aux.shape[0], index)]), state, ae)
    return (optax.apply_updates(ae, updates), state), None

  (ae, ae_state), _ = jax.lax.scan(pretrain, (ae, opt.init(ae)), jnp.arange(knowledge.pretrain_steps))
  opt_state = {"autoencoder": ae_state, "critic": optax.adam(knowledge.discriminator_learning_rate).init(critic)}
  return {**ae, "critic": critic}, opt_state


def _server_update(knowledge: HijackingKnowledge, aux, params, opt_state, z_KxB, weights_K, index, key):
  """The attacker's step on the smashed data `z_KxB` of K clients (weight 0: absent): one autoencoder
  step on auxiliary batch `index`, one critic step, and each client's adversarial loss and its gradient.

  Returns:
    (params, opt_state, adversarial losses (K,), their gradients (K, B, ...), {"autoencoder",
    "discriminator", "client_adversarial"}: the step's losses).
  """
  opt, critic_opt = optax.adam(knowledge.learning_rate), optax.adam(knowledge.discriminator_learning_rate)
  k, b = z_KxB.shape[:2]
  z_R = z_KxB.reshape(k * b, *z_KxB.shape[2:])
  w_R = jnp.repeat(weights_K, b)

  def logit(critic, z):
    return knowledge.discriminator.apply(critic, z).reshape(z.shape[0])

  def critic_loss(critic, pilot_features):
    # Wasserstein critic: high on pilot features, low on the clients' smashed data; gradient penalty
    # on points between the two (Gulrajani et al. 2017), each smashed row paired with a pilot row
    mix = jax.random.uniform(key, (z_R.shape[0],) + (1,) * (z_R.ndim - 1))
    pilot_R = pilot_features[jnp.arange(z_R.shape[0]) % pilot_features.shape[0]]
    between = mix * pilot_R + (1 - mix) * z_R
    slopes = jax.vmap(jax.grad(lambda h: logit(critic, h[None])[0]))(between)
    penalty_R = jnp.square(jnp.sqrt(jnp.sum(jnp.square(slopes.reshape(len(slopes), -1)), 1) + 1e-12) - 1)
    n = jnp.maximum(w_R.sum(), 1.0)
    distance = jnp.sum(w_R * logit(critic, z_R)) / n - jnp.mean(logit(critic, pilot_features))
    return distance + knowledge.gradient_penalty * jnp.sum(w_R * penalty_R) / n

  def adversarial(z_KxB, critic):  # client k's own loss: -mean D(its smashed data)
    losses_K = -jnp.mean(logit(critic, z_KxB.reshape(k * b, *z_KxB.shape[2:])).reshape(k, b), axis=1)
    return losses_K.sum(), losses_K

  ae = {"pilot": params["pilot"], "inverse": params["inverse"]}
  xa = aux[_aux_rows(knowledge, aux.shape[0], index)]
  ae_value, g = jax.value_and_grad(functools.partial(_ae_loss, knowledge))(ae, xa)
  updates, ae_state = opt.update(g, opt_state["autoencoder"], ae)
  ae = optax.apply_updates(ae, updates)
  target = jax.lax.stop_gradient(knowledge.pilot.apply(ae["pilot"], xa))
  d_value, g = jax.value_and_grad(critic_loss)(params["critic"], target)
  updates, critic_state = critic_opt.update(g, opt_state["critic"], params["critic"])
  critic = optax.apply_updates(params["critic"], updates)
  (_, losses_K), g_z = jax.value_and_grad(adversarial, has_aux=True)(z_KxB, critic)
  g_z = g_z * (weights_K > 0).reshape(k, *(1,) * (g_z.ndim - 1)).astype(g_z.dtype)  # nothing to the absent
  values = {"autoencoder": ae_value, "discriminator": d_value,
            "client_adversarial": jnp.sum(weights_K * losses_K) / jnp.maximum(weights_K.sum(), 1.0)}
  return {**ae, "critic": critic}, {"autoencoder": ae_state, "critic": critic_state}, losses_K, g_z, values
