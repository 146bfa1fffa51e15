"""Defenses at the cut: noisy smashed data, NoPeek, label-protecting cut gradients, randomized labels.

Each defense plugs into a place the protocol already has, so it runs inside the jitted round of
every algorithm that uses that place, and unchanged in deployment:

- `gaussian_noise`, `laplace_noise`: the client's inputs in the smashed data, DP per example; codecs
  (`vanilla(uplink=...)`), composable with `sljax.codecs.chain`.
- `nopeek`: the client's inputs in the smashed data, a decorrelation heuristic; a `client_loss`
  (`vanilla` or `u_shaped`).
- `max_norm`, `marvell`: the server's binary labels in the cut gradient; `vanilla(cut_gradient_transform=...)`.
- `randomized_response`: the labels vanilla SL sends up, label DP; applied to the client's labels,
  once, before training.

The privacy budget of the noise codecs is tracked by `sljax.privacy.accounting`.

References:
- Dwork & Roth (2014), the Gaussian and Laplace mechanisms.
- Vepakomma, Gupta, Dubey & Raskar, "NoPeek: Information leakage reduction to share activations in
  distributed deep learning" (ICDM workshops, 2020).
- Li, Sun, Yang, Gao, Zhang, Xie, Smith & Wang, "Label Leakage and Protection in Two-party Split
  Learning" (ICLR 2022): norm and direction attacks, max-norm alignment, Marvell.
- Warner (1965), randomized response; Ghazi et al., "Deep Learning with Label Differential Privacy"
  (NeurIPS 2021), k-ary randomized response as label DP.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sljax import codecs
from sljax.privacy.metrics import distance_correlation

__all__ = [
    "gaussian_noise",
    "laplace_noise",
    "marvell",
    "max_norm",
    "nopeek",
    "randomized_response",
    "randomized_response_keep_probability",
]

PyTree = Any

# The config names of the noise codecs, read by `sljax.privacy.accounting` from `codecs.describe`.
GAUSSIAN = "gaussian_noise"
LAPLACE = "laplace_noise"


def _check_positive(where: str, name: str, value, *, allow_zero: bool = False) -> float:
  """`value` as a float, or a ValueError naming `where`'s argument `name`, the expected and the actual value."""
  bound = ">= 0" if allow_zero else "> 0"
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{where}: {name} must be a finite number {bound}; got {name}={value!r}.")
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{where}: {name} must be {bound}; got {name}={value!r}.")
  return float(value)


# --------------------------------------------------------------------------------------------
# Rows: one example's message over all the floating leaves of a tree.


def _float_rows(tree: PyTree, where: str):
  """The floating leaves of `tree` as one (B, D) float32 matrix, and a function putting a matrix back.

  Row b concatenates row b of every floating leaf, so a norm of a row is that of the whole
  per-example message (as `sljax.codecs.clip` takes it). Other leaves pass through unchanged.
  """
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  positions = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  for i in positions:
    if leaves[i].ndim < 1:
      raise ValueError(f"{where}: every floating leaf needs a leading batch axis; got a leaf of shape "
                       f"{tuple(leaves[i].shape)}.")
  batches = {leaves[i].shape[0] for i in positions}
  if len(batches) > 1:
    raise ValueError(f"{where}: the floating leaves must share the leading batch axis; got shapes "
                     f"{[tuple(leaves[i].shape) for i in positions]}.")
  widths = [math.prod(leaves[i].shape[1:]) for i in positions]
  if not positions:
    return None, lambda rows: tree
  batch = batches.pop()
  rows_BxD = jnp.concatenate([leaves[i].reshape(batch, -1).astype(jnp.float32) for i in positions], axis=1)

  def unrows(new_BxD):
    out = list(leaves)
    start = 0
    for i, width in zip(positions, widths):
      out[i] = new_BxD[:, start:start + width].reshape(leaves[i].shape).astype(leaves[i].dtype)
      start += width
    return treedef.unflatten(out)

  return rows_BxD, unrows


# --------------------------------------------------------------------------------------------
# Smashed data: noise codecs (per-example differential privacy).


