"""What docs/protocol.md tells a client in another language, written here in plain Python from the
document's text (section 5), against sljax's own functions: the key operations, the data order
and the optimizer's update. If one of these tests fails, fix the document, not the test's copy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax.transport import schedule as sched

M = 0xFFFFFFFF  # arithmetic on uint32, wrapping


def rotl(x, r):
  return ((x << r) | (x >> (32 - r))) & M


def threefry2x32(key, x0, x1):
  k0, k1 = key
  ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  x0, x1 = (x0 + ks[0]) & M, (x1 + ks[1]) & M
  for j in range(1, 6):
    for r in rotations[(j - 1) % 2]:
      x0 = (x0 + x1) & M
      x1 = rotl(x1, r) ^ x0
    x0 = (x0 + ks[j % 3]) & M
    x1 = (x1 + ks[(j + 1) % 3] + j) & M
  return x0, x1


def fold_in(key, d):
  return threefry2x32(key, 0, d)


def split(key, n):
  return [threefry2x32(key, 0, i) for i in range(n)]


def bits2(key):
  return [y0 ^ y1 for y0, y1 in split(key, 2)]


def mix32(h):
  h = ((h ^ (h >> 16)) * 0x85EBCA6B) & M
  h = ((h ^ (h >> 13)) * 0xC2B2AE35) & M
  return h ^ (h >> 16)


def batch_rows(run_key, k, n, b, t):
  """Section 5.4: the rows of client k's batch t, its N = n rows, batch size b."""

  def pi(e, x):
    s0, s1 = bits2(fold_in(fold_in(run_key, k), e))
    for i in range(16):
      g = (i * 0x9E3779B9) & M
      pivot, coin = mix32((s0 + g) & M) % n, mix32(s1 ^ g)
      partner = (pivot - x) % n
      if mix32(max(x, partner) ^ coin) >> 31 == 1:
        x = partner
    return x

  rows = []
  for j in range(b):
    p = t * b + j
    rows.append(pi(p // n, p % n) if n >= b else pi(t * b // n, p % n))
  return rows


def _key_data(key):
  return [int(v) for v in np.asarray(jax.random.key_data(key))]


def test_key_operations_are_threefry_as_documented():
  run_key = [0x12345678, 0x9ABCDEF0]
  key = jax.random.wrap_key_data(np.array(run_key, np.uint32))
  assert _key_data(jax.random.fold_in(key, 7)) == list(fold_in(run_key, 7))
  assert [_key_data(k) for k in jax.random.split(key, 3)] == [list(k) for k in split(run_key, 3)]
  assert [int(v) for v in jax.random.bits(key, (2,), jnp.uint32)] == bits2(run_key)
  # Section 5.3's step key and its split, composed from the same three operations.
  r, k, s = 2, 1, 5
  expected = split(fold_in(fold_in(fold_in(run_key, r), k + 1), s), 2)
  sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8,)), 1), client_optimizer=optax.sgd(0.1),
                     server_optimizer=optax.sgd(0.1))
  algo = sljax.algorithms.sequential_sl(sl, sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=4))
  client_key, server_key = sched.leg_keys(algo)
  got = [f(np.array(run_key, np.uint32), r, k, s) for f in (client_key, server_key)]
  assert [_key_data(x) for x in got] == [list(x) for x in expected]


@pytest.mark.parametrize("client, count, batch_size", [(1, 10, 4), (3, 7, 32), (0, 45, 32)])
def test_data_order_as_documented_equals_row_order(client, count, batch_size):
  run_key = [0, 42]
  rows = sched.row_order(client=client, count=count, batch_size=batch_size, run_key=np.array(run_key, np.uint32))
  for t in (0, 1, 2, 3, 11):  # (0, 45, 32): batch 1 spans epochs 0 and 1; (3, 7, 32): count < batch size
    assert np.asarray(rows(t)).tolist() == batch_rows(run_key, client, count, batch_size, t), t


def test_documented_example_of_the_data_order():
  example = [[4, 8, 7, 2], [5, 3, 0, 1], [6, 9, 9, 0], [5, 3, 1, 4]]  # section 5.4, word for word
  assert [batch_rows([0, 42], 1, 10, 4, t) for t in range(4)] == example


def test_adam_as_documented_equals_optax_adam():
  lr, b1, b2, eps = 2e-3, 0.9, 0.999, 1e-8
  rng = np.random.default_rng(0)
  p = rng.normal(size=(3, 4)).astype(np.float32)
  opt = optax.adam(lr)
  state, ours = opt.init(p), p.astype(np.float64)
  mu, nu = np.zeros_like(ours), np.zeros_like(ours)
  assert set(state[0]._fields) == {"count", "mu", "nu"} and state[1] == optax.EmptyState()
  for count in range(1, 4):
    g = rng.normal(size=p.shape).astype(np.float32)
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
    mu = (1 - b1) * g + b1 * mu
    nu = (1 - b2) * g**2 + b2 * nu
    ours = ours - lr * (mu / (1 - b1**count)) / (np.sqrt(nu / (1 - b2**count)) + eps)
    assert int(state[0].count) == count
  np.testing.assert_allclose(p, ours, rtol=0, atol=1e-6)
