"""Naturally partitioned populations (sljax.data.federated): deterministic, sizes that follow the
requested power law, no empty client, per-client label skew, the shapes and dtypes of a ClientStore."""

import numpy as np
import pytest

from sljax import data
from sljax.population import ClientStore


def test_sizes_follow_the_capped_power_law():
  sizes = data.power_law_sizes(200_000, min_size=2, max_size=64, exponent=1.0, seed=0)
  assert sizes.dtype == np.int64 and sizes.min() == 2 and sizes.max() == 64
  for s in (3, 4, 8, 16, 32, 64):  # P(size >= s) = (s / min_size)^-exponent up to the cap
    assert abs(np.mean(sizes >= s) - 2 / s) < 0.005, s
  # E[size] = sum over s >= 1 of P(size >= s) = 2 + sum_{s=3}^{64} 2 / s; the total follows
  expected_mean = 2 + sum(2 / s for s in range(3, 65))
  assert abs(sizes.sum() / (len(sizes) * expected_mean) - 1) < 0.01
  assert sizes.max() / np.median(sizes) >= 16  # heavy-tailed: the largest client 16x or more the median
  lighter = data.power_law_sizes(200_000, min_size=2, max_size=64, exponent=2.0, seed=0)
  assert abs(np.mean(lighter >= 8) - (8 / 2) ** -2) < 0.005
  np.testing.assert_array_equal(data.power_law_sizes(10, seed=3), data.power_law_sizes(10, seed=3))
  assert data.power_law_sizes(100, min_size=1, max_size=1, seed=0).tolist() == [1] * 100


def test_synthetic_population_is_deterministic_with_skewed_labels_and_shapes_of_a_client_store():
  store = data.federated_synthetic(num_clients=20_000, num_features=6, num_classes=4, label_alpha=0.1, seed=1)
  again = data.federated_synthetic(num_clients=20_000, num_features=6, num_classes=4, label_alpha=0.1, seed=1)
  other = data.federated_synthetic(num_clients=20_000, num_features=6, num_classes=4, label_alpha=0.1, seed=2)
  assert isinstance(store, ClientStore) and store.num_clients == 20_000
  for a, b in ((store.x, again.x), (store.y, again.y), (store.offsets, again.offsets)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(store.offsets, other.offsets)
  assert store.x.shape == (store.offsets[-1], 6) and store.x.dtype == np.float32
  assert store.y.dtype == np.int32 and store.y.min() == 0 and store.y.max() == 3
  np.testing.assert_array_equal(store.counts, data.power_law_sizes(20_000, seed=1))  # the law's sizes, none empty
  assert store.counts.min() >= 2

  def top_class_share(s):  # mean over clients of 32+ samples of their most frequent label's share
    big = np.flatnonzero(s.counts >= 32)
    return np.mean([np.bincount(s.y[s.offsets[k]:s.offsets[k + 1]], minlength=4).max() / s.counts[k] for k in big])

  uniform = data.federated_synthetic(num_clients=20_000, num_features=6, num_classes=4, label_alpha=None, seed=1)
  assert top_class_share(store) > 0.75 and top_class_share(uniform) < 0.45  # skewed vs. about 1/4 each


def test_clients_draw_inputs_from_their_own_distribution():
  kw = dict(num_clients=2_000, num_features=8, num_classes=2, min_size=40, max_size=40, label_alpha=None, seed=0)

  def spread_of_client_means(store):  # per feature, the spread of the clients' input means
    return store.x.reshape(2_000, 40, 8).mean(1).std(0).mean()

  alike, shifted = data.federated_synthetic(client_shift=0.0, **kw), data.federated_synthetic(client_shift=1.0, **kw)
  assert spread_of_client_means(alike) < 0.4 < spread_of_client_means(shifted)


def test_mnist1d_population():
  store = data.federated_mnist1d(num_clients=3_000, pool_size=200, client_shift=0.5, seed=0)
  assert store.x.shape[1:] == (40, 1) and store.x.dtype == np.float32 and store.y.dtype == np.int32
  assert store.num_clients == 3_000 and store.counts.min() >= 2 and 0 <= store.y.min() <= store.y.max() <= 9
  np.testing.assert_array_equal(store.counts, data.power_law_sizes(3_000, seed=0))


def test_bad_arguments_get_clear_errors():
  with pytest.raises(ValueError, match=r"exponent: expected a real number > 0, got 0"):
    data.power_law_sizes(10, exponent=0)
  with pytest.raises(ValueError, match=r"max_size: expected an integer >= 4, got 3"):
    data.power_law_sizes(10, min_size=4, max_size=3)
  with pytest.raises(ValueError, match=r"num_clients: expected an integer >= 1, got 0"):
    data.federated_synthetic(num_clients=0)
  with pytest.raises(ValueError, match=r"shift_rank: expected at most num_features=2, got 4"):
    data.federated_synthetic(num_clients=5, num_features=2)
  with pytest.raises(ValueError, match=r"label_alpha: expected a real number > 0 or None, got -1"):
    data.federated_synthetic(num_clients=5, label_alpha=-1)
  with pytest.raises(ValueError, match=r"client_shift: expected a real number >= 0, got -0.5"):
    data.federated_mnist1d(num_clients=5, client_shift=-0.5)