def _noise_codec(name: str, *, clip_norm: float, noise_multiplier: float, norm_ord: int, sample) -> codecs.Codec:
  """A codec that clips each row to `clip_norm` in the `norm_ord` norm and adds `sample(key, shape)` noise."""
  config = codecs._config(name, clip_norm=clip_norm, noise_multiplier=noise_multiplier)  # noqa: SLF001 -- one format

  def encode(tree, state, key):
    rows_BxD, unrows = _float_rows(tree, name)
    if rows_BxD is None:
      return tree, state
    norm_B = jnp.linalg.norm(rows_BxD, ord=norm_ord, axis=1)
    tiny = jnp.finfo(jnp.float32).tiny  # a zero row stays zero instead of dividing by zero
    factor_Bx1 = jnp.minimum(1.0, clip_norm / jnp.maximum(norm_B, tiny))[:, None]
    return unrows(rows_BxD * factor_Bx1 + sample(key, rows_BxD.shape)), state

  def decode(payload):
    return payload

  return codecs._jitted_codec(codecs._init_empty, encode, decode, config=config)  # noqa: SLF001


def gaussian_noise(*, clip_norm: float, noise_multiplier: float) -> codecs.Codec:
  """The Gaussian mechanism on each example's message: clip its L2 norm, then add Gaussian noise.

  Each row (one example: row ``b`` of every floating leaf together, as :func:`sljax.codecs.clip`)
  is scaled down to L2 norm at most ``clip_norm``, then every coordinate gets independent noise
  ``N(0, (noise_multiplier * clip_norm)**2)``. Replacing one example's input by a zero row moves its
  clipped row by at most ``clip_norm``, so each release of a row is a Gaussian mechanism of noise
  multiplier ``noise_multiplier``: :func:`sljax.privacy.accounting.accountant` composes them over a
  run into an ``(epsilon, delta)`` per example. As an uplink codec it runs on the client, inside
  the jitted round and unchanged in deployment; its configuration string
  (``{"clip_norm":...,"name":"gaussian_noise","noise_multiplier":...}``) is what the network
  handshake compares. Its randomness is the codec key the protocol passes (a client's forward
  pass recomputed in the same step draws the same noise, so it releases nothing new). Gradients
  pass straight through (as :func:`sljax.codecs.clip`). Non-floating leaves pass unchanged.

  Args:
    clip_norm: the per-example L2 bound ``C``, ``> 0``.
    noise_multiplier: the noise standard deviation over ``C``, ``> 0``
      (:func:`sljax.codecs.clip` alone clips without noise).

  Returns:
    A stateless :class:`sljax.codecs.Codec`; chain it with others, e.g.
    ``chain(gaussian_noise(...), quantize(bits=8))`` (quantizing after the noise is post-processing
    and costs no privacy).

  Raises:
    ValueError: if ``clip_norm`` or ``noise_multiplier`` is not a finite number ``> 0``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = gaussian_noise(clip_norm=1.0, noise_multiplier=0.5)
    >>> h = jnp.full((4, 16), 3.0)
    >>> payload, _ = codec.encode(h, codec.init(h), jax.random.key(0))
    >>> codec.decode(payload).shape, codecs.describe(codec)["noise_multiplier"]
    ((4, 16), 0.5)
  """
  clip_norm = _check_positive("gaussian_noise", "clip_norm", clip_norm)
  noise_multiplier = _check_positive("gaussian_noise", "noise_multiplier", noise_multiplier)
  std = noise_multiplier * clip_norm
  return _noise_codec(GAUSSIAN, clip_norm=clip_norm, noise_multiplier=noise_multiplier, norm_ord=2,
                      sample=lambda key, shape: std * jax.random.normal(key, shape, jnp.float32))


