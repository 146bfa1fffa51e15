"""Tests of sljax.data: loaders, partitioners, stacked client data and in-jit batching."""

import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from sljax import data

# Imbalanced labels over 5 classes, so that partitioners meet unequal classes.
LABELS = np.random.default_rng(0).choice(5, size=400, p=[0.4, 0.25, 0.15, 0.1, 0.1])

PARTITIONERS = {
    "iid": lambda labels, seed: data.iid(labels, num_clients=7, seed=seed),
    "dirichlet": lambda labels, seed: data.dirichlet(labels, num_clients=7, alpha=0.3, seed=seed),
    "dirichlet_tiny_alpha": lambda labels, seed: data.dirichlet(
        labels, num_clients=40, alpha=0.01, seed=seed, min_size=3),
    "label_shards": lambda labels, seed: data.label_shards(
        labels, num_clients=7, shards_per_client=2, seed=seed),
    "quantity_skew": lambda labels, seed: data.quantity_skew(
        labels, num_clients=7, alpha=0.3, seed=seed),
}


def label_skew(labels, parts):
  """Mean total-variation distance between each client's label distribution and the global one."""
  overall = np.bincount(labels) / len(labels)
  return np.mean([
      0.5 * np.abs(np.bincount(labels[p], minlength=len(overall)) / len(p) - overall).sum()
      for p in parts])


# --- partitions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitioner_returns_a_partition(name):
  parts = PARTITIONERS[name](LABELS, 0)
  assert all(len(p) > 0 and np.issubdtype(p.dtype, np.integer) for p in parts)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitioner_is_seeded(name):
  first, again, other = (PARTITIONERS[name](LABELS, seed) for seed in (1, 1, 2))
  assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one():
  sizes = [len(p) for p in data.iid(LABELS, num_clients=7, seed=0)]
  assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_more_skewed():
  labels = np.repeat(np.arange(10), 100)
  skew = {alpha: np.mean([
      label_skew(labels, data.dirichlet(labels, num_clients=10, alpha=alpha, seed=s))
      for s in range(3)]) for alpha in (0.1, 1.0, 100.0)}
  # Measured: about 0.69, 0.32 and 0.04.
  assert skew[0.1] > 0.5 > skew[1.0] > 0.15 > skew[100.0]


def test_dirichlet_tops_up_small_clients():
  parts = data.dirichlet(np.repeat(np.arange(10), 100), num_clients=100, alpha=0.01, seed=0,
                         min_size=3)
  assert min(len(p) for p in parts) == 3


def test_label_shards_bounds_labels_per_client():
  for shards in (1, 2, 3):
    parts = data.label_shards(LABELS, num_clients=10, shards_per_client=shards, seed=0)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= shards


def test_label_shards_balanced_classes_give_equal_clients():
  labels = np.repeat(np.arange(10), 20)
  parts = data.label_shards(labels, num_clients=10, shards_per_client=2, seed=0)
  assert [len(p) for p in parts] == [20] * 10


def test_quantity_skew_small_alpha_spreads_sizes():
  spread = {alpha: np.std([len(p) for p in data.quantity_skew(
      LABELS, num_clients=10, alpha=alpha, seed=0, min_size=5)]) for alpha in (0.1, 100.0)}
  assert spread[0.1] > 3 * spread[100.0]
  parts = data.quantity_skew(LABELS, num_clients=10, alpha=0.05, seed=0, min_size=5)
  assert min(len(p) for p in parts) == 5


