"""The drivers (`fit`, `evaluate`, `simulation.run`): no recompilation across calls, donated states, dropped
samples, exact byte totals."""

import json
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import algorithms as A
from sljax import data as D
from sljax import simulation
from sljax.protocol import Metrics
from compile_helpers import count_compiles

B = 8
OPT = optax.sgd(0.1)


def _xy(n, *, features=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  return x, np.argmax(x[:, :10], axis=1).astype(np.int32)


def _model():
  return sljax.cut(sljax.models.mlp(hidden=(16,)), 1)


def _parallel(num_clients=4):
  x, y = _xy(96)
  data = D.stack_clients(x, y, D.iid(y, num_clients=num_clients, seed=0))
  sl = sljax.vanilla(_model(), client_optimizer=OPT, server_optimizer=OPT)
  algo = A.parallel_sl(sl, A.ScheduleConfig(num_clients=num_clients, batch_size=B))
  return algo, data


def test_fit_and_evaluate_again_neither_trace_nor_compile():
  chex.clear_trace_counter()
  x, y = _xy(64)
  sl = sljax.vanilla(_model(), client_optimizer=OPT, server_optimizer=OPT)
  # what a notebook cell re-run does: the same trainer, the same shapes
  # predict: traced once for the outputs' width (fit's check of the labels' range) and once by evaluate's program
  sl = sl._replace(step=chex.assert_max_traces(sl.step, n=1), predict=chex.assert_max_traces(sl.predict, n=2))
  state = sl.init(jax.random.key(0), x[:1])
  first, first_history = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=2, batch_size=B)
  first_eval = sljax.evaluate(sl, first, x, y, batch_size=32)
  with count_compiles() as compiles:
    again, again_history = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=2, batch_size=B)
    again_eval = sljax.evaluate(sl, again, x, y, batch_size=32)
  assert compiles == []
  assert again_history == first_history and again_eval == first_eval
  chex.assert_trees_all_equal(again, first)


def test_run_again_neither_traces_nor_compiles():
  chex.clear_trace_counter()
  algo, data = _parallel()
  algo = algo._replace(round=chex.assert_max_traces(algo.round, n=1))
  histories = []
  for i in range(2):  # a cell that starts a run from a fresh state, run twice
    state = algo.init(jax.random.key(0), data)
    with count_compiles() as compiles:
      _, history = simulation.run(algo, state, data, rounds=2)
    assert i == 0 or compiles == []
    histories.append(history)
  assert histories[0] == histories[1]


def _fake_algorithm(bytes_up, bytes_down):
  """An algorithm whose round only counts, reporting fixed per-round byte counts (int32, as real rounds do)."""

  def init(key, data):
    del data
    return A.SimState(clients=jnp.zeros(()), server=jnp.zeros(()), round=jnp.zeros((), jnp.int32),
                      key=jax.random.key_data(key))

  def round_(state, data, inputs=None):
    del data, inputs
    metrics = {"loss": jnp.float32(0.0), "bytes_up": jnp.int32(bytes_up), "bytes_down": jnp.int32(bytes_down)}
    return state.replace(round=state.round + 1), metrics

  return A.Algorithm("fake", init, round_, predict=lambda state, x, client=0: x, local_steps=1)


def test_run_with_a_donated_state_says_so():
  algo, data = _fake_algorithm(1, 1), jnp.zeros((1,))
  state = algo.init(jax.random.key(0), data)
  kept, _ = simulation.run(algo, state, data, rounds=1, donate=False)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  after, _ = simulation.run(algo, state, data, rounds=1)  # donates by default: consumes `state`
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  with pytest.raises(ValueError, match=r"^state: .* deleted .* donated to an earlier `simulation.run` .* Pass the "
                                       r"state that run returned, or run with donate=False"):
    simulation.run(algo, state, data, rounds=2)
  more, _ = simulation.run(algo, after, data, rounds=2)  # the state a run returns goes on
  assert int(more.round) == 2


def test_run_resuming_from_a_checkpoint_takes_a_donated_state(tmp_path):
  algo, data = _fake_algorithm(1, 1), jnp.zeros((1,))
  state = algo.init(jax.random.key(0), data)
  simulation.run(algo, state, data, rounds=1, checkpoint_dir=tmp_path)
  # the same cell again: `state` was donated, but the checkpoint replaces it
  resumed, history = simulation.run(algo, state, data, rounds=2, checkpoint_dir=tmp_path)
  assert int(resumed.round) == 2 and [r["round"] for r in history] == [2]


