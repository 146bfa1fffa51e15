"""Client data stacked along a leading client axis, and batches drawn from it inside `jit`.

The simulator `vmap`s over clients, so their data must share one shape: each client's samples are
padded to the largest client's size and `count` says how many rows are real. `client_batches` is a
pure function of `(data, step, key)`: the data order needs no state of its own, a resumed run sees
the same batches as an uninterrupted one, and the batch shape never changes, so nothing recompiles
as rounds go by.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sljax.data.checks import check_finite, check_label_values


@struct.dataclass
class ClientData:
  """Per-client training data, padded to a common size `N_max` (K = clients).

  Rows `count[k]` and beyond of client `k` are padding (zeros) and never appear in a batch from
  `client_batches`.

  Attributes:
    x: features, shape (K, N_max, *feature_shape).
    y: int32 labels, shape (K, N_max).
    count: int32 number of real rows of each client, shape (K,).
    ids: int32 ids of the clients in their population, shape (K,), sorted ascending; None (the
      default, what `stack_clients` gives) means 0..K-1. Set by `sljax.population` for the clients
      it gathers for a round.

  Example:
    >>> data = stack_clients(np.ones((5, 3)), np.arange(5), [np.array([0, 1, 2]), np.array([3, 4])])
    >>> data.x.shape, data.count.tolist()
    ((2, 3, 3), [3, 2])
  """

  x: jax.Array
  y: jax.Array
  count: jax.Array
  ids: jax.Array | None = None

  def client_ids(self) -> jax.Array:
    """(K,) int32: which clients of the population these are (`ids`), or 0..K-1 when `ids` is None.

    A client's data order and keys depend on its id, not on its place in the stack, so a round run
    on the clients gathered from a larger population (`sljax.population`) draws what the same
    clients draw in the whole stack.
    """
    if self.ids is not None:
      return jnp.asarray(self.ids, jnp.int32)
    return jnp.arange(self.y.shape[0], dtype=jnp.int32)


def stack_clients(x, y, parts: Sequence | None = None) -> ClientData:
  """Stacks per-client data into a padded `ClientData`.

  Either `x`, `y` hold the whole training set and `parts` the client index arrays (as returned by
  the partitioners in `sljax.data`), or `parts` is None and `x`, `y` are sequences with one array
  per client (a natural partition, e.g. by writer). Padding costs K * N_max rows of memory; under
  strong quantity or label skew N_max nears N, so the stack nears K times the data. The padding
  rows are never read nor sent: a client with fewer rows than the batch size fills its batches by
  repeating its own rows (see `client_batches`), so it sends, and is counted for, full batches.

  Args:
    x: features, shape (N, *feature_shape); or a sequence of K arrays (N_k, *feature_shape).
    y: integer labels, shape (N,); or a sequence of K arrays (N_k,).
    parts: K non-empty integer index arrays into `x` and `y`, or None.

  Returns:
    The stacked `ClientData`, on the default device.

  Example:
    >>> import numpy as np
    >>> x, y = np.arange(12.0).reshape(6, 2), np.array([0, 1, 0, 1, 2, 2])
    >>> data = stack_clients(x, y, [np.array([0, 1, 2, 3]), np.array([4, 5])])
    >>> data.x.shape, data.count.tolist(), data.y.tolist()
    ((2, 4, 2), [4, 2], [[0, 1, 0, 1], [2, 2, 0, 0]])
    >>> stack_clients([x[:1], x[1:]], [y[:1], y[1:]]).count.tolist()  # one array per client
    [1, 5]
  """
  if parts is None and not isinstance(x, (list, tuple)):
    raise ValueError(
        f"without parts, x and y must be lists of per-client arrays, got x of type "
        f"{type(x).__name__}")
  if parts is not None:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.shape != x.shape[:1]:
      raise ValueError(
          f"x and y must hold the same number of samples, got x.shape={x.shape} and "
          f"y.shape={y.shape}")
    if len(parts) == 0:
      raise ValueError("parts must hold at least one client's index array, got 0")
    for k, part in enumerate(parts):
      part = np.asarray(part)
      if part.ndim != 1 or not np.issubdtype(part.dtype, np.integer):
        raise ValueError(
            f"parts[{k}] must be a 1-D integer index array, got shape {part.shape} and dtype "
            f"{part.dtype}")
      if len(part) and not (0 <= part.min() and part.max() < len(x)):
        raise ValueError(
            f"parts[{k}] must index the {len(x)} samples, got indices from {part.min()} to "
            f"{part.max()}")
    x, y = [x[np.asarray(p)] for p in parts], [y[np.asarray(p)] for p in parts]
  xs, ys = [np.asarray(a) for a in x], [np.asarray(a) for a in y]
  if len(xs) == 0 or len(xs) != len(ys):
    raise ValueError(
        f"x and y must hold one array per client, and at least one, got {len(xs)} and {len(ys)}")
  feature_shape = xs[0].shape[1:]
  for k, (x_k, y_k) in enumerate(zip(xs, ys)):
    if x_k.ndim < 1 or x_k.shape[1:] != feature_shape:
      raise ValueError(
          f"client {k} has features of shape {x_k.shape[1:]}, but client 0 has {feature_shape}")
    if y_k.ndim != 1 or not np.issubdtype(y_k.dtype, np.integer) or len(y_k) != len(x_k):
      raise ValueError(
          f"client {k} needs one integer label per sample, got x shape {x_k.shape} and y shape "
          f"{y_k.shape} of dtype {y_k.dtype}")
    if len(y_k) == 0:
      raise ValueError(f"client {k} has no samples; every client needs at least one")

    check_finite(f"x (client {k})", x_k)
    check_label_values(f"y (client {k})", y_k)

  count = np.array([len(y_k) for y_k in ys], np.int32)
  x_KxN = np.zeros((len(xs), count.max(), *feature_shape), np.result_type(*xs))
  y_KxN = np.zeros((len(xs), count.max()), np.int32)
  for k, (x_k, y_k) in enumerate(zip(xs, ys)):
    x_KxN[k, :len(x_k)], y_KxN[k, :len(y_k)] = x_k, y_k
  return ClientData(jnp.asarray(x_KxN), jnp.asarray(y_KxN), jnp.asarray(count))


SHUFFLE_ROUNDS = 16  # swap-or-not rounds of a client's epoch order (see `client_batches`)
_GOLDEN = np.uint32(0x9E3779B9)


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 in which every input bit flips about
  half of the output bits."""
  h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _epoch_seeds(key: jax.Array, clients_K: jax.Array, epoch_K: jax.Array) -> jax.Array:
  """Two uint32 seeds of each client's epoch order, from `fold_in(fold_in(key, k), epoch)`: (K, 2)."""
  return jax.vmap(lambda k, e: jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, k), e), (2,), jnp.uint32))(
      clients_K, epoch_K)


