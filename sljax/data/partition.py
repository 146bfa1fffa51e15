"""Splitting a data set among clients (horizontal) or among parties (vertical).

Every horizontal partitioner takes the labels of the training set and returns a list of
`num_clients` sorted integer index arrays: each non-empty, pairwise disjoint, together covering
`range(len(labels))`. All randomness comes from `np.random.default_rng(seed)`, so the same
arguments always give the same partition.

  * `iid`: uniform random split into near-equal sizes.
  * `dirichlet`: label skew; each class is spread over clients by proportions drawn from
    Dir(alpha) (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution").
  * `label_shards`: each client gets a few single-label shards, hence at most that many labels
    (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
    Data").
  * `quantity_skew`: client sizes drawn from Dir(alpha), labels IID (Li et al., 2022, "Federated
    Learning on Non-IID Data Silos: An Experimental Study").

`vertical_split` cuts the feature axis into contiguous groups, one per party, for vertical split
learning.
"""

from collections.abc import Sequence

import numpy as np


def iid(labels, *, num_clients: int, seed: int) -> list[np.ndarray]:
  """Splits the samples uniformly at random into `num_clients` near-equal parts.

  Args:
    labels: shape (N,); only its length is used, so that all partitioners share one signature.
    num_clients: number of parts, 1 <= num_clients <= N.
    seed: seed of the numpy generator.

  Returns:
    `num_clients` sorted index arrays whose sizes differ by at most one.

  Example:
    >>> [len(p) for p in iid(np.zeros(10, int), num_clients=3, seed=0)]
    [4, 3, 3]
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, len(labels))
  rng = np.random.default_rng(seed)
  owner = rng.permutation(np.arange(len(labels)) % num_clients)
  return _groups(owner, num_clients)


def dirichlet(
    labels, *, num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
  """Label-skewed partition: each class is split among clients by proportions ~ Dir(alpha).

  Small `alpha` (0.1) gives each client a few dominant labels; large `alpha` (100) approaches
  `iid`. A draw can leave clients with fewer than `min_size` samples (likely when `alpha` is small
  and clients are many). Rather than redraw until lucky, which may never end, such clients are
  topped up with random samples of the currently largest client. The repair is deterministic given
  the seed and touches only the deficient clients, so for tiny `alpha` the smallest clients hold
  exactly `min_size` samples.

  Args:
    labels: integer class labels, shape (N,).
    num_clients: number of clients, num_clients * min_size <= N.
    alpha: concentration of the Dirichlet, > 0.
    seed: seed of the numpy generator.
    min_size: fewest samples any client may hold, >= 1.

  Returns:
    `num_clients` sorted index arrays partitioning `range(N)`.

  Example:
    >>> labels = np.repeat(np.arange(4), 25)
    >>> parts = dirichlet(labels, num_clients=5, alpha=0.3, seed=0)
    >>> sum(len(p) for p in parts)
    100
  """
  labels = _check_labels(labels)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got alpha={alpha}")
  _check_num_clients(num_clients, len(labels), min_size=min_size)
  rng = np.random.default_rng(seed)
  owner = np.empty(len(labels), np.int64)
  for label in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == label))
    shares = _apportion(len(idx), rng.dirichlet(np.full(num_clients, float(alpha))))
    owner[idx] = np.repeat(np.arange(num_clients), shares)
  _top_up(owner, num_clients, min_size, rng)
  return _groups(owner, num_clients)


def label_shards(
    labels, *, num_clients: int, shards_per_client: int, seed: int
) -> list[np.ndarray]:
  """Pathological label skew: each client receives `shards_per_client` single-label shards.

  The scheme of McMahan et al. (2017): sort by label, cut into `num_clients * shards_per_client`
  shards, deal the shards at random. Unlike a plain cut of the sorted array, no shard here
  straddles two labels: each class is cut into a number of shards proportional to its size (at
  least one), so every client holds at most `shards_per_client` distinct labels. With balanced
  classes, e.g. MNIST with 100 clients and 2 shards each, this is exactly the original scheme.

  Args:
    labels: integer class labels, shape (N,).
    num_clients: number of clients.
    shards_per_client: shards dealt to each client, >= 1. `num_clients * shards_per_client` must
      be at least the number of distinct labels and at most N.
    seed: seed of the numpy generator.

  Returns:
    `num_clients` sorted index arrays partitioning `range(N)`.

  Example:
    >>> labels = np.repeat(np.arange(10), 20)
    >>> parts = label_shards(labels, num_clients=10, shards_per_client=2, seed=0)
    >>> max(len(np.unique(labels[p])) for p in parts) <= 2
    True
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, len(labels))
  _check_positive_int("shards_per_client", shards_per_client)
  _, label_ids = np.unique(labels, return_inverse=True)
  class_sizes = np.bincount(label_ids)
  num_shards = num_clients * shards_per_client
  if not len(class_sizes) <= num_shards <= len(labels):
    raise ValueError(
        f"num_clients * shards_per_client must lie between the number of distinct labels "
        f"({len(class_sizes)}) and the number of samples ({len(labels)}), got "
        f"num_clients={num_clients} * shards_per_client={shards_per_client} = {num_shards}")
  rng = np.random.default_rng(seed)
  # One shard per class first, the rest proportional to what each class has beyond its first
  # sample: this keeps every shard non-empty (shards of class c <= its size).
  shards_per_class = 1 + _apportion(num_shards - len(class_sizes), class_sizes - 1)
  shard = np.empty(len(labels), np.int64)
  first = np.cumsum(shards_per_class) - shards_per_class
  for c, (size, num) in enumerate(zip(class_sizes, shards_per_class)):
    idx = rng.permutation(np.flatnonzero(label_ids == c))
    shard[idx] = first[c] + np.arange(size) * num // size  # `num` near-equal pieces
  dealer = rng.permutation(np.repeat(np.arange(num_clients), shards_per_client))
  return _groups(dealer[shard], num_clients)


