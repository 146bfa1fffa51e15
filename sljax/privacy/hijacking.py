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

`feature_space_hijacking` runs the attack against the real client legs (`sl.client_forward`,
`sl.client_backward`: the client's codecs, optimizer and defense hooks act as they would in any
run) for a number of steps, all of them in one jitted `lax.scan`, and returns the client as the
attack left it and the inverse to decode what the client sends from then on.

The discriminator is, as in the paper, a Wasserstein critic with a gradient penalty (Gulrajani et
al., 2017): with a plain GAN discriminator the tests' small nets did not converge (the
discriminator either won outright or was fooled by smashed data far from the pilot's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from sljax import messages as msgs
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


def feature_space_hijacking(sl, client, batches, knowledge: HijackingKnowledge, *, key) -> Hijacking:
  """Pasquini et al.'s malicious server against the client legs of `sl`, for `len(batches[0])` steps.

  Each step: the client runs `sl.client_forward` on its batch and sends its smashed data (through
  its uplink codec); the server takes one Adam step on the pilot/inverse autoencoder (auxiliary
  batch), one on the critic (`mean D(smashed) - mean D(pilot features)` plus the gradient
  penalty), and answers with the gradient of `-mean D(smashed)`, which moves the client's smashed
  data towards the pilot's features, as the client's `CutGradient` (through the downlink codec,
  from a fresh codec state); the client applies it with `sl.client_backward`.

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
  if aux.shape[1:] != x_SxB.shape[2:]:
    raise ValueError(f"knowledge.aux_inputs: expected examples of the client's input shape {x_SxB.shape[2:]}, got "
                     f"{aux.shape[1:]}")
  steps, batch = x_SxB.shape[0], min(knowledge.batch_size, aux.shape[0])
  k_pilot, k_inverse, k_disc = jax.random.split(jax.random.key(knowledge.seed), 3)
  smashed_shape = jax.eval_shape(
      lambda c, x, y: sl.uplink.decode(sl.client_forward(c, x, y, jax.random.key(0))[0].activations), client,
      x_SxB[0], y_SxB[0]).shape
  features = jax.eval_shape(lambda: knowledge.pilot.init(k_pilot, aux[:batch]))
  feature_shape = jax.eval_shape(lambda p: knowledge.pilot.apply(p, aux[:batch]), features).shape
  if feature_shape[1:] != smashed_shape[1:]:
    raise ValueError(f"knowledge.pilot: maps inputs to features of shape {feature_shape[1:]}, expected the smashed "
                     f"data's {smashed_shape[1:]}")
  pilot = knowledge.pilot.init(k_pilot, aux[:batch])
  inverse = knowledge.inverse.init(k_inverse, jnp.zeros(feature_shape, jnp.float32))
  disc = knowledge.discriminator.init(k_disc, jnp.zeros(feature_shape, jnp.float32))
  order = np.random.default_rng(knowledge.seed).integers(0, aux.shape[0], (knowledge.pretrain_steps + steps, batch))
  order = jnp.asarray(order, jnp.int32)
  client, (pilot, inverse), losses, last = _attack(sl, knowledge, client, (pilot, inverse), disc, x_SxB, y_SxB, aux,
                                                   order, key)
  inverse_apply = jax.jit(lambda z: knowledge.inverse.apply(inverse, z))

  def invert(z: Any) -> np.ndarray:
    z = jnp.asarray(z, jnp.float32)
    return np.asarray(inverse_apply(z)).reshape(z.shape[0], *x_SxB.shape[2:])

  reconstruction = _score("feature_space_hijacking", invert(last), np.asarray(x_SxB[-1]))
  return Hijacking(client, invert, reconstruction, {k: np.asarray(v) for k, v in losses.items()})


def _attack(sl, knowledge: HijackingKnowledge, client, autoencoder, disc, x_SxB, y_SxB, aux, order, key):
  """The hijacked steps as one `lax.scan` (jitted here: the modules and `sl` are closed over)."""
  opt, disc_opt = optax.adam(knowledge.learning_rate), optax.adam(knowledge.discriminator_learning_rate)
  pilot_apply, inverse_apply, disc_apply = knowledge.pilot.apply, knowledge.inverse.apply, knowledge.discriminator.apply

  def logit(params, z):
    return disc_apply(params, z).reshape(z.shape[0])

  def ae_loss(params, xa):
    p, q = params
    return jnp.mean(jnp.square(inverse_apply(q, pilot_apply(p, xa)).reshape(xa.shape) - xa))

  def disc_loss(params, pilot_features, smashed, k):
    # Wasserstein critic: high on pilot features, low on the client's smashed data; gradient penalty
    # on points between the two (Gulrajani et al. 2017)
    mix = jax.random.uniform(k, (smashed.shape[0],) + (1,) * (smashed.ndim - 1))
    between = mix * pilot_features + (1 - mix) * smashed
    slopes = jax.vmap(jax.grad(lambda h: logit(params, h[None])[0]))(between)
    penalty = jnp.mean(jnp.square(jnp.sqrt(jnp.sum(jnp.square(slopes.reshape(len(slopes), -1)), 1) + 1e-12) - 1))
    distance = jnp.mean(logit(params, smashed)) - jnp.mean(logit(params, pilot_features))
    return distance + knowledge.gradient_penalty * penalty

  def client_adversarial(z, params):
    return -jnp.mean(logit(params, z))

  def body(carry, inputs):
    client, ae, ae_state, disc, disc_state = carry
    x, y, idx, step = inputs
    k_client, k_server = jax.random.split(jax.random.fold_in(key, step))
    up, pending = sl.client_forward(client, x, y, k_client)
    z = sl.uplink.decode(up.activations).astype(jnp.float32)
    xa = aux[idx]
    ae_value, g = jax.value_and_grad(ae_loss)(ae, xa)
    updates, ae_state = opt.update(g, ae_state, ae)
    ae = optax.apply_updates(ae, updates)
    target = jax.lax.stop_gradient(pilot_apply(ae[0], xa))
    d_value, g = jax.value_and_grad(disc_loss)(disc, target, z, jax.random.fold_in(k_server, 2))
    updates, disc_state = disc_opt.update(g, disc_state, disc)
    disc = optax.apply_updates(disc, updates)
    adv_value, g_z = jax.value_and_grad(client_adversarial)(z, disc)
    payload, _ = sl.downlink.encode(g_z.astype(z.dtype), sl.downlink.init(g_z), jax.random.fold_in(k_server, 1))
    client = sl.client_backward(client, pending, msgs.CutGradient(payload))
    return (client, ae, ae_state, disc, disc_state), ({"autoencoder": ae_value, "discriminator": d_value,
                                                       "client_adversarial": adv_value}, z)

  def pretrain(carry, idx):
    ae, ae_state = carry
    updates, ae_state = opt.update(jax.grad(ae_loss)(ae, aux[idx]), ae_state, ae)
    return (optax.apply_updates(ae, updates), ae_state), None

  @jax.jit
  def run(client, ae, disc):
    pre = order.shape[0] - x_SxB.shape[0]
    (ae, ae_state), _ = jax.lax.scan(pretrain, (ae, opt.init(ae)), order[:pre])
    carry = (client, ae, ae_state, disc, disc_opt.init(disc))
    steps = jnp.arange(x_SxB.shape[0])
    (client, ae, _, _, _), (losses, z_S) = jax.lax.scan(body, carry, (x_SxB, y_SxB, order[pre:], steps))
    return client, ae, losses, z_S[-1]

  return run(client, autoencoder, disc)