def _round_constants(seed_2: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The swap-or-not rounds of one epoch order of c rows: pivots in [0, c) and coin keys, (R,) each."""
  g_R = jnp.arange(SHUFFLE_ROUNDS, dtype=jnp.uint32) * _GOLDEN
  pivots_R = (_mix32(seed_2[0] + g_R) % c.astype(jnp.uint32)).astype(jnp.int32)
  return pivots_R, _mix32(seed_2[1] ^ g_R)


def client_batches(
    data: ClientData, step, *, batch_size: int, key: jax.Array, first_client=0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch number `step` of every client: a pure, jittable function of `(data, step, key)`.

  Each client k reads its own real rows in a fresh random order every epoch. Write c = count[k],
  B = batch_size, and pi_e for the order of epoch e: a pseudo-random permutation of the c real
  rows, keyed by `fold_in(fold_in(key, k), e)`, so it depends on nothing but the key, k, e and c
  (not on N_max nor on the other clients). Then:

  * If c >= B, the batches are consecutive windows of the stream pi_0, pi_1, pi_2, ...: batch t
    holds stream positions t*B .. t*B + B - 1, and `mask` is all True. Every row is read exactly
    once per c stream positions, also when B does not divide c (a batch may then span the end of
    one epoch and the start of the next).
  * If c < B, batch t holds all c rows once, in the order pi_e rotated to start at position
    t*B mod c with e = t*B // c, then repeats them cyclically to fill B rows. `mask` is True on
    the first c rows exactly, so a masked mean counts every row once. The algorithms in
    `sljax.algorithms` do not use the mask: such a client sends all B rows (smashed data, and
    labels in vanilla SL, of B rows up; B rows of cut gradients down), is counted for those bytes,
    and its loss is the plain mean over the B rows. With B = q*c + r (0 <= r < c), the batch's
    first r rows weigh (q + 1)/B each in it and the other c - r rows q/B; which rows weigh more
    changes with t (docs/algorithms.md, "Batches and small clients").

  Padding rows are never read. A client with count 0 (only possible when built by hand) gets
  row 0 and an all-False mask.

  pi_e is a swap-or-not shuffle (Hoang, Morris & Rogaway, CRYPTO 2012) of `SHUFFLE_ROUNDS`
  rounds: round i pairs slot x with slot (p_i - x) mod c, for a pivot p_i drawn from the epoch's
  key, and swaps each pair or not by a keyed coin of the pair. Every round is a permutation, so
  pi_e is one, and it is evaluated at the B slots of the batch only: no sort, and a cost per call
  of O(K * B * rounds), whatever N_max. (Sorting N_max random keys per client, twice, took 85 to
  90% of the time of this function.)

  Args:
    data: the stacked client data.
    step: the step number, a Python int or an int32 scalar that may be traced. `step * batch_size`
      must stay below 2**31.
    batch_size: rows per client per step, a static positive int.
    key: the data-order key; keep it fixed for the whole run.
    first_client: the index k of `data`'s first client (an int, or an int32 scalar that may be
      traced): with a slice of clients k0, k0 + 1, ..., pass k0 to get their batches as in the
      whole stack. Not used when `data.ids` is set: client k is then `data.ids[k]`.

  Returns:
    x of shape (K, B, *feature_shape), y of shape (K, B), and the bool mask of shape (K, B).

  Example:
    >>> data = stack_clients(np.ones((6, 2)), np.arange(6), [np.arange(4), np.arange(4, 6)])
    >>> x, y, mask = client_batches(data, 0, batch_size=3, key=jax.random.key(0))
    >>> x.shape, mask.tolist()
    ((2, 3, 2), [[True, True, True], [True, True, False]])
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive Python int, got batch_size={batch_size!r}")
  if jnp.ndim(step) != 0 or not jnp.issubdtype(jnp.result_type(step), jnp.integer):
    raise ValueError(
        f"step must be an integer scalar, got shape {jnp.shape(step)} and dtype "
        f"{jnp.result_type(step)}")
  num_clients = data.y.shape[0]
  count_K = data.count
  c_Kx1 = jnp.maximum(count_K, 1)[:, None]  # guards the division for a hand-built empty client
  start = step * batch_size
  pos_1xB = start + jnp.arange(batch_size)[None, :]  # stream positions of this batch
  epoch_K = start // c_Kx1[:, 0]
  # With c >= B a batch spans at most two epochs; with c < B all of it uses pi_e (see above).
  in_next_KxB = (pos_1xB // c_Kx1 > epoch_K[:, None]) & (c_Kx1 >= batch_size)
  clients_K = data.ids if data.ids is not None else first_client + jnp.arange(num_clients)
  now_KxR, now_keys_KxR = jax.vmap(_round_constants)(_epoch_seeds(key, clients_K, epoch_K), c_Kx1[:, 0])
  next_KxR, next_keys_KxR = jax.vmap(_round_constants)(_epoch_seeds(key, clients_K, epoch_K + 1), c_Kx1[:, 0])
  row_KxB = pos_1xB % c_Kx1  # the slot in the epoch; the rounds map it to a row
  for i in range(SHUFFLE_ROUNDS):  # swap-or-not: each round swaps slot x with k_i - x, or not
    pivot_KxB = jnp.where(in_next_KxB, next_KxR[:, i:i + 1], now_KxR[:, i:i + 1])
    round_key_KxB = jnp.where(in_next_KxB, next_keys_KxR[:, i:i + 1], now_keys_KxR[:, i:i + 1])
    partner_KxB = pivot_KxB - row_KxB
    partner_KxB = jnp.where(partner_KxB < 0, partner_KxB + c_Kx1, partner_KxB)
    # the pair's coin depends on the pair (its larger member), so both members agree on it
    pair_KxB = jnp.maximum(row_KxB, partner_KxB).astype(jnp.uint32)
    swap_KxB = (_mix32(pair_KxB ^ round_key_KxB) >> 31) == 1
    row_KxB = jnp.where(swap_KxB, partner_KxB, row_KxB)
  x_KxB = jax.vmap(lambda x_N, row_B: x_N[row_B])(data.x, row_KxB)
  y_KxB = jnp.take_along_axis(data.y, row_KxB, axis=1)
  mask_KxB = jnp.arange(batch_size)[None, :] < count_K[:, None]
  return x_KxB, y_KxB, mask_KxB