def laplace_noise(*, clip_norm: float, noise_multiplier: float) -> codecs.Codec:
  """The Laplace mechanism on each example's message: clip its L1 norm, then add Laplace noise.

  As :func:`gaussian_noise`, with the L1 norm (the Laplace mechanism's sensitivity is in L1): each
  row is scaled down to L1 norm at most ``clip_norm`` and every coordinate gets independent Laplace
  noise of scale ``b = noise_multiplier * clip_norm`` (density ``exp(-|x| / b) / (2 b)``, standard
  deviation ``sqrt(2) b``). Each release of a row is then ``1 / noise_multiplier``-DP (pure, delta
  0) against replacing the example's input by a zero row; the accountant composes the releases.
  L1 clipping of a wide row is severe (a row of ``D`` equal values of L2 norm ``C`` has L1 norm
  ``sqrt(D) C``): for activations :func:`gaussian_noise` usually costs far less accuracy.

  Args:
    clip_norm: the per-example L1 bound ``C``, ``> 0``.
    noise_multiplier: the Laplace scale over ``C``, ``> 0``.

  Returns:
    A stateless :class:`sljax.codecs.Codec`.

  Raises:
    ValueError: if ``clip_norm`` or ``noise_multiplier`` is not a finite number ``> 0``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = laplace_noise(clip_norm=1.0, noise_multiplier=2.0)
    >>> h = jnp.zeros((2, 8))
    >>> payload, _ = codec.encode(h, codec.init(h), jax.random.key(0))
    >>> bool(jnp.all(codec.decode(payload) != 0))  # zero rows stay zero; the noise is all there is
    True
  """
  clip_norm = _check_positive("laplace_noise", "clip_norm", clip_norm)
  noise_multiplier = _check_positive("laplace_noise", "noise_multiplier", noise_multiplier)
  scale = noise_multiplier * clip_norm
  return _noise_codec(LAPLACE, clip_norm=clip_norm, noise_multiplier=noise_multiplier, norm_ord=1,
                      sample=lambda key, shape: scale * jax.random.laplace(key, shape, jnp.float32))


# --------------------------------------------------------------------------------------------
# Client training: NoPeek.


def nopeek(*, alpha: float) -> Callable[[Any, Any], jax.Array]:
  """NoPeek (Vepakomma et al. 2020): penalise the distance correlation between inputs and smashed data.

  The client adds ``alpha * dCor(x, smashed)`` (:func:`sljax.privacy.metrics.distance_correlation`,
  each example flattened) to its own objective, so its half learns activations that carry less
  about the raw inputs while the server's loss keeps them useful. Computed on the batch inside the
  step, ``O(B**2)`` in time and memory; the server never sees the term (the client reports it as
  ``metrics["client_loss"]``). A heuristic: it lowers a statistical dependence and makes
  reconstruction attacks harder, with no formal guarantee.

  Args:
    alpha: the penalty's weight, ``>= 0`` (0 adds nothing but the metric).

  Returns:
    ``client_loss(x, smashed) -> scalar``, for ``sljax.vanilla(client_loss=...)`` or
    ``sljax.u_shaped(client_loss=...)``.

  Raises:
    ValueError: if ``alpha`` is not a finite number ``>= 0``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = nopeek(alpha=0.5)
    >>> x = jax.random.normal(jax.random.key(0), (32, 8))
    >>> round(float(loss(x, 2 * x)), 3)  # smashed data that is the input, rescaled: dCor 1
    0.5
  """
  alpha = _check_positive("nopeek", "alpha", alpha, allow_zero=True)

  def client_loss(x, smashed):
    return alpha * distance_correlation(x, smashed)

  client_loss.__qualname__ = client_loss.__name__ = f"nopeek(alpha={alpha!r})"
  return client_loss


# --------------------------------------------------------------------------------------------
# Cut gradient: label protection (Li et al., ICLR 2022).


def _check_binary(where: str, labels) -> jax.Array:
  """`labels` as a (B,) int32 vector of 0/1: shape and dtype checked at trace time, values when concrete."""
  shape, dtype = getattr(labels, "shape", None), getattr(labels, "dtype", None)
  if shape is None or len(shape) != 1 or not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
    got = f"shape {tuple(shape)} {dtype}" if shape is not None else type(labels).__name__
    raise ValueError(f"{where}: labels must be a (B,) vector of binary class labels 0/1; got {got}.")
  if not isinstance(labels, jax.core.Tracer):
    values = np.unique(np.asarray(labels))
    if not np.isin(values, (0, 1)).all():
      raise ValueError(f"{where}: labels must be binary (0 or 1); got values {values.tolist()[:8]}. "
                       f"{where} protects binary labels only.")
  return jnp.asarray(labels).astype(jnp.int32)