def quantity_skew(
    labels, *, num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
  """Quantity skew: client sizes are drawn from Dir(alpha), labels stay IID.

  Each client first gets `min_size` samples; the remaining `N - num_clients * min_size` are
  apportioned by proportions ~ Dir(alpha). Small `alpha` gives a few large clients and many of
  size `min_size`; large `alpha` gives near-equal sizes.

  Args:
    labels: shape (N,); only its length is used.
    num_clients: number of clients, num_clients * min_size <= N.
    alpha: concentration of the Dirichlet, > 0.
    seed: seed of the numpy generator.
    min_size: fewest samples any client may hold, >= 1.

  Returns:
    `num_clients` sorted index arrays partitioning `range(N)`.

  Example:
    >>> parts = quantity_skew(np.zeros(100, int), num_clients=4, alpha=0.5, seed=0, min_size=5)
    >>> min(len(p) for p in parts) >= 5
    True
  """
  labels = _check_labels(labels)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got alpha={alpha}")
  _check_num_clients(num_clients, len(labels), min_size=min_size)
  rng = np.random.default_rng(seed)
  extra = _apportion(
      len(labels) - num_clients * min_size, rng.dirichlet(np.full(num_clients, float(alpha))))
  owner = rng.permutation(np.repeat(np.arange(num_clients), min_size + extra))
  return _groups(owner, num_clients)


def vertical_split(
    x,
    *,
    num_parties: int | None = None,
    feature_groups: Sequence[int] | None = None,
    axis: int = -1,
) -> list:
  """Splits the feature axis of `x` into contiguous groups, one per party (vertical SL).

  Pass exactly one of `num_parties` (near-equal groups, the first ones one larger) and
  `feature_groups` (the size of each group). Works on numpy and JAX arrays alike.

  Args:
    x: shape (N, ...); axis 0 holds the samples and is never split.
    num_parties: number of groups, 1 <= num_parties <= x.shape[axis].
    feature_groups: positive group sizes that sum to x.shape[axis].
    axis: the axis to split, not 0; the last axis by default (tabular features). For images in
      (N, H, W, C) layout, axis=2 gives each party a vertical strip.

  Returns:
    A list of arrays whose concatenation along `axis` is `x`.

  Example:
    >>> [p.shape for p in vertical_split(np.zeros((5, 10)), feature_groups=[3, 7])]
    [(5, 3), (5, 7)]
  """
  if (num_parties is None) == (feature_groups is None):
    raise ValueError(
        f"pass exactly one of num_parties and feature_groups, got num_parties={num_parties} and "
        f"feature_groups={feature_groups}")
  ndim = np.ndim(x)
  if ndim < 2:
    raise ValueError(
        f"x must have shape (num_samples, *features) with at least 2 axes, got shape "
        f"{np.shape(x)}")
  if not -ndim <= axis < ndim or axis % ndim == 0:
    raise ValueError(
        f"axis must index a feature axis of x (1..{ndim - 1} or -{ndim - 1}..-1), got axis={axis}")
  axis %= ndim
  num_features = x.shape[axis]
  if num_parties is not None:
    _check_positive_int("num_parties", num_parties)
    if num_parties > num_features:
      raise ValueError(
          f"num_parties must be <= the number of features along axis {axis} ({num_features}), "
          f"got num_parties={num_parties}")
    sizes = _apportion(num_features, np.ones(num_parties))
  else:
    sizes = list(feature_groups)
    if (not sizes or any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes)
        or sum(sizes) != num_features):
      raise ValueError(
          f"feature_groups must be positive integers summing to the number of features along "
          f"axis {axis} ({num_features}), got feature_groups={feature_groups}")
  bounds = np.cumsum([0, *sizes])
  lead = (slice(None),) * axis
  return [x[lead + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
  return labels


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def _check_num_clients(num_clients, num_samples: int, *, min_size: int = 1) -> None:
  _check_positive_int("num_clients", num_clients)
  _check_positive_int("min_size", min_size)
  if num_clients * min_size > num_samples:
    raise ValueError(
        f"num_clients={num_clients} clients with at least min_size={min_size} samples each need "
        f"{num_clients * min_size} samples, but there are only {num_samples}")


def _apportion(total: int, weights) -> np.ndarray:
  """Splits the integer `total` into parts proportional to `weights` (largest remainder).

  Parts are within one of their exact quota, and ties go to the lower index, so equal weights give
  the `np.array_split` sizes.
  """
  weights = np.asarray(weights, np.float64)
  if total == 0:
    return np.zeros(len(weights), np.int64)
  quota = total * weights / weights.sum()
  parts = np.floor(quota).astype(np.int64)
  parts[np.argsort(parts - quota, kind="stable")[:total - parts.sum()]] += 1
  return parts


def _top_up(owner: np.ndarray, num_clients: int, min_size: int, rng: np.random.Generator) -> None:
  """Moves random samples from the largest client to each client holding < `min_size`."""
  sizes = np.bincount(owner, minlength=num_clients)
  for client in np.flatnonzero(sizes < min_size):
    while sizes[client] < min_size:
      # Some client holds more than min_size, since N >= num_clients * min_size.
      donor = np.argmax(sizes)
      take = min(min_size - sizes[client], sizes[donor] - min_size)
      moved = rng.choice(np.flatnonzero(owner == donor), take, replace=False)
      owner[moved] = client
      sizes[donor] -= take
      sizes[client] += take


def _groups(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Turns a client id per sample into one sorted index array per client."""
  order = np.argsort(owner, kind="stable")
  return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])