@pytest.mark.parametrize("call, match", [
    (lambda: data.iid(np.zeros(3, int), num_clients=5, seed=0),
     r"num_clients=5 clients .* need 5 samples, but there are only 3"),
    (lambda: data.iid(LABELS, num_clients=0, seed=0), r"num_clients must be a positive integer"),
    (lambda: data.iid(LABELS, num_clients=2.0, seed=0), r"num_clients=2.0"),
    (lambda: data.iid(np.zeros((4, 2), int), num_clients=2, seed=0),
     r"labels must be a 1-D integer array, got shape \(4, 2\)"),
    (lambda: data.dirichlet(np.zeros(4), num_clients=2, alpha=1.0, seed=0),
     r"labels must be a 1-D integer array, got shape \(4,\) and dtype float64"),
    (lambda: data.dirichlet(LABELS, num_clients=2, alpha=0.0, seed=0),
     r"alpha must be > 0, got alpha=0.0"),
    (lambda: data.dirichlet(LABELS, num_clients=2, alpha=-1, seed=0), r"alpha=-1"),
    (lambda: data.dirichlet(LABELS, num_clients=100, alpha=1.0, seed=0, min_size=5),
     r"min_size=5 samples each need 500 samples, but there are only 400"),
    (lambda: data.quantity_skew(LABELS, num_clients=2, alpha=0, seed=0), r"alpha must be > 0"),
    (lambda: data.label_shards(LABELS, num_clients=2, shards_per_client=2, seed=0),
     r"number of distinct labels \(5\) .* num_clients=2 \* shards_per_client=2 = 4"),
    (lambda: data.label_shards(np.arange(10) % 2, num_clients=6, shards_per_client=2, seed=0),
     r"number of samples \(10\), got num_clients=6 \* shards_per_client=2 = 12"),
    (lambda: data.label_shards(LABELS, num_clients=2, shards_per_client=0, seed=0),
     r"shards_per_client must be a positive integer, got shards_per_client=0"),
])
def test_partitioners_reject_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_vertical_split_by_parties_and_groups():
  x = np.arange(50.0).reshape(5, 10)
  parts = data.vertical_split(x, num_parties=3)
  assert [p.shape for p in parts] == [(5, 4), (5, 3), (5, 3)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), x)
  parts = data.vertical_split(jnp.asarray(x), feature_groups=[2, 8])
  assert [p.shape for p in parts] == [(5, 2), (5, 8)] and isinstance(parts[0], jax.Array)


def test_vertical_split_of_images_along_width():
  x = np.arange(2 * 4 * 6).reshape(2, 4, 6, 1)
  parts = data.vertical_split(x, num_parties=2, axis=2)
  assert [p.shape for p in parts] == [(2, 4, 3, 1)] * 2
  np.testing.assert_array_equal(np.concatenate(parts, axis=2), x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"exactly one of num_parties and feature_groups, got num_parties=None"),
    (dict(num_parties=2, feature_groups=[5, 5]), r"exactly one of num_parties and feature_groups"),
    (dict(num_parties=11), r"num_parties must be <= the number of features along axis 1 \(10\)"),
    (dict(num_parties=0), r"num_parties must be a positive integer, got num_parties=0"),
    (dict(feature_groups=[3, 3]), r"summing to the number of features .* \(10\), got feature_groups"),
    (dict(feature_groups=[0, 10]), r"feature_groups must be positive integers"),
    (dict(num_parties=2, axis=0), r"axis must index a feature axis of x .* got axis=0"),
    (dict(num_parties=2, axis=2), r"got axis=2"),
])
def test_vertical_split_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.vertical_split(np.zeros((5, 10)), **kwargs)


def test_vertical_split_rejects_1d_input():
  with pytest.raises(ValueError, match=r"x must have shape \(num_samples, \*features\).* \(5,\)"):
    data.vertical_split(np.zeros(5), num_parties=1)


# --- data sets ------------------------------------------------------------------------------------


def assert_valid_dataset(ds, feature_shape, num_classes):
  assert ds.x_train.shape[1:] == ds.x_test.shape[1:] == feature_shape
  assert ds.x_train.dtype == ds.x_test.dtype == np.float32
  assert ds.y_train.dtype == ds.y_test.dtype == np.int32
  assert ds.num_classes == num_classes
  assert set(np.unique(ds.y_train)) == set(np.unique(ds.y_test)) == set(range(num_classes))
  assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()


def test_load_digits():
  ds = data.load_digits()
  assert_valid_dataset(ds, (8, 8, 1), 10)
  assert (len(ds.y_train), len(ds.y_test)) == (1438, 359)
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  flat = data.load_digits(image=False)
  np.testing.assert_array_equal(flat.x_train, ds.x_train.reshape(-1, 64))
  # Stratified: each class is held out in proportion to its size.
  per_class = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
  assert np.all(np.abs(np.bincount(ds.y_test) - 0.2 * per_class) <= 1)