def max_norm() -> Callable[[Any, jax.Array, jax.Array], Any]:
  """Max-norm alignment (Li et al., ICLR 2022): noise that lifts every example's gradient norm to the batch max.

  The norm of a cut-gradient row tells a client which examples are positive in an imbalanced
  binary task (Li et al.'s norm attack). Each example's gradient ``g_b`` becomes
  ``g_b * (1 + sigma_b z_b)`` with ``z_b ~ N(0, 1)`` and ``sigma_b = sqrt(max_j |g_j|^2 / |g_b|^2 - 1)``,
  so that ``E |g~_b|^2 = max_j |g_j|^2`` for every example in the batch (the published heuristic:
  the noise is along the gradient, so the direction is kept up to sign). It uses no labels and no
  hyperparameter; it weakens norm scoring, not direction (cosine) scoring.

  Returns:
    ``transform(grad, labels, key) -> grad`` for ``sljax.vanilla(cut_gradient_transform=...)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    >>> out = max_norm()(g, jnp.array([1, 0]), jax.random.key(0))
    >>> out[0].tolist()  # the largest row is left as it is
    [3.0, 4.0]
  """

  def transform(grad, labels, key):
    del labels
    rows_BxD, unrows = _float_rows(grad, "max_norm")
    if rows_BxD is None:
      return grad
    sq_B = jnp.sum(jnp.square(rows_BxD), axis=1)
    largest = jnp.max(sq_B)
    positive = sq_B > 0
    ratio_B = jnp.where(positive, largest / jnp.where(positive, sq_B, 1.0), 1.0)
    sigma_B = jnp.sqrt(jnp.maximum(ratio_B - 1.0, 0.0))
    factor_Bx1 = (1.0 + sigma_B * jax.random.normal(key, sigma_B.shape, jnp.float32))[:, None]
    return unrows(rows_BxD * factor_Bx1)

  return transform


# Marvell's search: the orthogonal budget on a grid, refined once around the best point; the
# adaptive power constraint tries scale * 1.5**k for k < _SCALE_STEPS (the original code's factor).
_GRID = 65
_SCALE_GROWTH = 1.5
_SCALE_STEPS = 64


def _sym_kl(u, v, d, lam10, lam20, lam11, lam21):
  """Marvell's objective: the symmetrised KL divergence between the perturbed class-conditional
  gradient distributions N(mean_0, u I + Sigma_0) and N(mean_1, v I + Sigma_1), with |mean_1 -
  mean_0| = 1 (everything is normalised by it), Sigma_k with variance lam1k along the mean
  difference and lam2k across it."""
  along = (lam10 + u + 1.0) / (lam11 + v) + (lam11 + v + 1.0) / (lam10 + u)
  a, b = lam20 + u, lam21 + v
  across = jnp.where(a * b > 0, (a * a + b * b) / jnp.where(a * b > 0, a * b, 1.0), jnp.where(a == b, 2.0, jnp.inf))
  return 0.5 * ((d - 1) * across + along) - d


def _along(u, v, p, budget):
  """The best variances (lam10, lam11) along the mean difference for a power `budget` there.

  Minimises (a + 1) / b + (b + 1) / a over a = lam10 + u >= u, b = lam11 + v >= v with
  (1 - p) lam10 + p lam11 = budget. The unique stationary point has b = E a with
  E^2 = (C + (1 - p)) / (C + p), C = budget + (1 - p) u + p v, and the objective is unimodal along
  the constraint, so the constrained minimum is that point clipped to the feasible segment.
  """
  c = budget + (1 - p) * u + p * v
  e = jnp.sqrt((c + (1 - p)) / (c + p))
  a = jnp.clip(c / (p * e + 1 - p), u, (c - p * v) / (1 - p))
  b = (c - (1 - p) * a) / p
  return jnp.maximum(a - u, 0.0), jnp.maximum(b - v, 0.0)


