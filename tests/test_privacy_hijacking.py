"""Feature-space hijacking (Pasquini et al., CCS 2021) against the real client legs on digits: a malicious server
steers the client half into its pilot's feature space and decodes the client's smashed data; noise on the uplink
leaves it nothing to decode. Seeds fixed; thresholds stated with the values measured."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import sljax
from sljax.privacy import defenses, hijacking, metrics


def _flat(v):
  return v.reshape(v.shape[0], -1)


def _knowledge(aux, **kw):
  return hijacking.HijackingKnowledge(
      aux_inputs=aux, pilot=nn.Sequential([nn.Conv(4, (3, 3)), nn.relu]),  # the attacker's guess of the client half
      inverse=nn.Sequential([nn.Conv(16, (3, 3)), nn.relu, nn.Conv(1, (3, 3)), nn.sigmoid]),
      discriminator=nn.Sequential([_flat, nn.Dense(32), nn.leaky_relu, nn.Dense(1)]), **kw)


def test_a_malicious_server_hijacks_the_client_half_and_decodes_its_inputs():
  ds = sljax.data.load_digits()
  model = sljax.cut(sljax.models.cnn(channels=(4, 8)), 1)  # the client: one 3x3 convolution, 4 channels, ReLU
  sl = sljax.vanilla(model, client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2))
  rows = np.random.default_rng(0).integers(0, 700, (200, 16))  # the client's private data: 700 training digits
  client = sl.init(jax.random.key(0), ds.x_train[:16]).client
  knowledge = _knowledge(ds.x_train[700:], learning_rate=1e-3, discriminator_learning_rate=1e-3, batch_size=16,
                         pretrain_steps=150)  # auxiliary data: the other training digits, no labels
  out = hijacking.feature_space_hijacking(sl, client, (ds.x_train[:700][rows], ds.y_train[:700][rows]), knowledge,
                                          key=jax.random.key(1))
  assert out.losses["autoencoder"].shape == (200,) and out.losses["autoencoder"][-1] < 0.01
  # what the hijacked client sends from then on (here: test digits it never trained on) decodes
  x = ds.x_test[:64]
  smashed = sl.client_infer(out.client, x).activations
  found = metrics.reconstruction_metrics(x, out.invert(smashed))
  assert found["ssim"] >= 0.4, found  # measured 0.53
  untouched = metrics.reconstruction_metrics(x, out.invert(sl.client_infer(client, x).activations))
  assert untouched["ssim"] <= 0.1, untouched  # measured 0.0: the hijacking, not the inverse alone, decodes
  # with Gaussian noise on the uplink (clip at the rows' median norm, noise 0.5 of it) nothing decodes
  codec = defenses.gaussian_noise(clip_norm=float(np.median(np.linalg.norm(_flat(np.asarray(smashed)), axis=1))),
                                  noise_multiplier=0.5)
  noisy = codec.decode(codec.encode(smashed, codec.init(smashed), jax.random.key(3))[0])
  defended = metrics.reconstruction_metrics(x, out.invert(noisy))
  assert defended["ssim"] <= 0.1, defended  # measured 0.002


def test_bad_input_gets_errors_naming_the_argument():
  ds = sljax.data.load_digits()
  sl = sljax.vanilla(sljax.cut(sljax.models.cnn(channels=(4, 8)), 1), client_optimizer=optax.sgd(0.1),
                     server_optimizer=optax.sgd(0.1))
  client = sl.init(jax.random.key(0), ds.x_train[:4]).client
  x, y = ds.x_train[:8].reshape(2, 4, 8, 8, 1), ds.y_train[:8].reshape(2, 4)
  with pytest.raises(ValueError, match=r"batches: expected \(x, labels\) of shapes \(S, B, ...\) and \(S, B\), got "
                                       r"\(2, 4, 8, 8, 1\) and \(8,\)"):
    hijacking.feature_space_hijacking(sl, client, (x, y.reshape(-1)), _knowledge(ds.x_train[8:]), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"knowledge.aux_inputs: expected examples of the client's input shape "
                                       r"\(8, 8, 1\), got \(64,\)"):
    hijacking.feature_space_hijacking(sl, client, (x, y), _knowledge(_flat(ds.x_train[8:])), key=jax.random.key(0))
  k = dataclasses.replace(_knowledge(ds.x_train[8:]), pilot=nn.Sequential([nn.Conv(3, (3, 3)), nn.relu]))
  with pytest.raises(ValueError, match=r"knowledge.pilot: maps inputs to features of shape \(8, 8, 3\), expected the "
                                       r"smashed data's \(8, 8, 4\)"):
    hijacking.feature_space_hijacking(sl, client, (x, y), k, key=jax.random.key(0))
