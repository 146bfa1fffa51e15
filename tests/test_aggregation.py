"""Robust aggregation for the averaging algorithms: each aggregator against a numpy reference, and
one poisoning client that moves FedAvg's mean without bound but not the robust aggregators'."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax.algorithms import ScheduleConfig, aggregation as agg

RNG = np.random.default_rng(0)
STACKED = {"w": RNG.normal(size=(7, 3, 2)).astype(np.float32), "b": RNG.normal(size=(7, 4)).astype(np.float32),
           "count": np.arange(7, dtype=np.int32)}
WEIGHTS = np.array([1.0, 2.0, 0.0, 1.0, 3.0, 0.0, 1.0], np.float32)
PRESENT = WEIGHTS > 0


def test_aggregators_equal_their_numpy_definitions_over_the_clients_present():
  poisoned = {**STACKED, "w": STACKED["w"].copy()}
  poisoned["w"][2] = np.nan  # an absent client's NaN is left out by all of them
  for name, tree in (("w", poisoned["w"]), ("b", STACKED["b"])):
    present = tree[PRESENT]
    expected_mean = np.tensordot(WEIGHTS[PRESENT] / WEIGHTS.sum(), present, axes=1)
    np.testing.assert_allclose(agg.mean()(poisoned, WEIGHTS)[name], expected_mean, rtol=1e-6)
    np.testing.assert_allclose(agg.median()(poisoned, WEIGHTS)[name], np.median(present, axis=0), rtol=1e-6)
    ranked = np.sort(present, axis=0)  # 5 present: trimming 0.2 drops one at each end
    np.testing.assert_allclose(agg.trimmed_mean(0.2)(poisoned, WEIGHTS)[name], ranked[1:-1].mean(0), rtol=1e-6)
  assert agg.median()(poisoned, WEIGHTS)["count"] == 0  # integer leaves: client 0's, as FedAvg


def test_centered_clipping_stays_within_its_radius_of_the_median_and_ignores_a_non_finite_client():
  tree = {"w": STACKED["w"].copy()}
  tree["w"][0] = 1e30
  tree["w"][1] = np.inf
  radius = 0.3
  out = agg.centered_clipping(radius)(tree, WEIGHTS)["w"]
  center = np.median(tree["w"][PRESENT], axis=0)
  assert np.all(np.isfinite(out))
  assert np.linalg.norm(out - center) <= radius + 1e-5
  # clients already within the radius are averaged as they are
  near = {"w": center[None] + 0.01 * STACKED["w"]}
  np.testing.assert_allclose(agg.centered_clipping(radius)(near, WEIGHTS)["w"], agg.mean()(near, WEIGHTS)["w"],
                             rtol=1e-5, atol=1e-7)


def _fedavg_params(aggregation):
  """FedAvg's params after 3 rounds, with honest clients and with client 0 poisoning (one program)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(160, 6)).astype(np.float32)
  y = np.argmax(x[:, :3], 1).astype(np.int32)
  parts = np.array_split(np.arange(160), 5)
  poisoned = x.copy()
  poisoned[parts[0]] *= 1e4  # one client's gradients 10^4 times too large
  central = sljax.centralized(sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=3), 1), optimizer=optax.sgd(0.5))
  algo = sljax.algorithms.fedavg(central, ScheduleConfig(num_clients=5, batch_size=8, local_steps=2),
                                 aggregation=aggregation)
  round_ = jax.jit(algo.round)
  out = []
  for features in (x, poisoned):
    data = sljax.data.stack_clients(features, y, parts)
    state = algo.init(jax.random.key(0), data)
    for _ in range(3):
      state, _ = round_(state, data)
    out.append(jax.tree.leaves(state.clients.params))
  return out


@pytest.mark.parametrize("aggregation", [agg.mean(), agg.median(), agg.trimmed_mean(0.2), agg.centered_clipping(0.5)],
                         ids=lambda a: a.name)
def test_one_poisoning_client_moves_the_mean_without_bound_but_not_a_robust_aggregate(aggregation):
  honest, poisoned = _fedavg_params(aggregation)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(honest, poisoned))
  if aggregation.name == "mean":
    assert moved > 1e6
  else:
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in poisoned)
    assert moved < 0.5


def test_bad_aggregation_arguments_get_clear_errors():
  with pytest.raises(ValueError, match=r"fraction: expected a share in \[0, 0.5\) trimmed at each end, got 0.5"):
    agg.trimmed_mean(0.5)
  with pytest.raises(ValueError, match=r"radius: expected a positive clipping radius, got 0"):
    agg.centered_clipping(0)
  central = sljax.centralized(sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=3), 1), optimizer=optax.sgd(0.5))
  with pytest.raises(TypeError, match=r"aggregation: expected an aggregator .* got str"):
    sljax.algorithms.fedavg(central, ScheduleConfig(num_clients=2, batch_size=4), aggregation="median")


def test_the_aggregation_examples_run():
  runner = doctest.DocTestRunner()
  for test in doctest.DocTestFinder().find(agg):
    runner.run(test)
  assert runner.summarize(verbose=False).failed == 0
