"""Merges: how the label party joins the bottoms' outputs in vertical split learning.

Each factory returns a `Merge` (see `sljax.split.Merge`): a stage on the tuple of the bottoms'
outputs, one per party, and a shape check that names the party whose output does not fit.

  * `concat`: concatenation along a feature axis (the last by default); the outputs may differ in
    width along that axis.
  * `sum`, `mean`: element-wise; the outputs must have equal shapes.
  * `attention`: a learned, attention-weighted sum of the party embeddings: per example, party p
    gets the weight softmax_p(v . tanh(W h_p + b) + c_p). Its params (W, b, v, c) live with the top,
    on the label party, and train with it.

Example:
  >>> import jax, jax.numpy as jnp, sljax
  >>> hs = (jnp.ones((2, 3)), jnp.ones((2, 5)))
  >>> merge = sljax.merges.concat()
  >>> params, state = merge.init(jax.random.key(0), hs)
  >>> merge.apply(params, state, hs, key=None, train=False)[0].shape
  (2, 8)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sljax.split import Merge, describe

__all__ = ["Merge", "attention", "concat", "mean", "sum"]


def _no_params(key, hs):
  del key, hs
  return {}, {}


def _stateless(fn):
  """apply(params, model_state, hs, *, key, train) for a merge without params."""

  def apply(params, model_state, hs, *, key, train):
    del params, key, train
    return fn(hs), model_state

  return apply


def _check_equal_shapes(kind: str, hs, names) -> None:
  for h, name in zip(hs[1:], names[1:]):
    if tuple(h.shape) != tuple(hs[0].shape):
      raise ValueError(f"merge: {kind} takes bottom outputs of equal shapes; party {name!r} outputs "
                       f"{describe(h)}, party {names[0]!r} {describe(hs[0])} (concat takes different widths)")


def concat(*, axis: int = -1) -> Merge:
  """Concatenates the bottoms' outputs along a feature axis, in party order.

  Args:
    axis: the axis to join along; any but the batch axis 0. The outputs must agree on every other
      axis; along `axis` their sizes may differ.

  Returns:
    A parameter-free `Merge` named "concat".

  Raises:
    ValueError: `axis` is the batch axis 0 or not an int.

  Example:
    >>> import jax.numpy as jnp, sljax
    >>> hs = (jnp.ones((2, 3)), jnp.zeros((2, 1)))
    >>> sljax.merges.concat().apply({}, {}, hs, key=None, train=False)[0].tolist()
    [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
  """
  if not isinstance(axis, int) or axis == 0:
    raise ValueError(f"axis: expected a feature axis (not the batch axis 0), got {axis!r}")

  def check(hs, names):
    ndim = len(hs[0].shape)
    if not -ndim <= axis < ndim or axis % ndim == 0:
      raise ValueError(f"merge: concat along axis {axis} needs a feature axis of the bottom outputs; party "
                       f"{names[0]!r} outputs {describe(hs[0])}")
    a = axis % ndim
    ref = tuple(hs[0].shape)
    for h, name in zip(hs[1:], names[1:]):
      shape = tuple(h.shape)
      if len(shape) != ndim or shape[:a] + shape[a + 1:] != ref[:a] + ref[a + 1:]:
        raise ValueError(f"merge: concat along axis {axis} takes bottom outputs that agree on every other axis; "
                         f"party {name!r} outputs {describe(h)}, party {names[0]!r} {describe(hs[0])}")

  return Merge(_no_params, _stateless(lambda hs: jnp.concatenate(hs, axis=axis)), "concat", check)


def sum() -> Merge:  # noqa: A001 -- sljax.merges.sum, as jnp.sum
  """Adds the bottoms' outputs element-wise; they must have equal shapes.

  Returns:
    A parameter-free `Merge` named "sum".

  Example:
    >>> import jax.numpy as jnp, sljax
    >>> sljax.merges.sum().apply({}, {}, (jnp.ones((1, 2)), jnp.ones((1, 2))), key=None, train=False)[0].tolist()
    [[2.0, 2.0]]
  """
  return Merge(_no_params, _stateless(lambda hs: functools.reduce(jnp.add, hs)), "sum",
               functools.partial(_check_equal_shapes, "sum"))


def mean() -> Merge:
  """Averages the bottoms' outputs element-wise; they must have equal shapes.

  Returns:
    A parameter-free `Merge` named "mean".

  Example:
    >>> import jax.numpy as jnp, sljax
    >>> sljax.merges.mean().apply({}, {}, (jnp.ones((1, 2)), jnp.zeros((1, 2))), key=None, train=False)[0].tolist()
    [[0.5, 0.5]]
  """
  return Merge(_no_params, _stateless(lambda hs: functools.reduce(jnp.add, hs) / len(hs)), "mean",
               functools.partial(_check_equal_shapes, "mean"))


def attention(*, hidden: int | None = None) -> Merge:
  """A learned, attention-weighted sum of the party embeddings (equal shapes, features last).

  Per example (and per position, for outputs with more axes), party p's embedding h_p gets the
  score s_p = v . tanh(h_p W + b) + c_p, and the merge outputs sum_p softmax(s)_p h_p. W, b and v
  are shared by the parties (the scores compare their embeddings); c holds one learned bias per
  party (how much each party counts before looking at the example). The params
  `{"kernel": W, "bias": b, "query": v, "party_bias": c}` live with the top, on the label party.

  Args:
    hidden: the width of the scoring layer; the embedding width by default.

  Returns:
    A `Merge` with the params above (`init(key, hs)` makes them for the bottoms' outputs `hs`).

  Raises:
    ValueError: `hidden` is not a positive int or None.

  Example:
    >>> import jax, jax.numpy as jnp, sljax
    >>> hs = (jnp.ones((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4)))
    >>> merge = sljax.merges.attention(hidden=8)
    >>> params, state = merge.init(jax.random.key(0), hs)
    >>> params["kernel"].shape, params["party_bias"].shape
    ((4, 8), (3,))
    >>> merge.apply(params, state, hs, key=None, train=False)[0].shape
    (2, 4)
  """
  if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
    raise ValueError(f"hidden: expected a positive int or None, got {hidden!r}")

  def init(key, hs):
    width = hs[0].shape[-1]
    h = hidden or width
    k_kernel, k_query = jax.random.split(key)
    dtype = jnp.result_type(*hs) if jnp.issubdtype(jnp.result_type(*hs), jnp.floating) else jnp.float32
    params = {
        "kernel": jax.nn.initializers.lecun_normal()(k_kernel, (width, h), dtype),
        "bias": jnp.zeros((h,), dtype),
        "query": jax.nn.initializers.normal(h**-0.5)(k_query, (h,), dtype),
        "party_bias": jnp.zeros((len(hs),), dtype),
    }
    return params, {}

  def apply(params, model_state, hs, *, key, train):
    del key, train
    stacked = jnp.stack(hs)  # (P, B, ..., D)
    lead = (1,) * (stacked.ndim - 1)
    hidden_act = jnp.tanh(stacked @ params["kernel"] + params["bias"].reshape(lead + (-1,)))
    scores = hidden_act @ params["query"] + params["party_bias"].reshape((-1,) + lead[1:])  # (P, B, ...)
    weights = jax.nn.softmax(scores, axis=0)
    return jnp.sum(weights[..., None] * stacked, axis=0), model_state

  def check(hs, names):
    _check_equal_shapes("attention", hs, names)
    if len(hs[0].shape) < 2:
      raise ValueError(f"merge: attention takes bottom outputs with a feature axis, (B, ..., features); party "
                       f"{names[0]!r} outputs {describe(hs[0])}")

  return Merge(init, apply, "attention", check)
