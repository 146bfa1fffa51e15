"""The synthetic predictive-maintenance generator (sljax.data.make_maintenance): seeded, shaped for
stack_clients, heterogeneous across factories, and learnable from its physical signatures."""

import doctest

import numpy as np
import pytest

import sljax
from sljax.data import maintenance


def _features(x):
  """Three physical features: the radial 1x peak (imbalance), the resonance band's energy (bearing
  impacts) and the temperature's rise over the window (overheating)."""
  length = x.shape[1]
  spectrum = np.abs(np.fft.rfft(x[..., 0] - x[..., 0].mean(1, keepdims=True), axis=1))
  freq = np.arange(spectrum.shape[1]) / length  # cycles per reading
  quarter = length // 4
  return np.stack([np.log(spectrum[:, freq < 0.1].max(1)), np.log((spectrum[:, freq > 0.2] ** 2).sum(1)),
                   x[:, -quarter:, 2].mean(1) - x[:, :quarter, 2].mean(1)], axis=1)


def _nearest_centroid_accuracy(x_train, y_train, x_test, y_test):
  a, b = _features(x_train), _features(x_test)
  mean, std = a.mean(0), a.std(0)
  a, b = (a - mean) / std, (b - mean) / std
  classes = np.unique(y_train)
  centroids = np.stack([a[y_train == c].mean(0) for c in classes])
  return (classes[np.argmin(((b[:, None] - centroids) ** 2).sum(-1), axis=1)] == y_test).mean()


def test_seeded_shapes_and_dtypes():
  a = sljax.data.make_maintenance(num_factories=3, samples_per_factory=[50, 80, 120], length=64, seed=1)
  b = sljax.data.make_maintenance(num_factories=3, samples_per_factory=[50, 80, 120], length=64, seed=1)
  c = sljax.data.make_maintenance(num_factories=3, samples_per_factory=[50, 80, 120], length=64, seed=2)
  for xa, xb, xc in zip(a.xs_train + a.xs_test, b.xs_train + b.xs_test, c.xs_train + c.xs_test, strict=True):
    np.testing.assert_array_equal(xa, xb)
    assert xa.shape == xc.shape and not np.array_equal(xa, xc)
  for ya, yb in zip(a.ys_train + a.ys_test, b.ys_train + b.ys_test, strict=True):
    np.testing.assert_array_equal(ya, yb)
  assert [len(y) for y in a.ys_train] == [40, 64, 96] and [len(y) for y in a.ys_test] == [10, 16, 24]
  assert all(x.dtype == np.float32 and x.shape[1:] == (64, 3) and np.isfinite(x).all() for x in a.xs_train)
  assert all(y.dtype == np.int32 and y.min() >= 0 and y.max() < 4 for y in a.ys_train + a.ys_test)
  assert a.x_test.shape == (50, 64, 3) and a.factory_test.tolist() == [0] * 10 + [1] * 16 + [2] * 24
  assert a.classes == ("healthy", "bearing_wear", "imbalance", "overheating") and a.num_classes == 4
  assert a.class_probs.shape == (3, 4) and a.speeds.shape == (3, 5)
  pooled = a.pooled()
  assert pooled.x_train.shape == (200, 64, 3) and pooled.num_classes == 4
  clients = sljax.data.stack_clients(a.xs_train, a.ys_train)  # the natural partition: one client per factory
  assert clients.x.shape == (3, 96, 64, 3) and clients.count.tolist() == [40, 64, 96]


def test_factories_differ_in_sensors_and_fault_rates():
  data = sljax.data.make_maintenance(num_factories=4, samples_per_factory=400, length=64, label_skew=0.5, seed=0)
  # Each factory's class mix is its own, and its windows follow it.
  assert np.abs(data.class_probs[:, None] - data.class_probs[None]).sum(-1).max() > 0.5
  for probs, y_train, y_test in zip(data.class_probs, data.ys_train, data.ys_test, strict=True):
    counts = np.bincount(np.concatenate([y_train, y_test]), minlength=4)
    assert np.abs(counts / counts.sum() - probs).max() < 0.1
  # Sensor calibration and ambient temperature: the factories' channel means lie far apart for the
  # spread of the means of random halves of one factory.
  means = np.array([x.mean(axis=(0, 1)) for x in data.xs_train])
  assert np.ptp(means, axis=0).min() > 0.3
  half = data.xs_train[0][: len(data.xs_train[0]) // 2].mean(axis=(0, 1))
  assert np.abs(half - means[0]).max() < 0.1
  # A large label_skew gives nearly the same mix everywhere.
  iid = sljax.data.make_maintenance(num_factories=4, samples_per_factory=100, length=32, label_skew=1e4, seed=0)
  assert np.abs(iid.class_probs - iid.class_probs.mean(0)).max() < 0.03


def test_classes_learnable_from_their_signatures():
  data = sljax.data.make_maintenance(num_factories=4, samples_per_factory=300, length=64, seed=0)
  # Every class occurs, none overwhelms.
  shares = np.bincount(np.concatenate(data.ys_train), minlength=4) / sum(len(y) for y in data.ys_train)
  assert shares.min() > 0.1 and shares.max() < 0.5
  # Three physical features and a nearest-centroid rule, within each factory: far above the majority class.
  for x_train, y_train, x_test, y_test in zip(data.xs_train, data.ys_train, data.xs_test, data.ys_test, strict=True):
    majority = np.bincount(y_test).max() / len(y_test)
    assert _nearest_centroid_accuracy(x_train, y_train, x_test, y_test) > max(0.8, majority + 0.3)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_factories": 0}, r"^num_factories: expected an int >= 1, got 0$"),
    ({"machines_per_factory": 1.5}, r"^machines_per_factory: expected an int >= 1, got 1.5$"),
    ({"length": 16}, r"^length: expected an int >= 32, got 16$"),
    ({"label_skew": 0.0}, r"^label_skew: expected a finite number > 0, got 0.0$"),
    ({"test_fraction": 1.0}, r"^test_fraction: expected a share in \(0, 1\), got 1.0$"),
    ({"num_factories": 2, "samples_per_factory": [10, 10, 10]},
     r"^samples_per_factory: expected an int or 2 ints \(one per factory\), got \[10, 10, 10\]$"),
    ({"samples_per_factory": 2},
     r"^samples_per_factory: expected enough windows per factory for non-empty train and test sets at "
     r"test_fraction=0.2, got 2$"),
])
def test_bad_arguments_name_themselves(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sljax.data.make_maintenance(**kwargs)


def test_docstring_examples_run():
  runner = doctest.DocTestRunner()
  for test in doctest.DocTestFinder().find(maintenance):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 0
