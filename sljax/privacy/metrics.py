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
