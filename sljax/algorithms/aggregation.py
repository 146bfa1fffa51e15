"""How the averaging algorithms (SplitFed v1 and v2, FedAvg) combine the clients' halves.

An aggregator is a pure function `aggregate(stacked, weights) -> tree`: `stacked` holds one entry
per client on a leading axis (K, ...), `weights` (K,) the clients' FedAvg weights (sample counts of
those that finished the round; 0 for the others, who are left out). The default, `mean`, is
FedAvg's weighted mean. The robust ones bound what a single poisoning client can do to the shared
model, at the price of ignoring the weights or part of the honest clients' information:

- `median`: the coordinate-wise median of the clients present. A minority of clients cannot move
  a coordinate outside the range of the honest clients' values.
- `trimmed_mean(fraction)`: per coordinate, drop the `fraction` largest and smallest values of the
  clients present and average the rest (Yin et al., ICML 2018).
- `centered_clipping(radius)`: the weighted mean of the clients' halves clipped to `radius` (L2
  norm over the whole half) around the coordinate-wise median (Karimireddy, He & Jaggi, ICML 2021,
  centred at the median instead of the previous aggregate). The result lies within `radius` of
  the median, and one client moves it by at most `radius * w_k / sum(w)`.

Non-float leaves (integer step counters in a model state) are taken from client 0, as FedAvg does.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sljax.algorithms import _common as c

PyTree = Any
Aggregator = Callable[[PyTree, jax.Array], PyTree]


def _inexact(a) -> bool:
  return jnp.issubdtype(a.dtype, jnp.inexact)


def _present(weights: jax.Array, a: jax.Array) -> jax.Array:
  """(K, 1, ..., 1) bools: the clients of weight > 0, shaped to broadcast against `a` (K, ...)."""
  return (weights > 0).reshape(weights.shape + (1,) * (a.ndim - 1))


def mean() -> Aggregator:
  """FedAvg: the mean weighted by `weights` (zeros when every weight is 0).

  Example:
    >>> mean()({"w": jnp.array([[1.0], [3.0]])}, jnp.array([1.0, 3.0]))["w"].tolist()
    [2.5]
  """

  def aggregate(stacked, weights):
    return c.weighted_mean(stacked, weights)

  aggregate.name = "mean"
  return aggregate


def _median_leaf(a, weights):
  return jnp.nanmedian(jnp.where(_present(weights, a), a, jnp.nan), axis=0)


def median() -> Aggregator:
  """The coordinate-wise median of the clients of weight > 0 (their weights otherwise unused).

  Example:
    >>> median()({"w": jnp.array([[1.0], [2.0], [1e30], [5.0]])}, jnp.array([1.0, 1.0, 1.0, 0.0]))["w"].tolist()
    [2.0]
  """

  def aggregate(stacked, weights):
    return jax.tree.map(lambda a: _median_leaf(a, weights) if _inexact(a) else a[0], stacked)

  aggregate.name = "median"
  return aggregate


def trimmed_mean(fraction: float) -> Aggregator:
  """Per coordinate, the mean of the clients of weight > 0 after dropping the `floor(fraction * n)`
  largest and as many smallest of their n values (weights otherwise unused).

  Args:
    fraction: in [0, 0.5): the share trimmed at each end.

  Example:
    >>> trimmed_mean(0.25)({"w": jnp.array([[1.0], [2.0], [4.0], [1e30]])}, jnp.ones(4))["w"].tolist()
    [3.0]
  """
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 0.5:
    raise ValueError(f"fraction: expected a share in [0, 0.5) trimmed at each end, got {fraction!r}")

  def leaf(a, weights):
    present = _present(weights, a)
    n = (weights > 0).sum()
    cut = jnp.floor(fraction * n).astype(jnp.int32)
    ranked = jnp.sort(jnp.where(present, a, jnp.inf), axis=0)  # the absent last
    rank = jnp.arange(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
    keep = (rank >= cut) & (rank < n - cut)
    return jnp.where(keep, ranked, 0).sum(0) / jnp.maximum(n - 2 * cut, 1).astype(a.dtype)

  def aggregate(stacked, weights):
    return jax.tree.map(lambda a: leaf(a, weights) if _inexact(a) else a[0], stacked)

  aggregate.name = f"trimmed_mean({fraction})"
  return aggregate


def centered_clipping(radius: float) -> Aggregator:
  """The weighted mean of the clients' halves, each clipped to L2 distance `radius` (over all its
  float leaves together) from the coordinate-wise median of the clients of weight > 0.

  Args:
    radius: the clipping radius, > 0.

  Example:
    >>> out = centered_clipping(1.0)({"w": jnp.array([[0.0], [1.0], [1e30]])}, jnp.ones(3))["w"]
    >>> [round(v, 4) for v in out.tolist()]  # median 1.0; client 2 clipped to 2.0
    [1.0]
  """
  if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not radius > 0:
    raise ValueError(f"radius: expected a positive clipping radius, got {radius!r}")
  center_of, average = median(), mean()

  def aggregate(stacked, weights):
    center = center_of(stacked, weights)
    floats = lambda tree: [x for x in jax.tree.leaves(tree) if _inexact(x)]  # noqa: E731
    deltas = jax.tree.map(lambda a, m: a - m[None] if _inexact(a) else a, stacked, center)
    rows = [jnp.reshape(d, (d.shape[0], -1)).astype(jnp.float32) for d in floats(deltas)]
    # each client's L2 norm, scaled by its largest entry first so that 1e30 squared does not overflow
    top = jnp.maximum(jnp.max(jnp.stack([jnp.max(jnp.abs(r), axis=1) for r in rows]), axis=0), 1e-30)
    norms = top * jnp.sqrt(sum(jnp.sum((r / top[:, None]) ** 2, axis=1) for r in rows))
    # a client whose half is not finite counts as the center itself
    scale = jnp.where(jnp.isfinite(norms), jnp.minimum(1.0, radius / jnp.maximum(norms, 1e-30)), 0.0)
    def clip(d, m):
      if not _inexact(d):
        return d
      s = scale.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype)
      return m[None] + jnp.where(s > 0, d * s, jnp.zeros((), d.dtype))

    clipped = jax.tree.map(clip, deltas, center)
    return average(clipped, weights)

  aggregate.name = f"centered_clipping({radius})"
  return aggregate


def check(aggregation) -> Aggregator:
  """Raises a TypeError unless `aggregation` is an aggregator (a callable); returns it."""
  if not callable(aggregation):
    raise TypeError(f"aggregation: expected an aggregator from sljax.algorithms.aggregation (e.g. median()), got "
                    f"{type(aggregation).__name__}")
  return aggregation