def _marvell_variances(u, v, d: int, p, power):
  """Marvell's optimal noise (Li et al. 2022, section 4): (lam10, lam20, lam11, lam21, sumKL).

  Minimises `_sym_kl` subject to the power constraint p (lam11 + (d - 1) lam21) + (1 - p) (lam10 +
  (d - 1) lam20) = power. Across the mean difference only the ratio of the classes' variances
  matters, best at equality: budget q there goes to the class with the smaller variance, up to
  equalising them (more buys nothing). The rest goes along the difference, solved in closed form
  by `_along`. q is searched on a grid over [0, min(power, q_equal)], refined once. The paper's
  solver (block coordinate descent) also restricts lam2k <= lam1k; this solves the same objective
  over the same covariance family without that restriction.
  """
  neg_lower = u <= v
  q_equal = jnp.where(neg_lower, (1 - p) * (d - 1) * (v - u), p * (d - 1) * (u - v))
  q_max = jnp.minimum(power, q_equal)

  def evaluate(q):
    across = q / jnp.maximum((d - 1) * jnp.where(neg_lower, 1 - p, p), 1e-30)
    lam20 = jnp.where(neg_lower, across, 0.0)
    lam21 = jnp.where(neg_lower, 0.0, across)
    lam10, lam11 = _along(u, v, p, power - q)
    return (lam10, lam20, lam11, lam21), _sym_kl(u, v, d, lam10, lam20, lam11, lam21)

  grid = jnp.linspace(0.0, 1.0, _GRID)
  _, kl = jax.vmap(evaluate)(q_max * grid)
  best = jnp.argmin(kl)
  lo = q_max * grid[jnp.maximum(best - 1, 0)]
  hi = q_max * grid[jnp.minimum(best + 1, _GRID - 1)]
  lams, kl = jax.vmap(evaluate)(lo + (hi - lo) * grid)
  best = jnp.argmin(kl)
  lam10, lam20, lam11, lam21 = (lam[best] for lam in lams)
  return lam10, lam20, lam11, lam21, kl[best]


