"""Small data sets that need no download: bundled with scikit-learn or generated offline.

Every loader returns a `Dataset` of numpy arrays (float32 features, int32 labels) and is a pure
function of its arguments: the split into train and test is stratified and seeded by `seed`, and
features are scaled with training-set statistics only, so nothing leaks from the test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import os
import random

import numpy as np

from sljax.data.partition import _apportion


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test split of a classification data set.

  Attributes:
    x_train: float32 features, shape (N_train, *feature_shape).
    y_train: int32 labels in [0, num_classes), shape (N_train,).
    x_test: float32 features, shape (N_test, *feature_shape).
    y_test: int32 labels in [0, num_classes), shape (N_test,).
    num_classes: number of classes.
    name: a short name for logs and metrics.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str

  def __repr__(self) -> str:
    return (
        f"Dataset(name={self.name!r}, num_classes={self.num_classes}, "
        f"x_train={self.x_train.shape}, x_test={self.x_test.shape})")


def from_arrays(
    x,
    y,
    *,
    test_fraction: float,
    seed: int,
    num_classes: int | None = None,
    name: str = "arrays",
) -> Dataset:
  """Makes a `Dataset` from user arrays with a seeded, stratified train/test split.

  Each class contributes to the test set in proportion to its size (largest remainder), so the
  test set has `round(test_fraction * N)` samples and the class balance of the whole. Both sets
  are shuffled. Features are cast to float32, not rescaled.

  Args:
    x: finite numeric features, shape (N, *feature_shape).
    y: integer labels in [0, num_classes), shape (N,).
    test_fraction: share of the samples held out, in (0, 1); both sets must be non-empty.
    seed: seed of the numpy generator that draws the split.
    num_classes: number of classes; by default `max(y) + 1`.
    name: the data set's name.

  Returns:
    The split data set.

  Example:
    >>> ds = from_arrays(np.ones((10, 3)), np.arange(10) % 2, test_fraction=0.2, seed=0)
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((8, 3), (2, 3), 2)
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim < 2 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(
        f"x must be a real array of shape (num_samples, *features), got shape {x.shape} and "
        f"dtype {x.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"x must be finite, got {np.size(x) - np.isfinite(x).sum()} NaN or inf values")
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must be a 1-D integer array, got shape {y.shape} and dtype {y.dtype}")
  if len(x) != len(y):
    raise ValueError(
        f"x and y must hold the same number of samples, got x.shape={x.shape} and y.shape={y.shape}")
  if len(y) and y.min() < 0:
    raise ValueError(f"y must hold labels >= 0, got min(y)={y.min()}")
  if num_classes is None:
    num_classes = int(y.max()) + 1 if len(y) else 0
  elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise ValueError(f"num_classes must be an integer, got num_classes={num_classes!r}")
  elif len(y) and y.max() >= num_classes:
    raise ValueError(f"y must hold labels < num_classes={num_classes}, got max(y)={y.max()}")
  num_test = round(test_fraction * len(y)) if 0 < test_fraction < 1 else 0
  if not 0 < num_test < len(y):
    raise ValueError(
        f"test_fraction must leave both sets non-empty for {len(y)} samples, got "
        f"test_fraction={test_fraction}")

  rng = np.random.default_rng(seed)
  class_sizes = np.bincount(y, minlength=num_classes)
  test_per_class = _apportion(num_test, class_sizes)
  is_test = np.zeros(len(y), bool)
  for c in np.flatnonzero(test_per_class):
    is_test[rng.choice(np.flatnonzero(y == c), test_per_class[c], replace=False)] = True
  train, test = rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))
  x, y = x.astype(np.float32), y.astype(np.int32)
  return Dataset(x[train], y[train], x[test], y[test], int(num_classes), name)


def load_digits(*, seed: int = 0, test_fraction: float = 0.2, image: bool = True) -> Dataset:
  """The 1,797 8x8 handwritten digits bundled with scikit-learn, pixels scaled to [0, 1].

  Args:
    seed: seed of the train/test split.
    test_fraction: share of the samples held out.
    image: if True, features have shape (8, 8, 1) for convolutions; else (64,).

  Returns:
    A 10-class `Dataset` named "digits".

  Example:
    >>> load_digits().x_train.shape
    (1438, 8, 8, 1)
  """
  x, y = _digits_arrays()
  x = x / 16.0  # Pixels are integers in [0, 16].
  if image:
    x = x.reshape(-1, 8, 8, 1)
  return from_arrays(x, y, test_fraction=test_fraction, seed=seed, num_classes=10, name="digits")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """`sklearn.datasets.load_digits(return_X_y=True)`, read straight from the file scikit-learn
  bundles: importing scikit-learn takes 1 to 5 s, more than the rest of `sljax serve`'s start-up
  with a warm compilation cache; reading the file takes 0.07 s."""
  spec = importlib.util.find_spec("sklearn")
  roots = (spec.submodule_search_locations or []) if spec is not None else []
  path = os.path.join(roots[0], "datasets", "data", "digits.csv.gz") if roots else None
  if path is None or not os.path.exists(path):  # another layout: ask scikit-learn
    from sklearn import datasets

    return datasets.load_digits(return_X_y=True)
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",")  # 64 pixels, then the label, per row
  return table[:, :-1], table[:, -1].astype(int)


