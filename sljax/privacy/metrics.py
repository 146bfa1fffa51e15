"""Leakage metrics: distance correlation, reconstruction quality, label-leakage AUC.

- `distance_correlation(x, z)`: the sample distance correlation of Székely et al. (2007) between
  inputs and smashed data, in [0, 1]; 0 only when independent. Jittable and differentiable (NoPeek,
  Vepakomma et al. 2020, minimises it), O(B^2) memory. The one definition in sljax.
- `mse`, `psnr`, `ssim`, `reconstruction_metrics`: how close a reconstruction is to the inputs;
  PSNR and SSIM come from `dm_pix`.
- `leak_auc`, `leak_auc_summary`: the AUC of an attack's per-example scores against the true binary
  labels, per batch and over a run (Li et al., ICLR 2022, report the 95th percentile of the leak
  over the batches of a run); `sklearn.metrics.roc_auc_score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _pairwise_distances(a_BxD: jax.Array) -> jax.Array:
  """Euclidean distances between rows, with a gradient that is finite at zero distance."""
  sq_norms = jnp.sum(a_BxD * a_BxD, axis=1)
  sq_BxB = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (a_BxD @ a_BxD.T)
  sq_BxB = jnp.maximum(sq_BxB, 0.0) * (1.0 - jnp.eye(a_BxD.shape[0], dtype=a_BxD.dtype))
  positive = sq_BxB > 0
  # sqrt has an infinite derivative at 0: take it only where positive (the double-where trick).
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_BxB, 1.0)), 0.0)


def _double_centered(d_BxB: jax.Array) -> jax.Array:
  return d_BxB - d_BxB.mean(axis=0, keepdims=True) - d_BxB.mean(axis=1, keepdims=True) + d_BxB.mean()


def distance_correlation(x: Any, z: Any) -> jax.Array:
  """The sample distance correlation between two batches, a float32 scalar in [0, 1].

  Each row (example) is flattened; rows of `x` and `z` are paired. Computed from the double-centred
  matrices of pairwise Euclidean distances, O(B^2) time and memory, so it fits inside a training
  step (NoPeek's penalty). Returns 0 when either batch has no spread (all rows equal).

  Args:
    x: (B, ...) a batch, e.g. the client's inputs.
    z: (B, ...) a batch with the same leading axis, e.g. the smashed data.

  Returns:
    The distance correlation, a float32 scalar in [0, 1]: near 0 for independent batches, 1 for batches
    related by a similarity (a shift, a scaling and an orthogonal map).

  Raises:
    ValueError: if `x` or `z` has no batch axis or their batch sizes differ, naming both shapes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> round(float(distance_correlation(x, 2 * x + 1)), 4)
    1.0
  """
  x, z = jnp.asarray(x), jnp.asarray(z)
  if x.ndim == 0 or z.ndim == 0 or x.shape[0] != z.shape[0]:
    raise ValueError(f"x, z: expected batches with the same leading axis, got shapes {x.shape} and {z.shape}")
  dtype = jnp.promote_types(jnp.result_type(x, z), jnp.float32)
  a = _double_centered(_pairwise_distances(x.reshape(x.shape[0], -1).astype(dtype)))
  b = _double_centered(_pairwise_distances(z.reshape(z.shape[0], -1).astype(dtype)))
  dcov2_xz = jnp.mean(a * b)
  denominator = jnp.sqrt(jnp.mean(a * a) * jnp.mean(b * b))
  ok = denominator > 0
  ratio = jnp.where(ok, dcov2_xz / jnp.where(ok, denominator, 1.0), 0.0)
  ratio = jnp.maximum(ratio, 0.0)
  positive = ratio > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, ratio, 1.0)), 0.0)


def _check_pair(name_a: str, a, name_b: str, b) -> tuple[jax.Array, jax.Array]:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim < 2:
    raise ValueError(f"{name_a}, {name_b}: expected two batches of the same shape (B, ...), got {a.shape} and "
                     f"{b.shape}")
  return a, b


def mse(inputs: Any, reconstructions: Any) -> jax.Array:
  """Per-example mean squared error, shape (B,)."""
  a, b = _check_pair("inputs", inputs, "reconstructions", reconstructions)
  return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


def psnr(inputs: Any, reconstructions: Any, *, data_range: float = 1.0) -> jax.Array:
  """Per-example peak signal-to-noise ratio in dB, shape (B,) (`dm_pix.psnr`, values over `data_range`)."""
  import dm_pix  # noqa: PLC0415 -- the `privacy` extra

  a, b = _check_pair("inputs", inputs, "reconstructions", reconstructions)
  as_image = (a.shape[0], -1, 1)  # dm_pix takes images; PSNR is a mean over all values, whatever their layout
  return dm_pix.psnr(a.reshape(as_image) / data_range, b.reshape(as_image) / data_range)


def _as_images(x: jax.Array) -> jax.Array:
  """(B, H, W, C) as is; anything else is refused (a rank-3 batch may be 1-D signals (B, L, C))."""
  if x.ndim == 4:
    return x
  raise ValueError(f"inputs: SSIM takes images (B, H, W, C), got shape {x.shape}")


def ssim(inputs: Any, reconstructions: Any, *, data_range: float = 1.0, filter_size: int | None = None) -> jax.Array:
  """Per-example structural similarity, shape (B,) (`dm_pix.ssim`, Wang et al. 2004).

  Args:
    inputs, reconstructions: images (B, H, W, C) (grayscale: C = 1).
    data_range: the range of the pixel values (`max_val` of dm_pix, for values in [0, data_range]).
    filter_size: the Gaussian window; by default 11, or the image's smaller side if that is smaller
      (digits are 8x8: window 7, the odd size that fits), with sigma 1.5 as in the paper.
  """
  import dm_pix  # noqa: PLC0415 -- the `privacy` extra

  a, b = _check_pair("inputs", inputs, "reconstructions", reconstructions)
  a, b = _as_images(a), _as_images(b)
  if filter_size is None:
    side = min(a.shape[1], a.shape[2])
    filter_size = min(11, side if side % 2 else side - 1)
  return dm_pix.ssim(a, b, max_val=data_range, filter_size=filter_size)


def reconstruction_metrics(inputs: Any, reconstructions: Any, *, data_range: float | None = None) -> dict[str, float]:
  """Mean MSE, PSNR (dB) and, for images, SSIM of reconstructions against the true inputs.

  Args:
    inputs: (B, ...) the true inputs.
    reconstructions: (B, ...) an attack's reconstructions, same shape.
    data_range: the range of the values, for PSNR and SSIM; by default that of `inputs` (max - min).
      Both arrays are shifted by `inputs.min()` first, so images in [0, data_range] stay as they are.

  Returns:
    {"mse": ..., "psnr": ..., "ssim": ...}; "ssim" only for images (B, H, W, C).
  """
  a, b = _check_pair("inputs", inputs, "reconstructions", reconstructions)
  if data_range is None:
    data_range = float(a.max() - a.min()) or 1.0
  return {name: float(value) for name, value in _quality(a, b, data_range).items()}


@jax.jit
def _quality(a, b, data_range):
  """The means of `reconstruction_metrics`, one program (dm_pix op by op compiles each op: seconds)."""
  low = a.min()
  out = {"mse": jnp.mean(mse(a, b)), "psnr": jnp.mean(psnr(a - low, b - low, data_range=data_range))}
  if a.ndim == 4:
    out["ssim"] = jnp.mean(ssim(a - low, b - low, data_range=data_range))
  return out


def leak_auc(labels: Any, scores: Any) -> float:
  """The ROC AUC of per-example attack scores against the true binary labels (`roc_auc_score`).

  1 means the scores rank every positive above every negative; 0.5 is chance; 0 is a perfect
  ranking the wrong way round (as leaky as 1). NaN when the batch holds one class only.

  Raises:
    ValueError: if `labels` is not a vector of 0/1 of the length of `scores`.
  """
  from sklearn.metrics import roc_auc_score  # noqa: PLC0415 -- slow to import

  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  if labels.ndim != 1 or scores.shape != labels.shape:
    raise ValueError(f"labels, scores: expected two vectors of the same length, got shapes {labels.shape} and "
                     f"{scores.shape}")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels: expected binary labels 0/1, got values {sorted(set(np.unique(labels).tolist()))[:5]}")
  if labels.min() == labels.max():
    return float("nan")
  return float(roc_auc_score(labels, scores))


def leak_auc_summary(aucs: Sequence[float], *, percentile: float = 95.0) -> dict[str, float]:
  """Summary of per-batch AUCs over a run: the mean AUC and the `percentile` of |AUC - 0.5|.

  Li et al. (ICLR 2022) report the 95th percentile of the leak over a run's batches: a defense
  must hold on nearly every batch, not on average. Batches with one class (NaN) are left out.

  Returns:
    {"auc_mean": ..., "leak_p95": ... (named after `percentile`), "batches": batches counted}.
  """
  aucs = np.asarray(aucs, np.float64)
  aucs = aucs[~np.isnan(aucs)]
  name = f"leak_p{percentile:g}"
  if aucs.size == 0:
    return {"auc_mean": float("nan"), name: float("nan"), "batches": 0}
  return {"auc_mean": float(aucs.mean()), name: float(np.percentile(np.abs(aucs - 0.5), percentile)),
          "batches": int(aucs.size)}