def test_run_byte_totals_past_2_31_are_exact(tmp_path):
  up, down = 2**31 - 1, 2**30  # the largest per-round counts an int32 holds
  algo = _fake_algorithm(up, down)
  data = jnp.zeros((1,))
  metrics = tmp_path / "metrics.jsonl"
  state, history = simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=3, metrics_path=metrics)
  assert [r["bytes_up_cumulative"] for r in history] == [up, 2 * up, 3 * up]
  assert [r["bytes_down_cumulative"] for r in history] == [down, 2 * down, 3 * down]
  assert history[-1]["bytes_up_cumulative"] == 6_442_450_941 > 2**32
  # a run continuing from round 3 continues the totals of the metrics file
  _, more = simulation.run(algo, state, data, rounds=5, metrics_path=metrics, donate=False)
  assert [r["bytes_up_cumulative"] for r in more] == [4 * up, 5 * up]
  lines = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["bytes_up_cumulative"] for r in lines] == [k * up for k in range(1, 6)]
  assert [r["bytes_down_cumulative"] for r in lines] == [k * down for k in range(1, 6)]
  # without the earlier records, a continued run cannot know the totals: it leaves them out
  _, alone = simulation.run(algo, state, data, rounds=4)
  assert "bytes_up" in alone[0] and "bytes_up_cumulative" not in alone[0]


def _counting_trainer(bytes_up, bytes_down, *, static=True):
  """A trainer whose step only counts steps (its state), reporting fixed per-step byte counts."""

  def step(state, batch, key):
    del batch, key
    arrays = {"loss": jnp.float32(0.0), "accuracy": jnp.float32(0.0)}
    if static:  # as the protocols count them: Python ints in the metrics' structure
      return state + 1, Metrics(arrays, {"bytes_up": bytes_up, "bytes_down": bytes_down})
    return state + 1, {**arrays, "bytes_up": jnp.int32(bytes_up), "bytes_down": jnp.int32(bytes_down)}

  return sljax.centralized(_model(), optimizer=OPT)._replace(step=step)


@pytest.mark.parametrize("static", [True, False])
def test_fit_byte_totals_past_2_31_are_exact(static):
  up, down = 2**30, 2**31 - 1
  trainer = _counting_trainer(up, down, static=static)
  x, y = _xy(4 * B)
  _, history = sljax.fit(trainer, jnp.zeros((), jnp.int32), x, y, key=jax.random.key(0), epochs=2, batch_size=B)
  assert [h["bytes_up"] for h in history] == [4 * up] * 2 == [2**32] * 2
  assert [h["bytes_down"] for h in history] == [4 * down] * 2


def test_fit_states_the_samples_it_drops(caplog):
  trainer = _counting_trainer(1, 1)
  x, y = _xy(100)
  with caplog.at_level(logging.INFO, logger="sljax.training"):
    steps, history = sljax.fit(trainer, jnp.zeros((), jnp.int32), x, y, key=jax.random.key(1), epochs=2,
                               batch_size=32)
  assert int(steps) == 2 * 3  # three full batches per epoch, no partial one
  assert [h["dropped_samples"] for h in history] == [4, 4] and [h["bytes_up"] for h in history] == [3, 3]
  assert "100 samples make 3 batches of 32; each epoch drops the 4 left over" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="sljax.training"):
    steps, history = sljax.fit(trainer, jnp.zeros((), jnp.int32), x[:96], y[:96], key=jax.random.key(1), epochs=1,
                               batch_size=32)
  assert int(steps) == 3 and history[0]["dropped_samples"] == 0 and "drops" not in caplog.text


def test_fit_and_evaluate_reject_labels_of_another_length():
  sl = sljax.vanilla(_model(), client_optimizer=OPT, server_optimizer=OPT)
  x, y = _xy(100)
  state = None  # checked before the state is used
  with pytest.raises(ValueError, match=r"^y: expected 100 labels, one per sample of x, got 90$"):
    sljax.fit(sl, state, x, y[:90], key=jax.random.key(1), epochs=1, batch_size=10)
  with pytest.raises(ValueError, match=r"^y: expected 100 labels, one per sample of x, got 90$"):
    sljax.evaluate(sl, state, x, y[:90])


@pytest.mark.parametrize("batch_size", [0, 101])
def test_fit_rejects_a_batch_size_out_of_range(batch_size):
  sl = sljax.vanilla(_model(), client_optimizer=OPT, server_optimizer=OPT)
  x, y = _xy(100)
  state = None  # checked before the state is used
  with pytest.raises(ValueError, match=rf"^batch_size: expected at least 1 and at most the 100 training samples, "
                                       rf"got {batch_size}$"):
    sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=batch_size)
