"""Naturally partitioned populations of many clients, built offline, for population-scale runs.

Cross-device data sets (Stack Overflow, FEMNIST, Shakespeare) are partitioned by their users, not
split by a partitioner: client sizes follow a heavy-tailed law (many clients with a few samples, a
few with many) and every client sees its own mix of labels and its own style of inputs. The
generators here build such a population, of up to millions of clients, as a
`sljax.population.ClientStore` (every client's samples on the host, without padding), vectorized
over clients: no Python loop over clients, memory a small multiple of the data itself.

  * `power_law_sizes`: client sizes from a discrete Pareto (Zipf-like) law, capped.
  * `federated_synthetic`: a seeded Gaussian classification task whose clients differ in their
    label mix (Dirichlet label skew) and in an input shift of their own.
  * `federated_mnist1d`: MNIST-1D (Greydanus, 2020), generated offline, dealt to clients with the
    same sizes and label skew.

Every function is a pure function of its arguments (all randomness from
`np.random.default_rng(seed)`).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from sljax.population import ClientStore

_BLOCK = 65_536  # clients per block when adding means and shifts


def power_law_sizes(num_clients: int, *, min_size: int = 2, max_size: int = 64, exponent: float = 1.0,
                    seed: int = 0) -> np.ndarray:
  """Client sizes from a discrete Pareto (Zipf-like) law, capped at `max_size`.

  Size s = floor(min_size * U^(-1 / exponent)) with U uniform in (0, 1], then clipped to
  `max_size`, so P(size >= s) = (s / min_size)^-exponent for min_size <= s <= max_size: the
  share of clients with at least s samples falls as a power of s (a straight line on a log-log
  plot, as in cross-device data sets), half the clients hold at least min_size * 2^(1 / exponent), and a
  share (max_size / min_size)^-exponent of the clients holds exactly `max_size` samples. Smaller
  `exponent` means a heavier tail. The cap bounds what a round pads every participant to (the
  largest client: `ClientStore.gather`).

  Args:
    num_clients: number of clients, >= 1.
    min_size: fewest samples of a client, >= 1 (no client is empty).
    max_size: most samples of a client, >= min_size.
    exponent: the tail exponent (Pareto's alpha), > 0.
    seed: seed of the numpy generator.

  Returns:
    (num_clients,) int64 sizes in [min_size, max_size].

  Example:
    >>> sizes = power_law_sizes(100_000, min_size=2, max_size=64, exponent=1.0, seed=0)
    >>> int(sizes.min()), int(sizes.max()), round(float(np.mean(sizes >= 8)), 2)  # (8 / 2)^-1 of the clients
    (2, 64, 0.25)
  """
  _check_int("num_clients", num_clients, 1)
  _check_int("min_size", min_size, 1)
  _check_int("max_size", max_size, min_size)
  if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real) or not exponent > 0:
    raise ValueError(f"exponent: expected a real number > 0, got {exponent!r}")
  u = 1.0 - np.random.default_rng(seed).random(num_clients)  # in (0, 1]
  sizes = np.floor(min_size * u ** (-1.0 / float(exponent)))
  return np.minimum(sizes, max_size).astype(np.int64)  # min_size * u^(-1/a) >= min_size for u <= 1


def federated_synthetic(*, num_clients: int, num_features: int = 32, num_classes: int = 10, min_size: int = 2,
                        max_size: int = 64, exponent: float = 1.0, label_alpha: float | None = 0.5,
                        class_sep: float = 2.0, client_shift: float = 0.5, shift_rank: int = 4,
                        seed: int = 0) -> ClientStore:
  """A synthetic classification task split among `num_clients` clients, the way users split data.

  The task: class c has a mean mu_c ~ N(0, class_sep^2 / num_features I) in R^num_features
  (drawn from `seed`), and a sample of class c at client k is mu_c + s_k + N(0, I), where s_k is
  the client's own shift, s_k = B z_k with B a fixed (num_features, shift_rank) matrix of unit
  columns and z_k ~ N(0, client_shift^2 I): each client's inputs come from its own distribution
  (feature skew), in a low-rank subspace so that a million clients' shifts cost little. Client
  sizes follow `power_law_sizes`; each client's labels are drawn from its own class proportions
  p_k ~ Dir(label_alpha) (label skew; smaller is more skewed; None: every client draws labels
  uniformly).

  For evaluation, hold out clients: build one population and keep some of its clients out of
  training, or draw test samples from the same task with another call that differs only in
  `num_clients` (the task, mu and B, depends on `seed` and the shapes only).

  Args:
    num_clients: number of clients, >= 1.
    num_features: features per sample.
    num_classes: number of classes, >= 2.
    min_size, max_size, exponent: the law of client sizes (`power_law_sizes`).
    label_alpha: Dirichlet concentration of each client's class proportions, > 0, or None.
    class_sep: distance scale between class means; larger is easier.
    client_shift: scale of the clients' input shifts, >= 0 (0: every client draws inputs alike).
    shift_rank: dimension of the subspace of the shifts, 1 <= shift_rank <= num_features.
    seed: seed of the numpy generator.

  Returns:
    A `ClientStore` with float32 features of shape (num_features,) and int32 labels.

  Example:
    >>> store = federated_synthetic(num_clients=1000, num_features=8, num_classes=3, seed=0)
    >>> store.num_clients, store.x.shape[1:], store.x.dtype.name, int(store.counts.min()) >= 2
    (1000, (8,), 'float32', True)
  """
  _check_int("num_features", num_features, 1)
  _check_int("num_classes", num_classes, 2)
  _check_int("shift_rank", shift_rank, 1)
  if shift_rank > num_features:
    raise ValueError(f"shift_rank: expected at most num_features={num_features}, got {shift_rank}")
  _check_nonnegative("class_sep", class_sep)
  _check_nonnegative("client_shift", client_shift)
  sizes = power_law_sizes(num_clients, min_size=min_size, max_size=max_size, exponent=exponent, seed=seed)
  rng = np.random.default_rng([seed, 1])
  means = (rng.standard_normal((num_classes, num_features)) * (class_sep / np.sqrt(num_features))).astype(np.float32)
  basis = rng.standard_normal((num_features, shift_rank))
  basis = (basis / np.linalg.norm(basis, axis=0)).astype(np.float32)
  y = _skewed_labels(sizes, num_classes, label_alpha, rng)
  x = rng.standard_normal((len(y), num_features), dtype=np.float32)
  shifts = rng.standard_normal((num_clients, shift_rank), dtype=np.float32) * np.float32(client_shift)
  shifts = shifts @ basis.T  # (num_clients, num_features)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  # add each row's class mean and its client's shift a block of clients at a time (bounded temporaries;
  # np.take and np.repeat are several times faster than fancy indexing of rows)
  for start in range(0, num_clients, _BLOCK):
    stop = min(start + _BLOCK, num_clients)
    rows = slice(offsets[start], offsets[stop])
    x[rows] += np.take(means, y[rows], axis=0)
    if client_shift > 0:
      x[rows] += np.repeat(shifts[start:stop], sizes[start:stop], axis=0)
  return _store(x, y, sizes)


def federated_mnist1d(*, num_clients: int, pool_size: int = 10_000, min_size: int = 2, max_size: int = 64,
                      exponent: float = 1.0, label_alpha: float | None = 0.5, client_shift: float = 0.0,
                      seed: int = 0) -> ClientStore:
  """MNIST-1D (Greydanus, 2020) dealt to `num_clients` clients with power-law sizes and label skew.

  MNIST-1D is generated offline (`sljax.data.make_mnist1d`, which calls `mnist1d.data.make_dataset`,
  never its downloader) as a pool of `pool_size` samples (about 0.2 ms each to generate), and the
  pool's training split is dealt to the clients: sizes follow `power_law_sizes`, each client's
  labels its own proportions p_k ~ Dir(label_alpha), and each of its samples is a random pool sample
  of that label. A population larger than the pool repeats pool samples among clients (the pool's
  variety, not the population, bounds how much there is to learn); with `client_shift > 0` every
  client also adds an offset of its own, o_k ~ N(0, client_shift^2), to all its signals. The pool's
  test split, `make_mnist1d(seed=seed, num_samples=pool_size).x_test`, was never dealt: use it for
  evaluation.

  Args:
    num_clients: number of clients, >= 1.
    pool_size: samples generated, a positive multiple of 10; 20% are held out (the test split).
    min_size, max_size, exponent: the law of client sizes (`power_law_sizes`).
    label_alpha: Dirichlet concentration of each client's class proportions, > 0, or None (uniform).
    client_shift: scale of the clients' offsets, >= 0.
    seed: seed of the pool and of the deal.

  Returns:
    A `ClientStore` with float32 features of shape (40, 1) and int32 labels in [0, 10).

  Example:
    >>> store = federated_mnist1d(num_clients=500, pool_size=200, seed=0)
    >>> store.num_clients, store.x.shape[1:]
    (500, (40, 1))
  """
  from sljax.data.datasets import make_mnist1d

  _check_nonnegative("client_shift", client_shift)
  sizes = power_law_sizes(num_clients, min_size=min_size, max_size=max_size, exponent=exponent, seed=seed)
  pool = make_mnist1d(seed=seed, num_samples=pool_size)
  rng = np.random.default_rng([seed, 2])
  y = _skewed_labels(sizes, 10, label_alpha, rng)
  # sample i of label c is a random pool row of label c: pool rows sorted by label, then indexed
  order = np.argsort(pool.y_train, kind="stable")
  per_class = np.bincount(pool.y_train, minlength=10)
  if np.any(per_class == 0):
    raise ValueError(f"pool_size: expected a pool holding every class, got class counts {per_class.tolist()}")
  start = np.concatenate([[0], np.cumsum(per_class)[:-1]])
  rows = order[start[y] + (rng.random(len(y)) * per_class[y]).astype(np.int64)]
  x = pool.x_train[rows]
  if client_shift > 0:
    offsets = rng.standard_normal(num_clients, dtype=np.float32) * np.float32(client_shift)
    x += np.repeat(offsets, sizes)[:, None, None]
  return _store(x, y, sizes)


def _skewed_labels(sizes: np.ndarray, num_classes: int, label_alpha: float | None,
                   rng: np.random.Generator) -> np.ndarray:
  """Labels of every client's samples, client after client: client k's label counts are a
  multinomial draw of sizes[k] samples with its own class proportions (Dir(label_alpha))."""
  if label_alpha is None:
    probabilities = np.full((1, num_classes), 1.0 / num_classes)
  else:
    if isinstance(label_alpha, bool) or not isinstance(label_alpha, numbers.Real) or not label_alpha > 0:
      raise ValueError(f"label_alpha: expected a real number > 0 or None, got {label_alpha!r}")
    probabilities = rng.dirichlet(np.full(num_classes, float(label_alpha)), size=len(sizes))
  counts = rng.multinomial(sizes, probabilities)  # (num_clients, num_classes), rows sum to sizes
  labels = np.repeat(np.tile(np.arange(num_classes, dtype=np.int32), len(sizes)), counts.ravel())
  # shuffle within each client (its rows stay together): sort by client + a random fraction
  return labels[np.argsort(np.repeat(np.arange(len(sizes), dtype=np.float64), sizes) + rng.random(len(labels)))]


def _store(x: np.ndarray, y: np.ndarray, sizes: np.ndarray) -> ClientStore:
  from sljax.population import ClientStore  # here: sljax.population imports sljax.algorithms, which imports sljax.data

  return ClientStore(x, y.astype(np.int32, copy=False), np.concatenate([[0], np.cumsum(sizes)]))


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _check_nonnegative(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
    raise ValueError(f"{name}: expected a real number >= 0, got {value!r}")