def marvell(*, power_scale: float = 1.0,
            sum_kl_bound: float | None = None) -> Callable[[Any, jax.Array, jax.Array], Any]:
  """Marvell (Li et al., ICLR 2022): optimised Gaussian noise on the cut gradient that hides binary labels.

  Per batch, from the cut gradient ``g`` (one row per example, flattened) and the binary labels:
  the class means ``m_1`` (positives) and ``m_0``, their difference ``Delta`` (the direction that
  separates the classes, which norm and cosine attacks exploit), the average per-coordinate
  variances ``v`` (positives) and ``u``, and the positive rate ``p``. Marvell adds Gaussian noise
  ``N(0, Sigma_1)`` to positive rows and ``N(0, Sigma_0)`` to negative rows, each with one variance
  along ``Delta`` and one across it, chosen to minimise the symmetrised KL divergence between the
  two perturbed class-conditional distributions (an upper bound on how well any scoring attack
  separates the labels: AUC near 0.5 at small divergence) under the power constraint
  ``p tr(Sigma_1) + (1 - p) tr(Sigma_0) <= P`` with ``P = power_scale * |Delta|^2``. With
  ``sum_kl_bound`` the constraint is adaptive, as in the authors' code: no noise when the
  divergence is already below the bound, else the smallest ``P = power_scale * 1.5**k |Delta|^2``
  that reaches it.

  The optimisation runs inside the jitted step (a closed form along ``Delta`` and a grid search
  across it; see `_marvell_variances`). A batch that holds one class only is returned unchanged
  (nothing separates within it; with positive rates near 0.1, use batches that hold both).

  Args:
    power_scale: ``P / |Delta|^2``, ``> 0``: the noise power relative to the class separation
      (Li et al. sweep it; larger protects more and costs more accuracy).
    sum_kl_bound: if given (``> 0``), grow the power from ``power_scale`` until the symmetrised KL
      divergence is at most this (Li et al. use 0.16 to 0.81).

  Returns:
    ``transform(grad, labels, key) -> grad`` for ``sljax.vanilla(cut_gradient_transform=...)``.
    The labels must be binary 0/1: checked when concrete; inside a jitted step, where values are
    not known at trace time, a batch with another label value gets a NaN gradient, so training
    fails visibly instead of protecting the wrong classes.

  Raises:
    ValueError: if ``power_scale`` or ``sum_kl_bound`` is not a finite number ``> 0``; (on call)
      if the labels are not a (B,) integer vector, or, when concrete, not binary.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.concatenate([jnp.full((2, 4), 1.0), jnp.full((6, 4), 0.1)])
    >>> labels = jnp.array([1, 1, 0, 0, 0, 0, 0, 0])
    >>> out = marvell(power_scale=4.0)(g, labels, jax.random.key(0))
    >>> out.shape, bool(jnp.all(jnp.isfinite(out)))
    ((8, 4), True)
  """
  power_scale = _check_positive("marvell", "power_scale", power_scale)
  if sum_kl_bound is not None:
    sum_kl_bound = _check_positive("marvell", "sum_kl_bound", sum_kl_bound)

  def transform(grad, labels, key):
    y_B = _check_binary("marvell", labels)
    rows_BxD, unrows = _float_rows(grad, "marvell")
    if rows_BxD is None:
      return grad
    batch, d = rows_BxD.shape
    if y_B.shape[0] != batch:
      raise ValueError(f"marvell: labels must hold one label per gradient row ({batch}); got {y_B.shape[0]}.")
    pos_B = (y_B == 1).astype(jnp.float32)
    n1 = pos_B.sum()
    n0 = batch - n1
    both = (n1 > 0) & (n0 > 0)
    pos_Bx1, neg_Bx1 = pos_B[:, None], (1.0 - pos_B)[:, None]
    mean1_D = (rows_BxD * pos_Bx1).sum(0) / jnp.maximum(n1, 1.0)
    mean0_D = (rows_BxD * neg_Bx1).sum(0) / jnp.maximum(n0, 1.0)
    v = (jnp.square(rows_BxD - mean1_D[None, :]) * pos_Bx1).sum() / jnp.maximum(n1, 1.0) / d
    u = (jnp.square(rows_BxD - mean0_D[None, :]) * neg_Bx1).sum() / jnp.maximum(n0, 1.0) / d
    delta_D = mean1_D - mean0_D
    sq_delta = jnp.sum(jnp.square(delta_D))
    active = both & (sq_delta > 0)
    safe_sq = jnp.where(active, sq_delta, 1.0)
    # The objective is invariant to a common scale: solve with |Delta| = 1, then scale back.
    u_n, v_n = u / safe_sq, v / safe_sq
    p = jnp.clip(n1 / batch, 1.0 / batch, 1.0 - 1.0 / batch)
    if sum_kl_bound is None:
      lam10, lam20, lam11, lam21, _ = _marvell_variances(u_n, v_n, d, p, power_scale)
    else:
      scales = power_scale * _SCALE_GROWTH ** jnp.arange(_SCALE_STEPS, dtype=jnp.float32)
      lams = jax.vmap(lambda s: _marvell_variances(u_n, v_n, d, p, s))(scales)
      reached = lams[4] <= sum_kl_bound
      pick = jnp.where(reached.any(), jnp.argmax(reached), _SCALE_STEPS - 1)
      lam10, lam20, lam11, lam21 = (lam[pick] for lam in lams[:4])
      quiet = _sym_kl(u_n, v_n, d, 0.0, 0.0, 0.0, 0.0) <= sum_kl_bound
      lam10, lam20, lam11, lam21 = (jnp.where(quiet, 0.0, lam) for lam in (lam10, lam20, lam11, lam21))
    direction_D = delta_D / jnp.sqrt(safe_sq)
    normal_BxD1 = jax.random.normal(key, (batch, d + 1), jnp.float32)  # one draw: along, then across
    z_B, xi_BxD = normal_BxD1[:, 0], normal_BxD1[:, 1:]
    xi_across_BxD = xi_BxD - (xi_BxD @ direction_D)[:, None] * direction_D[None, :]
    along_B = jnp.sqrt(safe_sq * jnp.where(y_B == 1, lam11, lam10))
    across_B = jnp.sqrt(safe_sq * jnp.where(y_B == 1, lam21, lam20))
    noise_BxD = (along_B * z_B)[:, None] * direction_D[None, :] + across_B[:, None] * xi_across_BxD
    noisy_BxD = rows_BxD + jnp.where(active, 1.0, 0.0) * noise_BxD
    binary = jnp.all((y_B == 0) | (y_B == 1))
    return unrows(jnp.where(binary, noisy_BxD, jnp.nan))

  return transform


