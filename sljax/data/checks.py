"""Checks of user data that every entry point shares: finite features, labels in range.

A NaN or infinite feature trains to a NaN loss without a word, and a label of -1 is read as the
last class by `take_along_axis`: both are silent wrong results, so the entry points that take data
(`sljax.fit`, `sljax.evaluate`, `sljax.data.stack_clients`, `sljax.population.ClientStore`) raise
first, naming the argument and the first bad entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _first(bad) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])


def check_finite(name: str, x) -> None:
  """Raises a ValueError unless every float entry of `x` (an array or a pytree of them) is finite."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(x):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    finite = jnp.isfinite(leaf)
    if not bool(jnp.all(finite)):
      where = _first(~finite)
      value = np.asarray(leaf)[where]
      raise ValueError(f"{name}{jax.tree_util.keystr(path)}: expected finite values, got {value} at index "
                       f"{where[0] if len(where) == 1 else where}")


def check_label_values(name: str, y, num_classes: int | None = None) -> None:
  """Raises a ValueError unless `y` holds integer labels in [0, num_classes) ([0, inf) if None)."""
  if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
    raise ValueError(f"{name}: expected integer class labels, got dtype {jnp.result_type(y)}")
  if jnp.size(y) == 0:
    return
  low, high = int(jnp.min(y)), int(jnp.max(y))
  if low < 0 or (num_classes is not None and high >= num_classes):
    expected = f"[0, {num_classes})" if num_classes is not None else "[0, ...)"
    bad = (y < 0) if low < 0 else (y >= num_classes)
    where = _first(bad)
    raise ValueError(f"{name}: expected class labels in {expected}, got {np.asarray(y)[where]} at index "
                     f"{where[0] if len(where) == 1 else where}")