def load_breast_cancer(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """Wisconsin breast cancer (569 samples, 30 features, 2 classes), standardized.

  Args:
    seed: seed of the train/test split.
    test_fraction: share of the samples held out.

  Returns:
    A 2-class `Dataset` named "breast_cancer", features standardized with training statistics.

  Example:
    >>> ds = load_breast_cancer()
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((455, 30), (114, 30), 2)
  """
  from sklearn import datasets

  x, y = datasets.load_breast_cancer(return_X_y=True)
  return _standardize(from_arrays(
      x, y, test_fraction=test_fraction, seed=seed, num_classes=2, name="breast_cancer"))


def load_wine(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """UCI wine (178 samples, 13 features, 3 classes), standardized.

  Args:
    seed: seed of the train/test split.
    test_fraction: share of the samples held out.

  Returns:
    A 3-class `Dataset` named "wine", features standardized with training statistics.

  Example:
    >>> ds = load_wine()
    >>> ds.x_train.shape[1], ds.num_classes, len(ds.x_train) + len(ds.x_test)
    (13, 3, 178)
  """
  from sklearn import datasets

  x, y = datasets.load_wine(return_X_y=True)
  return _standardize(from_arrays(
      x, y, test_fraction=test_fraction, seed=seed, num_classes=3, name="wine"))


def make_mnist1d(*, seed: int = 0, num_samples: int = 4000, test_fraction: float = 0.2) -> Dataset:
  """MNIST-1D (Greydanus, 2020), generated offline: 10 classes of length-40 signals.

  Uses `mnist1d.data.make_dataset`, never its downloader. Generation is pure numpy and takes about
  0.2 ms per sample on one CPU core (4,000 samples in under a second), linear in `num_samples`.
  mnist1d seeds Python's and numpy's global generators; their states are restored afterwards, so
  calling this does not disturb other random streams. The split is this module's stratified split,
  not mnist1d's own, and the signals are rescaled to zero mean and unit variance over the training
  set (one scalar mean and scale, which keeps the shape of each signal).

  Args:
    seed: seed of the generator and of the train/test split.
    num_samples: total samples, a positive multiple of 10 (the generator makes equal classes).
    test_fraction: share of the samples held out.

  Returns:
    A 10-class `Dataset` named "mnist1d", features of shape (40, 1): channel last, for 1-D
    convolutions.

  Example:
    >>> make_mnist1d(num_samples=100).x_train.shape
    (80, 40, 1)
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10 or (
      num_samples % 10):
    raise ValueError(f"num_samples must be a positive multiple of 10, got num_samples={num_samples!r}")
  from mnist1d import data as mnist1d_data  # Imported here: it pulls in `requests`.

  args = mnist1d_data.get_dataset_args()
  args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0  # We split below.
  with _restore_global_rngs():
    raw = mnist1d_data.make_dataset(args)
  ds = from_arrays(
      raw["x"][..., None], raw["y"], test_fraction=test_fraction, seed=seed, num_classes=10,
      name="mnist1d")
  mean, std = ds.x_train.mean(), ds.x_train.std()
  return dataclasses.replace(
      ds, x_train=(ds.x_train - mean) / std, x_test=(ds.x_test - mean) / std)


def make_synthetic(
    *,
    num_samples: int,
    num_features: int,
    num_classes: int,
    seed: int,
    num_informative: int | None = None,
    class_sep: float = 1.0,
    test_fraction: float = 0.2,
) -> Dataset:
  """Gaussian clusters, one per class, from `sklearn.datasets.make_classification`.

  The informative features carry the classes; the others are noise (no redundant features). 1% of
  the labels are flipped at random, as in scikit-learn's default.

  Args:
    num_samples: total number of samples.
    num_features: features per sample.
    num_classes: number of classes, <= 2 ** num_informative.
    seed: seed of the generator and of the split.
    num_informative: features that carry the classes, <= num_features; by default half the
      features, but at least ceil(log2(num_classes)).
    class_sep: distance between the class clusters; larger is easier.
    test_fraction: share of the samples held out.

  Returns:
    A `Dataset` named "synthetic" with features of shape (num_features,).

  Example:
    >>> make_synthetic(num_samples=100, num_features=8, num_classes=3, seed=0).x_test.shape
    (20, 8)
  """
  from sklearn import datasets

  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got num_classes={num_classes!r}")
  min_informative = max(1, int(np.ceil(np.log2(num_classes))))
  if num_informative is None:
    num_informative = max(num_features // 2, min_informative)
  if not min_informative <= num_informative <= num_features:
    raise ValueError(
        f"num_informative must lie between ceil(log2(num_classes={num_classes}))="
        f"{min_informative} and num_features={num_features}, got num_informative={num_informative}")
  x, y = datasets.make_classification(
      n_samples=num_samples, n_features=num_features, n_informative=num_informative,
      n_redundant=0, n_classes=num_classes, n_clusters_per_class=1, class_sep=class_sep,
      random_state=seed)
  return from_arrays(
      x, y, test_fraction=test_fraction, seed=seed, num_classes=num_classes, name="synthetic")


def _standardize(ds: Dataset) -> Dataset:
  """Scales each feature to zero mean and unit variance over the training set."""
  mean, std = ds.x_train.mean(axis=0), ds.x_train.std(axis=0)
  std = np.where(std > 0, std, 1.0).astype(np.float32)  # A constant feature stays as it is.
  return dataclasses.replace(
      ds, x_train=(ds.x_train - mean) / std, x_test=(ds.x_test - mean) / std)


@contextlib.contextmanager
def _restore_global_rngs():
  """Restores the global `random` and `np.random` states on exit."""
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    yield
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