def test_load_digits_reads_scikit_learns_file_as_scikit_learn_does():
  # load_digits reads scikit-learn's bundled file itself (importing scikit-learn is slow).
  x, y = data.datasets._digits_arrays()
  raw_x, raw_y = sk_datasets.load_digits(return_X_y=True)
  np.testing.assert_array_equal(x, raw_x)
  np.testing.assert_array_equal(y, raw_y)
  assert (x.dtype, y.dtype) == (raw_x.dtype, raw_y.dtype)


def test_loaders_are_seeded():
  first, again, other = (data.load_digits(seed=s, image=False) for s in (3, 3, 4))
  np.testing.assert_array_equal(first.x_train, again.x_train)
  np.testing.assert_array_equal(first.y_test, again.y_test)
  assert not np.array_equal(first.y_train, other.y_train)


@pytest.mark.parametrize("load, raw, num_classes", [
    (data.load_breast_cancer, sk_datasets.load_breast_cancer, 2),
    (data.load_wine, sk_datasets.load_wine, 3),
])
def test_standardized_loaders_use_training_statistics(load, raw, num_classes):
  ds = load(seed=1)
  assert_valid_dataset(ds, raw().data.shape[1:], num_classes)
  np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-5)
  # The same split of the raw data, standardized by hand with training statistics only.
  plain = data.from_arrays(*raw(return_X_y=True), test_fraction=0.2, seed=1)
  mean, std = plain.x_train.mean(axis=0), plain.x_train.std(axis=0)
  np.testing.assert_allclose(ds.x_test, (plain.x_test - mean) / std, rtol=1e-5, atol=1e-5)


def test_make_mnist1d():
  np.random.seed(123)
  random.seed(123)
  np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
  ds = data.make_mnist1d(num_samples=200, seed=5)
  np.testing.assert_array_equal(np.random.get_state()[1], np_state)  # global RNGs undisturbed
  assert random.getstate() == py_state
  assert_valid_dataset(ds, (40, 1), 10)
  assert (len(ds.y_train), len(ds.y_test)) == (160, 40)
  np.testing.assert_allclose([ds.x_train.mean(), ds.x_train.std()], [0.0, 1.0], atol=1e-5)
  again, other = data.make_mnist1d(num_samples=200, seed=5), data.make_mnist1d(num_samples=200, seed=6)
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  assert not np.allclose(ds.x_train, other.x_train)


def test_make_mnist1d_rejects_bad_sizes():
  with pytest.raises(ValueError, match=r"positive multiple of 10, got num_samples=105"):
    data.make_mnist1d(num_samples=105)


def test_make_synthetic():
  ds = data.make_synthetic(num_samples=300, num_features=12, num_classes=4, seed=0)
  assert_valid_dataset(ds, (12,), 4)
  assert (len(ds.y_train), len(ds.y_test)) == (240, 60)
  again = data.make_synthetic(num_samples=300, num_features=12, num_classes=4, seed=0)
  np.testing.assert_array_equal(ds.x_test, again.x_test)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_features=2, num_classes=8), r"ceil\(log2\(num_classes=8\)\)=3 and num_features=2"),
    (dict(num_features=4, num_classes=3, num_informative=5), r"got num_informative=5"),
    (dict(num_features=4, num_classes=1), r"num_classes must be an integer >= 2, got num_classes=1"),
])
def test_make_synthetic_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.make_synthetic(num_samples=100, seed=0, **kwargs)


def test_from_arrays_splits_every_sample_once():
  x = np.arange(100.0)[:, None]
  y = (np.arange(100) % 3).astype(np.int64)
  ds = data.from_arrays(x, y, test_fraction=0.25, seed=0)
  ids = np.concatenate([ds.x_train[:, 0], ds.x_test[:, 0]]).astype(int)
  np.testing.assert_array_equal(np.sort(ids), np.arange(100))
  np.testing.assert_array_equal(np.concatenate([ds.y_train, ds.y_test]), y[ids])
  assert len(ds.y_test) == 25 and ds.num_classes == 3 and ds.name == "arrays"
  assert list(np.bincount(ds.y_test)) in ([9, 8, 8], [8, 9, 8], [8, 8, 9])