# --------------------------------------------------------------------------------------------
# Labels: randomized response (label DP).


def _check_rr(epsilon, num_classes) -> tuple[float, int]:
  epsilon = _check_positive("randomized_response", "epsilon", epsilon)
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
    raise ValueError(f"randomized_response: num_classes must be an int >= 2; got num_classes={num_classes!r}.")
  return epsilon, int(num_classes)


def randomized_response_keep_probability(*, epsilon: float, num_classes: int) -> float:
  """The probability that k-ary randomized response keeps a label: ``e^eps / (e^eps + k - 1)``.

  Args:
    epsilon: the label-DP epsilon, positive.
    num_classes: k, the number of classes, at least 2.

  Returns:
    The probability, a float in (1/k, 1).

  Example:
    >>> round(randomized_response_keep_probability(epsilon=math.log(3), num_classes=2), 4)
    0.75
  """
  epsilon, k = _check_rr(epsilon, num_classes)
  return 1.0 / (1.0 + (k - 1) * math.exp(-epsilon))


def randomized_response(labels, key, *, epsilon: float, num_classes: int) -> jax.Array:
  """k-ary randomized response: each label kept with probability ``e^eps / (e^eps + k - 1)``, else
  replaced by one of the other ``k - 1`` classes drawn uniformly.

  Any output is at most ``e^eps`` times likelier under one true label than under another, so the
  released labels are ``epsilon``-label-DP (pure, delta 0; Ghazi et al. 2021). Apply it ONCE to a
  client's labels before training (e.g. ``data.replace(y=randomized_response(data.y, key, ...))``)
  and train on the result: every later use of the noisy labels is post-processing, so vanilla SL's
  labels on the uplink stay ``epsilon``-DP however many epochs run. Drawing fresh noise per step
  would compose instead. Protects the labels only (the smashed data needs its own defense), and
  each label on its own (the label DP unit is one example's label).

  Args:
    labels: integer class labels in ``[0, num_classes)``, any shape; checked when concrete.
    key: a PRNG key.
    epsilon: the label-DP epsilon, a finite number ``> 0``.
    num_classes: ``k >= 2``.

  Returns:
    Labels of the same shape and dtype.

  Raises:
    ValueError: if ``epsilon`` or ``num_classes`` is out of range, or ``labels`` are not integers
      in ``[0, num_classes)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> y = jnp.zeros((10000,), jnp.int32)
    >>> noisy = randomized_response(y, jax.random.key(0), epsilon=1.0, num_classes=2)
    >>> round(float((noisy == y).mean()), 2)  # e / (e + 1) = 0.73
    0.73
  """
  keep_probability = randomized_response_keep_probability(epsilon=epsilon, num_classes=num_classes)
  k = int(num_classes)
  dtype = getattr(labels, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"randomized_response: labels must be integer class labels; got "
                     f"{dtype if dtype is not None else type(labels).__name__}.")
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() >= k):
      raise ValueError(f"randomized_response: labels must lie in [0, {k}) for num_classes={k}; got values from "
                       f"{values.min()} to {values.max()}.")
  labels = jnp.asarray(labels)
  k_keep, k_other = jax.random.split(key)
  keep = jax.random.bernoulli(k_keep, keep_probability, labels.shape)
  other = (labels + jax.random.randint(k_other, labels.shape, 1, k, dtype=labels.dtype)) % k
  return jnp.where(keep, labels, other).astype(labels.dtype)
