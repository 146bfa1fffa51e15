"""Tests for sljax.privacy.defenses and sljax.privacy.accounting.

The statistical tests state their false-failure rate; every seed is fixed, so a run either always
passes or always fails for a given build.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats
from sklearn.metrics import roc_auc_score

import sljax
from sljax import codecs
from sljax.privacy import accounting, defenses
from sljax.privacy.metrics import distance_correlation
from sljax.transport import wire

MLP = sljax.cut(sljax.models.mlp(hidden=(16,), num_classes=2), 1)


def _vanilla(**hooks):
  return sljax.vanilla(MLP, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1), **hooks)


def _encode(codec, tree, key):
  return codec.decode(codec.encode(tree, codec.init(tree), key)[0])


# ---------------------------------------------------------------------------------------------
# Noise codecs: the claimed scale, the clipping, the config.


def test_gaussian_and_laplace_noise_have_the_claimed_scale():
  # Rows well inside the clip norm, so the codec adds noise only: n = 64 * 512 coordinates.
  # Gaussian: sum(noise^2) / (sigma C)^2 ~ chi2(n); Laplace: sum|noise| / b ~ Gamma(n, 1). The bounds
  # are the distributions' 0.5e-6 and 1 - 0.5e-6 quantiles: a correct codec fails with probability 1e-6.
  x = jnp.full((64, 512), 1e-4)
  n = x.size
  clip_norm, multiplier = 2.0, 0.7
  noise = _encode(defenses.gaussian_noise(clip_norm=clip_norm, noise_multiplier=multiplier), x, jax.random.key(3)) - x
  statistic = float(jnp.sum(jnp.square(noise))) / (multiplier * clip_norm) ** 2
  assert stats.chi2.ppf(0.5e-6, n) < statistic < stats.chi2.ppf(1 - 0.5e-6, n)
  noise = _encode(defenses.laplace_noise(clip_norm=clip_norm, noise_multiplier=multiplier), x, jax.random.key(4)) - x
  statistic = float(jnp.sum(jnp.abs(noise))) / (multiplier * clip_norm)
  assert stats.gamma.ppf(0.5e-6, n) < statistic < stats.gamma.ppf(1 - 0.5e-6, n)
  # The bounds are tight enough to see a noise 5% off in scale: its expected statistic lies outside them.
  assert n * 1.05**2 > stats.chi2.ppf(1 - 0.5e-6, n) and n / 1.05 < stats.gamma.ppf(0.5e-6, n)


def test_noise_codecs_clip_each_example_over_all_leaves():
  # The noise depends on the key and the shapes only, so encode(x) - encode(0) is the clipped x.
  rows = jnp.array([0.1, 1.0, 3.0, 30.0])[:, None]
  tree = {"a": rows * jnp.ones((4, 3)), "b": rows[:, :, None] * jnp.ones((4, 2, 2)), "labels": jnp.arange(4)}
  zeros = jax.tree.map(jnp.zeros_like, tree)
  for codec, ord_, clip_norm in ((defenses.gaussian_noise(clip_norm=2.0, noise_multiplier=1.0), 2, 2.0),
                                 (defenses.laplace_noise(clip_norm=5.0, noise_multiplier=1.0), 1, 5.0)):
    key = jax.random.key(0)
    out, noise = _encode(codec, tree, key), _encode(codec, zeros, key)
    np.testing.assert_array_equal(out["labels"], tree["labels"])  # integer leaves pass unchanged
    clipped = jnp.concatenate([(out[k] - noise[k]).reshape(4, -1) for k in ("a", "b")], axis=1)
    original = jnp.concatenate([tree[k].reshape(4, -1) for k in ("a", "b")], axis=1)
    norms = jnp.linalg.norm(clipped, ord=ord_, axis=1)
    before = jnp.linalg.norm(original, ord=ord_, axis=1)
    np.testing.assert_allclose(norms, jnp.minimum(before, clip_norm), rtol=1e-5)
    np.testing.assert_allclose(clipped / norms[:, None], original / before[:, None], rtol=1e-5)  # direction kept


def test_noise_codecs_chain_describe_and_account():
  codec = codecs.chain(defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=2.0), codecs.quantize(bits=8))
  assert codecs.describe(codec)["codecs"][0] == {"name": "gaussian_noise", "clip_norm": 1.0, "noise_multiplier": 2.0}
  assert codecs.describe(defenses.laplace_noise(clip_norm=0.5, noise_multiplier=3.0))["name"] == "laplace_noise"
  # As the network handshake carries it, so a server can refuse a client with other noise.
  request = {"protocol": 1, "client": 0, "cut_shape": [4], "cut_dtype": "float32", "uplink": codecs.describe(codec),
             "downlink": codecs.describe(None), "samples": 1}
  assert wire.decode("Handshake", wire.encode(request))["uplink"] == codecs.describe(codec)
  config = sljax.algorithms.ScheduleConfig(num_clients=1, batch_size=8)
  acct = accounting.accountant(_vanilla(uplink=codec), config, num_examples=64, delta=1e-5)
  assert acct.mechanisms == (("gaussian", 2.0),)
  feedback_first = codecs.chain(codecs.top_k(k=2, error_feedback=True), defenses.gaussian_noise(clip_norm=1.0,
                                                                                              noise_multiplier=1.0))
  with pytest.raises(ValueError, match=r"sl: the uplink runs top_k with error feedback before the noise codec"):
    accounting.accountant(_vanilla(uplink=feedback_first), config, num_examples=64, delta=1e-5)


# ---------------------------------------------------------------------------------------------
# The accountant.


def test_accountant_equals_dp_accounting_and_the_analytic_gaussian():
  sl = _vanilla(uplink=defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=1.1))
  config = sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=16, local_steps=2)
  rdp = accounting.accountant(sl, config, num_examples=np.array([64, 40]), delta=1e-5, method="rdp")
  # r rounds = 2r steps = 32r stream positions; the client of 40 rows has read some row ceil(32r / 40) times.
  assert [rdp.releases(r) for r in (0, 1, 2, 5)] == [0, 1, 2, 4]
  expected = rdp_privacy_accountant.RdpAccountant().compose(
      dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.1), 4)).get_epsilon(1e-5)
  assert rdp.epsilon(5) == pytest.approx(expected, rel=1e-12)
  # PLD against the exact (epsilon, delta) of 4 Gaussian releases, mu = sqrt(4) / 1.1 (Balle & Wang 2018).
  pld = accounting.accountant(sl, config, num_examples=np.array([64, 40]), delta=1e-5)
  mu = 2 / 1.1
  exact = optimize.brentq(lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)
                          - 1e-5, 0.0, 50.0)
  assert exact <= pld.epsilon(5) <= exact * 1.01
  # Replace-one adjacency doubles the sensitivity: the epsilon of multiplier 0.55.
  replace = accounting.accountant(sl, config, num_examples=40, delta=1e-5, method="rdp", adjacency="replace_one")
  expected = rdp_privacy_accountant.RdpAccountant().compose(
      dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(0.55), 4)).get_epsilon(1e-5)
  assert replace.epsilon(5) == pytest.approx(expected, rel=1e-12)
  # U-shaped SL sends two rows per example and step through its uplink codec (smashed data, tail gradient).
  u_sl = sljax.u_shaped(sljax.cut(sljax.models.mlp(hidden=(8, 8), num_classes=2), 1, 2),
                        client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1),
                        uplink=defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=1.1))
  assert accounting.accountant(u_sl, config, num_examples=40, delta=1e-5).releases(5) == 8
  # Epsilon grows with the rounds; the last round within a target is found.
  target = accounting.accountant(sl, config, num_examples=40, delta=1e-5, target_epsilon=pld.epsilon(3))
  assert target.last_round(0, 10) == 3 and target.last_round(3, 3) == 3


# ---------------------------------------------------------------------------------------------
# NoPeek.


def test_nopeek_lowers_distance_correlation():
  # A tiny MLP trained 25 steps with and without NoPeek (alpha=2), seeds fixed. Measured: dCor 0.88
  # without, 0.74 with (training accuracy 0.95); the test asks for a drop of at least 0.08.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 12)).astype(np.float32))
  y = (x[:, 0] > 0).astype(jnp.int32)

  def trained_dcor(client_loss):
    sl = sljax.vanilla(MLP, client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2),
                       client_loss=client_loss)

    @jax.jit
    def train(state):
      state, metrics = jax.lax.scan(lambda s, i: sl.step(s, (x, y), jax.random.fold_in(jax.random.key(1), i)),
                                    state, jnp.arange(25))
      smashed, _ = MLP.client.apply(state.client.params, state.client.model_state, x, key=None, train=False)
      return distance_correlation(x, smashed), metrics

    dcor, metrics = train(sl.init(jax.random.key(0), x))
    return float(dcor), metrics

  plain, _ = trained_dcor(None)
  penalised, metrics = trained_dcor(defenses.nopeek(alpha=2.0))
  assert penalised < plain - 0.08, (plain, penalised)
  assert float(metrics["accuracy"][-1]) > 0.9  # still learns the task
  assert 0 < float(metrics["client_loss"][-1]) <= 2.0  # alpha * dCor, reported by the client


# ---------------------------------------------------------------------------------------------
# Label protection on the cut gradient.


def test_max_norm_equalises_expected_gradient_norms():
  g = np.asarray(jax.random.normal(jax.random.key(0), (8, 16))) * np.arange(1.0, 9.0)[:, None]
  draws = jax.jit(jax.vmap(lambda k: defenses.max_norm()(g, jnp.zeros(8, jnp.int32), k)))
  out = np.asarray(draws(jax.random.split(jax.random.key(1), 4000)), np.float64)
  sq_norms = np.sum(np.square(out), axis=-1)  # (draws, rows)
  sq = np.sum(np.square(g.astype(np.float64)), axis=-1)
  largest = int(np.argmax(sq))
  np.testing.assert_allclose(out[:, largest], np.broadcast_to(g[largest], (4000, 16)), rtol=1e-6)
  # |g_b (1 + s z)|^2 = |g_b|^2 (1 + s z)^2 has mean max|g|^2 and variance |g_b|^4 (4 s^2 + 2 s^4): the
  # mean of 4000 draws lies within 6 standard errors of max|g|^2 (false failure below 1e-8 per row, CLT).
  s2 = sq.max() / sq - 1
  stderr = sq * np.sqrt((4 * s2 + 2 * s2**2) / 4000)
  assert np.all(np.abs(sq_norms.mean(0) - sq.max()) <= 6 * stderr + 1e-3), (sq_norms.mean(0), sq.max())


def test_marvell_solver_matches_a_general_constrained_optimiser():
  # Marvell's objective (Li et al. 2022), written out again here in numpy, |mean_1 - mean_0| = 1:
  # KL(N0 || N1) + KL(N1 || N0) for N_k = N(mean_k, variance along the difference, variance across).
  def objective(lams, u, v, d):
    lam10, lam20, lam11, lam21 = lams
    along = (lam10 + u + 1) / (lam11 + v) + (lam11 + v + 1) / (lam10 + u)
    across = (lam20 + u) / (lam21 + v) + (lam21 + v) / (lam20 + u)
    return 0.5 * ((d - 1) * across + along) - d

  solve = jax.jit(defenses._marvell_variances, static_argnums=2)
  for u, v, d, p, power in ((0.3, 1.2, 16, 0.1, 2.0), (2.0, 0.5, 4, 0.6, 0.7)):
    lam10, lam20, lam11, lam21, kl = (float(t) for t in solve(u, v, d, p, power))
    assert p * (lam11 + (d - 1) * lam21) + (1 - p) * (lam10 + (d - 1) * lam20) == pytest.approx(power, rel=1e-4)
    assert kl == pytest.approx(objective((lam10, lam20, lam11, lam21), u, v, d), rel=1e-5)

    constraint = {"type": "eq", "fun": lambda l, p=p, d=d, power=power: (
        p * (l[2] + (d - 1) * l[3]) + (1 - p) * (l[0] + (d - 1) * l[1]) - power)}
    best = min(optimize.minimize(objective, np.full(4, power / d) * w, args=(u, v, d), constraints=[constraint],
                                 method="SLSQP", bounds=[(0, None)] * 4).fun
               for w in (np.array([1, 1, 1, 1]), np.array([4, 0.1, 4, 0.1])))
    assert kl <= best + 1e-3 * abs(best)


def test_max_norm_and_marvell_reduce_norm_leakage_auc():
  # An imbalanced binary task (positive rate 0.09). Train vanilla SL undefended, then score the
  # per-example norms of the cut gradients of 8 batches of 128 (Li et al.'s norm attack).
  # Measured mean AUC: undefended 0.99, max-norm 0.55, Marvell (sum_kl_bound 0.25) 0.54.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1024, 10)).astype(np.float32)
  y = (x[:, 0] + 0.5 * rng.normal(size=1024) > 1.3).astype(np.int32)
  xb, yb = jnp.asarray(x).reshape(8, 128, 10), jnp.asarray(y).reshape(8, 128)
  sl = _vanilla()

  transforms = {"max_norm": defenses.max_norm(), "marvell": defenses.marvell(sum_kl_bound=0.25)}

  @jax.jit
  def gradient_norms(state):
    def body(state, i):
      return sl.step(state, (xb[i % 8], yb[i % 8]), jax.random.fold_in(jax.random.key(1), i))
    state, _ = jax.lax.scan(body, state, jnp.arange(16))

    def gradient(xs, ys, key):
      up, _ = sl.client_forward(state.client, xs, ys, key)
      return sl.server_step(state.server, up, key)[1].grad
    g = jax.vmap(gradient)(xb, yb, jax.random.split(jax.random.key(2), 8))
    keys = jax.random.split(jax.random.key(3), 8)
    defended = {name: jax.vmap(t)(g, yb, keys) for name, t in transforms.items()}
    return jax.tree.map(lambda a: jnp.linalg.norm(a, axis=-1), {"undefended": g, **defended})

  norms = gradient_norms(sl.init(jax.random.key(0), xb[0]))
  auc = {name: np.mean([roc_auc_score(yb[i], n[i]) for i in range(8)]) for name, n in norms.items()}
  assert auc["undefended"] >= 0.95, auc
  assert auc["max_norm"] <= 0.65, auc
  assert auc["marvell"] <= 0.65, auc


# ---------------------------------------------------------------------------------------------
# Randomized response.


def test_randomized_response_flips_at_the_claimed_rate():
  # 40000 labels of class 1 out of 4, epsilon 1: kept with probability e / (e + 3), each other class
  # with (1 - keep) / 3. Each frequency lies within 5 binomial standard errors (false failure < 3e-6).
  n, k = 40000, 4
  y = jnp.ones((n,), jnp.int32)
  noisy = np.asarray(defenses.randomized_response(y, jax.random.key(0), epsilon=1.0, num_classes=k))
  keep = defenses.randomized_response_keep_probability(epsilon=1.0, num_classes=k)
  assert keep == pytest.approx(math.e / (math.e + 3))
  expected = np.array([(1 - keep) / 3, keep, (1 - keep) / 3, (1 - keep) / 3])
  frequencies = np.bincount(noisy, minlength=k) / n
  assert np.all(np.abs(frequencies - expected) <= 5 * np.sqrt(expected * (1 - expected) / n)), frequencies
  assert noisy.dtype == np.int32


# ---------------------------------------------------------------------------------------------
# Inside a jitted multi-client algorithm, with the budget in the records.


def test_defenses_run_inside_a_jitted_algorithm_and_the_budget_is_recorded():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 12)).astype(np.float32)
  y = (x[:, 0] > 0.8).astype(np.int32)
  data = sljax.data.stack_clients(x, y, sljax.data.iid(y, num_clients=2, seed=0))
  # Parallel SL (one server step on all clients; the cut-gradient defenses run jitted in the AUC test).
  sl = _vanilla(uplink=codecs.chain(defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=1.0), codecs.cast(
      dtype=jnp.bfloat16)), client_loss=defenses.nopeek(alpha=0.1))
  config = sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=16)  # 32 rows each: a release per 2 rounds
  algo = sljax.algorithms.parallel_sl(sl, config)
  acct = accounting.accountant(sl, config, num_examples=data.count, delta=1e-5)
  start = algo.init(jax.random.key(0), data)
  state, records = sljax.simulation.run(algo, start, data, rounds=3, accountant=acct, donate=False)
  assert [r["dp_epsilon"] for r in records] == [acct.epsilon(r) for r in (1, 2, 3)]
  assert records[0]["dp_epsilon"] < records[-1]["dp_epsilon"] and records[0]["dp_delta"] == 1e-5
  assert all(math.isfinite(r["train_batch_loss"]) for r in records)
  # With a target the run stops after the last round within it; a spent target is refused.
  target = accounting.accountant(sl, config, num_examples=data.count, delta=1e-5, target_epsilon=acct.epsilon(2))
  _, records = sljax.simulation.run(algo, start, data, rounds=3, accountant=target, donate=False)  # compiled once
  assert [r["round"] for r in records] == [1, 2]
  spent = accounting.accountant(sl, config, num_examples=data.count, delta=1e-5,
                                target_epsilon=acct.epsilon(1) / 2)
  with pytest.raises(ValueError, match=r"target_epsilon: the budget target_epsilon=.* is already spent at the start "
                                       r"\(round 3\): epsilon is .* now and would be .* after round 4"):
    sljax.simulation.run(algo, state, data, rounds=5, accountant=spent, donate=False)
  other = accounting.accountant(sl, sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=16, local_steps=2),
                                num_examples=32, delta=1e-5)
  with pytest.raises(ValueError, match=r"accountant: built for local_steps=2, but the algorithm takes local_steps=1"):
    sljax.simulation.run(algo, state, data, rounds=3, accountant=other, donate=False)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_arguments_get_errors_naming_them():
  with pytest.raises(ValueError, match=r"gaussian_noise: noise_multiplier must be > 0; got noise_multiplier=-1.0"):
    defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=-1.0)
  with pytest.raises(ValueError, match=r"laplace_noise: clip_norm must be a finite number > 0; got clip_norm=nan"):
    defenses.laplace_noise(clip_norm=float("nan"), noise_multiplier=1.0)
  with pytest.raises(ValueError, match=r"nopeek: alpha must be >= 0; got alpha=-0.1"):
    defenses.nopeek(alpha=-0.1)
  with pytest.raises(ValueError, match=r"marvell: power_scale must be > 0; got power_scale=0"):
    defenses.marvell(power_scale=0)
  with pytest.raises(TypeError):
    defenses.gaussian_noise(1.0, 1.0)  # keyword-only
  g = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"marvell: labels must be binary \(0 or 1\); got values \[0, 1, 2\]"):
    defenses.marvell()(g, jnp.array([0, 1, 2, 1]), jax.random.key(0))
  with pytest.raises(ValueError, match=r"marvell: labels must be a \(B,\) vector of binary class labels 0/1; got "
                                       r"shape \(4, 2\) float32"):
    defenses.marvell()(g, jnp.ones((4, 2)), jax.random.key(0))
  # Inside jit the values are unknown at trace time: a non-binary batch gets a NaN gradient.
  out = jax.jit(defenses.marvell())(g, jnp.array([0, 1, 2, 1]), jax.random.key(0))
  assert bool(jnp.all(jnp.isnan(out)))
  with pytest.raises(ValueError, match=r"randomized_response: epsilon must be > 0; got epsilon=0"):
    defenses.randomized_response(jnp.zeros(3, jnp.int32), jax.random.key(0), epsilon=0, num_classes=2)
  with pytest.raises(ValueError, match=r"randomized_response: num_classes must be an int >= 2; got num_classes=1"):
    defenses.randomized_response(jnp.zeros(3, jnp.int32), jax.random.key(0), epsilon=1.0, num_classes=1)
  with pytest.raises(ValueError, match=r"randomized_response: labels must lie in \[0, 2\) for num_classes=2; got "
                                       r"values from 0 to 5"):
    defenses.randomized_response(jnp.array([0, 5]), jax.random.key(0), epsilon=1.0, num_classes=2)
  config = sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=8)
  noisy = _vanilla(uplink=defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=1.0))
  with pytest.raises(ValueError, match=r"sl: the uplink codec adds no noise to account for"):
    accounting.accountant(_vanilla(uplink=codecs.clip(max_norm=1.0)), config, num_examples=32, delta=1e-5)
  with pytest.raises(ValueError, match=r"delta: expected a number in \(0, 1\), got 0"):
    accounting.accountant(noisy, config, num_examples=32, delta=0)
  with pytest.raises(ValueError, match=r"target_epsilon: expected a finite number > 0 or None, got -1"):
    accounting.accountant(noisy, config, num_examples=32, delta=1e-5, target_epsilon=-1)
  with pytest.raises(ValueError, match=r"num_examples: expected one count or 2 \(config.num_clients\), got 3"):
    accounting.accountant(noisy, config, num_examples=[4, 4, 4], delta=1e-5)
  with pytest.raises(ValueError, match=r"adjacency: expected one of \('zero_out', 'replace_one'\), got 'add'"):
    accounting.accountant(noisy, config, num_examples=32, delta=1e-5, adjacency="add")