X, Y = np.zeros((4, 2)), np.zeros(4, int)


@pytest.mark.parametrize("x, y, kwargs, match", [
    (X, np.zeros(5, int), {}, r"same number of samples, got x.shape=\(4, 2\) and y.shape=\(5,\)"),
    (np.zeros(4), Y, {}, r"x must be a real array of shape \(num_samples, \*features\), got shape \(4,"),
    (np.full((4, 2), np.nan), Y, {}, r"x must be finite, got 8 NaN or inf values"),
    (X, np.zeros(4), {}, r"y must be a 1-D integer array, got shape \(4,\) and dtype float64"),
    (X, np.array([0, 1, -1, 0]), {}, r"y must hold labels >= 0, got min\(y\)=-1"),
    (X, np.array([0, 1, 2, 0]), dict(num_classes=2), r"labels < num_classes=2, got max\(y\)=2"),
    (X, Y, dict(test_fraction=1.0),
     r"test_fraction must leave both sets non-empty for 4 samples, got test_fraction=1.0"),
    (X, Y, dict(test_fraction=0.1), r"got test_fraction=0.1"),
])
def test_from_arrays_rejects_bad_input(x, y, kwargs, match):
  kwargs = dict(test_fraction=0.5, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    data.from_arrays(x, y, **kwargs)


# --- stacked client data and batches --------------------------------------------------------------

# Sizes cover: divisible by the batch size (8, 12), not divisible (10), smaller than a batch (3).
SIZES, BATCH = (8, 12, 10, 3), 4


def id_clients():
  """Clients whose sample ids are both the feature and the label, so batches show what was read."""
  parts = np.split(np.random.default_rng(0).permutation(sum(SIZES)), np.cumsum(SIZES)[:-1])
  ids = np.arange(sum(SIZES))
  return data.stack_clients(ids[:, None].astype(np.float32), ids, parts), parts


def test_stack_clients_pads_and_counts():
  x = np.random.default_rng(0).normal(size=(33, 2, 3)).astype(np.float32)
  y = np.arange(33)
  parts = data.iid(y, num_clients=4, seed=0)
  stacked = data.stack_clients(x, y, parts)
  assert stacked.x.shape == (4, 9, 2, 3) and stacked.y.shape == (4, 9)
  assert stacked.y.dtype == stacked.count.dtype == jnp.int32
  assert stacked.count.tolist() == [9, 8, 8, 8]
  for k, p in enumerate(parts):
    np.testing.assert_array_equal(stacked.x[k, :len(p)], x[p])
    np.testing.assert_array_equal(stacked.y[k, :len(p)], y[p])
    assert not np.any(stacked.x[k, len(p):])
  per_client = data.stack_clients([x[p] for p in parts], [y[p] for p in parts])
  chex.assert_trees_all_equal(per_client, stacked)


@pytest.mark.parametrize("args, match", [
    (([np.zeros((2, 2)), np.zeros((3, 3))], [np.zeros(2, int), np.zeros(3, int)]),
     r"client 1 has features of shape \(3,\), but client 0 has \(2,\)"),
    (([np.zeros((2, 2)), np.zeros((0, 2))], [np.zeros(2, int), np.zeros(0, int)]),
     r"client 1 has no samples"),
    (([np.zeros((2, 2))], [np.zeros(3, int)]), r"client 0 needs one integer label per sample"),
    ((np.zeros((5, 2)), np.zeros(5, int), [np.array([0, 5])]),
     r"parts\[0\] must index the 5 samples, got indices from 0 to 5"),
    ((np.zeros((5, 2)), np.zeros(5, int), [np.array([0.0])]),
     r"parts\[0\] must be a 1-D integer index array"),
    ((np.zeros((5, 2)), np.zeros(4, int), [np.array([0])]),
     r"same number of samples, got x.shape=\(5, 2\) and y.shape=\(4,\)"),
    ((np.zeros((5, 2)), np.zeros(5, int)),
     r"without parts, x and y must be lists .* got x of type ndarray"),
])
def test_stack_clients_rejects_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    data.stack_clients(*args)


def stream(clients, num_steps, key):
  """The labels (= sample ids) and masks each client reads over `num_steps` steps, (K, steps*B)."""
  batches = [data.client_batches(clients, t, batch_size=BATCH, key=key) for t in range(num_steps)]
  return np.concatenate([b[1] for b in batches], axis=1), np.concatenate([b[2] for b in batches], 1)


def test_client_batches_visit_every_row_once_per_epoch():
  clients, parts = id_clients()
  ids, mask = stream(clients, 9, jax.random.key(0))  # 36 positions: three epochs of 12
  for k, size in enumerate(SIZES[:3]):
    assert mask[k].all()
    epochs = [ids[k, e * size:(e + 1) * size] for e in range(36 // size)]
    for epoch in epochs:
      np.testing.assert_array_equal(np.sort(epoch), np.sort(parts[k]))
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order every epoch


def test_client_batches_small_client_reads_all_rows_once_per_batch():
  clients, parts = id_clients()
  for t in range(3):
    _, y, mask = data.client_batches(clients, t, batch_size=BATCH, key=jax.random.key(0))
    assert mask[3].tolist() == [True, True, True, False]
    np.testing.assert_array_equal(np.sort(y[3, :3]), np.sort(parts[3]))
    assert y[3, 3] == y[3, 0]  # filled by wrapping around


def test_client_batches_read_only_real_rows():
  clients, parts = id_clients()
  ids, _ = stream(clients, 7, jax.random.key(1))
  for k, p in enumerate(parts):
    assert set(ids[k]) <= set(p)


def test_client_batches_are_deterministic_and_keyed():
  clients, _ = id_clients()
  first, again = (data.client_batches(clients, 5, batch_size=BATCH, key=jax.random.key(7))
                  for _ in range(2))
  chex.assert_trees_all_equal(first, again)
  other = data.client_batches(clients, 5, batch_size=BATCH, key=jax.random.key(8))
  assert not np.array_equal(first[1], other[1])


def test_client_batches_jit_and_scan_match_eager():
  clients, _ = id_clients()
  key = jax.random.key(3)
  batches = jax.jit(data.client_batches, static_argnames="batch_size")
  for t in (0, 4, 11):
    chex.assert_trees_all_equal(
        batches(clients, t, batch_size=BATCH, key=key),
        data.client_batches(clients, t, batch_size=BATCH, key=key))
  _, scanned = jax.lax.scan(
      lambda c, t: (c, data.client_batches(clients, t, batch_size=BATCH, key=key)), None,
      jnp.arange(6))
  eager = [data.client_batches(clients, t, batch_size=BATCH, key=key) for t in range(6)]
  chex.assert_trees_all_equal(scanned, jax.tree.map(lambda *a: jnp.stack(a), *eager))


def test_client_batches_compile_once():
  clients, _ = id_clients()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def batches(clients, step, key):
    return data.client_batches(clients, step, batch_size=BATCH, key=key)

  shapes = {jax.tree.map(jnp.shape, batches(clients, jnp.int32(t), jax.random.key(t)))
            for t in range(5)}
  assert shapes == {((4, BATCH, 1), (4, BATCH), (4, BATCH))}


def test_client_batches_mask_empty_hand_built_client():
  clients, _ = id_clients()
  clients = clients.replace(count=clients.count.at[0].set(0))
  _, _, mask = data.client_batches(clients, 2, batch_size=BATCH, key=jax.random.key(0))
  assert not mask[0].any() and mask[1].all()


@pytest.mark.parametrize("step, batch_size, match", [
    (0, 0, r"batch_size must be a positive Python int, got batch_size=0"),
    (0, 2.0, r"got batch_size=2.0"),
    (1.5, 4, r"step must be an integer scalar, got shape \(\) and dtype float"),
    (jnp.arange(2), 4, r"step must be an integer scalar, got shape \(2,\)"),
])
def test_client_batches_reject_bad_input(step, batch_size, match):
  clients, _ = id_clients()
  with pytest.raises(ValueError, match=match):
    data.client_batches(clients, step, batch_size=batch_size, key=jax.random.key(0))
