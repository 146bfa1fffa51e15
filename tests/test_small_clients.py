"""A client with fewer rows than the batch size: its rows repeated to fill the batch, a full batch sent and counted,
and each row weighted in the loss by how often it appears (docs/algorithms.md, "Batches and small clients")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import algorithms as A

B = 8
batches = jax.jit(sljax.data.client_batches, static_argnames="batch_size")  # one compile, not one per op


def _data():
  x = np.random.default_rng(0).normal(size=(23, 12)).astype(np.float32)
  y = np.argmax(x[:, :10], 1).astype(np.int32)
  return x, y, sljax.data.stack_clients(x, y, [np.arange(20), np.arange(20, 23)])  # client 1 holds 3 rows


def _rows(x_small, batch_B):
  """Which of the small client's rows each row of its batch is."""
  return [int(np.flatnonzero((x_small == row).all(axis=1))[0]) for row in np.asarray(batch_B)]


def test_the_rows_repeat_cyclically_the_first_b_mod_c_once_more():
  x, _, data = _data()
  for step in range(4):
    x_KxB, _, mask_KxB = batches(data, step, batch_size=B, key=jax.random.key(0))
    rows = _rows(x[20:], x_KxB[1])
    assert sorted(rows[:3]) == [0, 1, 2] and rows == (rows[:3] * 3)[:B]  # all 3 once, then again cyclically
    # B = 2 * 3 + 2: the batch's first 2 rows appear 3 times, the third 2 times
    assert [rows.count(r) for r in rows[:3]] == [3, 3, 2]
    assert np.asarray(mask_KxB[1]).tolist() == [True] * 3 + [False] * 5


def test_a_small_client_sends_a_full_batch_and_its_loss_weighs_rows_by_repetition():
  x, y, data = _data()
  sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
                     server_optimizer=optax.sgd(0.1))
  algo = A.parallel_sl(sl, A.ScheduleConfig(num_clients=2, batch_size=B))
  state = algo.init(jax.random.key(0), data)
  predict = jax.jit(algo.predict, static_argnames="client")
  logits = [np.asarray(predict(state, x[:20], client=0)), np.asarray(predict(state, x[20:], client=1))]
  _, records = sljax.simulation.run(algo, state, data, rounds=1, donate=False)
  record = records[0]
  # bytes: what is sent, a batch of B rows up (smashed data and labels) and B cut gradients down, for both clients
  up = sljax.wire_size(sljax.SmashedData(jnp.zeros((B, 16)), jnp.zeros((B,), jnp.int32)))
  down = sljax.wire_size(sljax.CutGradient(jnp.zeros((B, 16))))
  assert record["bytes_up_per_client"] == [up, up] and record["bytes_down_per_client"] == [down, down]
  # the loss: each client's plain mean over its B rows (repeats included), the two clients weighing the same
  x_KxB, _, _ = batches(data, 0, batch_size=B, key=jax.random.wrap_key_data(state.key))
  means = []
  for k, (offset, logits_k) in enumerate(((0, logits[0]), (20, logits[1]))):
    rows = _rows(x[offset:offset + len(logits_k)], x_KxB[k])
    means.append(np.mean(_losses(logits_k, y[offset:offset + len(logits_k)])[rows]))
  assert record["train_batch_loss"] == pytest.approx(np.mean(means), rel=1e-5)
  assert abs(np.mean(_losses(logits[1], y[20:])) - means[1]) > 1e-3  # not the mean over its 3 rows once each


def _losses(logits, labels):
  """Softmax cross-entropy per row, in numpy."""
  logits = logits.astype(np.float64)
  log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return -log_probs[np.arange(len(labels)), labels]
