"""Evaluation of every algorithm (`sljax.evaluate`, `simulation.run(test=...)`): equal to accuracy computed by hand
with `algo.predict`, per client where each client keeps its own half; `eval_every`; no recompilation; bad test data."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import algorithms as A
from sljax import data as D
from sljax import simulation, training
from compile_helpers import count_compiles

K = 4
B = 8
OPT = optax.adam(1e-2)


def _xy(n, *, features=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  return x, np.argmax(x[:, :10], axis=1).astype(np.int32)


def _clients(n, *, seed, uneven=False):
  x, y = _xy(n, seed=seed)
  parts = D.quantity_skew(y, num_clients=K, alpha=0.5, seed=seed) if uneven else D.iid(y, num_clients=K, seed=seed)
  return D.stack_clients(x, y, parts)


def _layers():
  return sljax.models.mlp(hidden=(16, 16))


def _sl():
  return sljax.vanilla(sljax.cut(_layers(), 1), client_optimizer=OPT, server_optimizer=OPT)


def _config(**kw):
  return A.ScheduleConfig(num_clients=K, batch_size=B, **kw)


ALGORITHMS = {  # every algorithm in the registry, small
    "sequential_sl": lambda: A.sequential_sl(_sl(), _config()),
    "sequential_sl_u": lambda: A.sequential_sl_u(
        sljax.u_shaped(sljax.cut(_layers(), 1, 2), client_optimizer=OPT, server_optimizer=OPT), _config()),
    "parallel_sl": lambda: A.parallel_sl(_sl(), _config()),
    "parallel_sl_u": lambda: A.u_shaped_parallel_sl(
        sljax.u_shaped(sljax.cut(_layers(), 1, 2), client_optimizer=OPT, server_optimizer=OPT), _config()),
    "splitfed_v1": lambda: A.splitfed(_sl(), _config(), version=1),
    "splitfed_v2": lambda: A.splitfed(_sl(), _config(), version=2),
    "local_loss_sl": lambda: A.local_loss_sl(_sl(), _config(), aux_head=A.linear_head(10)),
    "heterogeneous_parallel_sl": lambda: A.heterogeneous_parallel_sl(_sl(), _config(), cuts=[1, 2, 1, 2]),
    "fedavg": lambda: A.fedavg(sljax.centralized(sljax.cut(_layers(), 1), optimizer=OPT), _config()),
    "centralized": lambda: A.centralized_baseline(sljax.centralized(sljax.cut(_layers(), 1), optimizer=OPT),
                                                  _config()),
}
SHARED = {"sequential_sl", "sequential_sl_u", "splitfed_v1", "splitfed_v2", "fedavg", "centralized"}


def _by_hand(algo, state, x, y, client=0):
  """Accuracy and mean softmax cross-entropy of client `client`'s model on (x, y), through `algo.predict`."""
  logits = algo.predict(state, jnp.asarray(x), client=client)
  hits = np.argmax(np.asarray(logits), -1) == np.asarray(y)
  return float(np.mean(hits)), float(sljax.softmax_cross_entropy(logits, jnp.asarray(y)))


def test_every_algorithm_says_whether_its_clients_share_a_model():
  assert set(ALGORITHMS) == set(A.REGISTRY)
  assert {name for name, make in ALGORITHMS.items() if make().shared_model} == SHARED


@pytest.mark.parametrize("name", ["splitfed_v1", "splitfed_v2", "fedavg"])
def test_shared_model_test_figures_equal_accuracy_by_hand(name):
  algo = ALGORITHMS[name]()
  train = _clients(96, seed=0, uneven=True)
  x, y = _xy(40, seed=1)
  state = algo.init(jax.random.key(0), train)
  state, records = simulation.run(algo, state, train, rounds=2, test=(x, y), donate=False)
  accuracy, loss = _by_hand(algo, state, x, y)
  assert records[-1]["test_accuracy"] == accuracy
  np.testing.assert_allclose(records[-1]["test_loss"], loss, rtol=1e-5)
  assert "test_accuracy_per_client" not in records[-1]
  # every client holds the shared model: any client's half gives the same figures
  assert _by_hand(algo, state, x, y, client=K - 1)[0] == accuracy
  # `evaluate` gives the records' figures, also in batches of 16 (the last one padded, its padding not counted)
  figures = sljax.evaluate(algo, state, x, y, batch_size=16)
  assert figures["test_accuracy"] == accuracy and set(figures) == {"test_accuracy", "test_loss"}
  np.testing.assert_allclose(figures["test_loss"], loss, rtol=1e-5)
  # per-client data of a shared model: all its rows together
  held_out = _clients(64, seed=2, uneven=True)
  rows = [np.arange(int(n)) for n in held_out.count]
  xs = np.concatenate([np.asarray(held_out.x[k])[r] for k, r in enumerate(rows)])
  ys = np.concatenate([np.asarray(held_out.y[k])[r] for k, r in enumerate(rows)])
  result = sljax.evaluate(algo, state, held_out)
  assert result["test_accuracy"] == _by_hand(algo, state, xs, ys)[0]
  np.testing.assert_allclose(result["test_loss"], _by_hand(algo, state, xs, ys)[1], rtol=1e-5)


def test_parallel_sl_tests_each_client_on_its_own_data():
  algo = ALGORITHMS["parallel_sl"]()
  train, held_out = _clients(96, seed=0), _clients(64, seed=3, uneven=True)
  counts = np.asarray(held_out.count)
  assert len(set(counts.tolist())) > 1  # uneven: padding rows must not count
  state = algo.init(jax.random.key(0), train)
  state, records = simulation.run(algo, state, train, rounds=3, test=held_out, donate=False)
  by_hand = [_by_hand(algo, state, held_out.x[k, :n], held_out.y[k, :n], client=k) for k, n in enumerate(counts)]
  accuracies, losses = np.array([a for a, _ in by_hand]), np.array([l for _, l in by_hand])
  assert len(set(accuracies.tolist())) > 1  # the halves differ, so the wrong client's half would show
  record = records[-1]
  assert record["test_accuracy_per_client"] == accuracies.tolist()
  assert record["test_accuracy_mean"] == pytest.approx(accuracies.mean(), abs=1e-12)
  assert record["test_accuracy_std"] == pytest.approx(accuracies.std(), abs=1e-12)
  np.testing.assert_allclose(record["test_loss_per_client"], losses, rtol=1e-5)
  np.testing.assert_allclose(record["test_loss_mean"], losses.mean(), rtol=1e-5)
  assert "test_accuracy" not in record
  # rows past a client's count never count: labelled with the half's own predictions, they change nothing
  predicted = np.stack([np.argmax(np.asarray(algo.predict(state, held_out.x[k], client=k)), -1) for k in range(K)])
  padding = np.arange(held_out.y.shape[1])[None, :] >= counts[:, None]
  poisoned = held_out.replace(y=jnp.asarray(np.where(padding, predicted, held_out.y), jnp.int32))
  assert padding.any() and sljax.evaluate(algo, state, poisoned) == sljax.evaluate(algo, state, held_out)
  # a global test set: every client's half on all of it
  x, y = _xy(40, seed=1)
  result = sljax.evaluate(algo, state, x, y, batch_size=32)
  assert result["test_accuracy_per_client"] == [_by_hand(algo, state, x, y, client=k)[0] for k in range(K)]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_evaluate_works_for_every_algorithm_and_predict_returns_logits(name):
  algo = ALGORITHMS[name]()
  train, held_out = _clients(64, seed=0), _clients(48, seed=4, uneven=True)
  state = algo.init(jax.random.key(0), train)  # no round: compiling one per algorithm is for other tests
  logits = algo.predict(state, held_out.x[1, :5], client=1)
  assert isinstance(logits, jax.Array) and logits.shape == (5, 10)
  result = sljax.evaluate(algo, state, held_out)
  assert isinstance(result, dict)
  counts = np.asarray(held_out.count)
  if name in SHARED:
    assert set(result) == {"test_accuracy", "test_loss"}
  else:  # heterogeneous parallel SL's predict takes a concrete client: one call per client in the program
    expected = [_by_hand(algo, state, held_out.x[k, :n], held_out.y[k, :n], client=k)[0] for k, n in enumerate(counts)]
    assert result["test_accuracy_per_client"] == expected


def test_eval_every_and_the_last_round():
  algo = ALGORITHMS["splitfed_v2"]()
  train = _clients(64, seed=0)
  x, y = _xy(24, seed=1)
  hooked = []

  def extra(state):
    hooked.append(int(state.round))
    return {"extra": int(state.round)}

  state = algo.init(jax.random.key(0), train)
  _, records = simulation.run(algo, state, train, rounds=5, test=(x, y), eval_every=2, evaluate=extra)
  assert [r["round"] for r in records if "test_accuracy" in r] == [2, 4, 5]  # every 2nd round, and the last
  assert hooked == [2, 4, 5] and [r.get("extra") for r in records] == [None, 2, None, 4, 5]
  # the training figures say what they are: means over the round's training batches
  assert {"train_batch_loss", "train_batch_accuracy"} <= set(records[0])
  assert "loss" not in records[0] and "accuracy" not in records[0]


def test_evaluation_compiles_once_across_rounds_and_calls():
  chex.clear_trace_counter()
  algo = ALGORITHMS["parallel_sl"]()
  algo = algo._replace(predict=chex.assert_max_traces(algo.predict, n=1))
  train, held_out = _clients(64, seed=0), _clients(40, seed=5, uneven=True)
  x, y = _xy(24, seed=1)
  for i in range(2):  # a notebook cell run twice
    state = algo.init(jax.random.key(0), train)
    with count_compiles() as compiles:
      state, records = simulation.run(algo, state, train, rounds=3, test=held_out)
      figures = sljax.evaluate(algo, state, held_out)
    assert i == 0 or compiles == []
    assert figures == {k: records[-1][k] for k in figures}  # the records' figures, from the same program
  # a test set of another shape is another program (one more trace); evaluated again, it compiles nothing more
  chex.clear_trace_counter()
  sljax.evaluate(algo, state, x, y)
  with count_compiles() as compiles:
    sljax.evaluate(algo, state, x, y)
  assert compiles == []


def test_bad_test_data_names_the_argument_and_the_shapes():
  algo = ALGORITHMS["parallel_sl"]()
  train = _clients(64, seed=0)
  state = algo.init(jax.random.key(0), train)
  x, y = _xy(16, seed=1)
  with pytest.raises(ValueError, match=r"^test\[0\]: expected shape \(N, 12\) float32 \(the model's input\), got "
                                       r"\(16, 9\) float32$"):
    simulation.run(algo, state, train, rounds=1, test=(x[:, :9], y))
  with pytest.raises(ValueError, match=r"^test\[1\]: expected 16 integer labels, one per sample of test\[0\], got "
                                       r"\(15,\) int32$"):
    simulation.run(algo, state, train, rounds=1, test=(x, y[:15]))
  x3, y3 = _xy(48, seed=2)
  three = D.stack_clients(x3, y3, D.iid(y3, num_clients=3, seed=0))
  with pytest.raises(ValueError, match=r"^test: expected per-client data of 4 clients \(the state's\), got 3 "
                                       r"\(x of shape \(3, 16, 12\) float32\)$"):
    simulation.run(algo, state, train, rounds=1, test=three)
  narrow = D.stack_clients(x3[:, :9], y3, D.iid(y3, num_clients=K, seed=0))
  with pytest.raises(ValueError, match=r"^test\.x: expected shape \(4, N, 12\) float32 \(the model's input per "
                                       r"client\), got \(4, 12, 9\) float32$"):
    simulation.run(algo, state, train, rounds=1, test=narrow)
  with pytest.raises(ValueError, match=r"^test: expected a test set \(x, y\) or per-client data"):
    simulation.run(algo, state, train, rounds=1, test=x)
  with pytest.raises(ValueError, match=r"^eval_every: expected a positive int .*, got 0$"):
    simulation.run(algo, state, train, rounds=1, test=(x, y), eval_every=0)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # refused before the first round
  with pytest.raises(ValueError, match=r"^x: expected shape \(N, 12\) float32 \(the model's input\), got "
                                       r"\(16, 12\) int32$"):
    sljax.evaluate(algo, state, x.astype(np.int32), y)
  with pytest.raises(ValueError, match=r"^y: expected None with per-client data \(its labels are x\.y\), got "):
    sljax.evaluate(algo, state, train, y)
  with pytest.raises(ValueError, match=r"^y: expected one integer label per sample of x, got None$"):
    sljax.evaluate(algo, state, x)
  # a shared model takes per-client data of any number of clients: its rows are one test set
  assert "test_accuracy" in sljax.evaluate(ALGORITHMS["splitfed_v2"](), ALGORITHMS["splitfed_v2"]().init(
      jax.random.key(0), train), three)


@pytest.mark.parametrize("fn", [training.evaluate, simulation.run], ids=["evaluate", "run"])
def test_docstring_examples_run(fn):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in doctest.DocTestFinder().find(fn, globs={"run": simulation.run}):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 0, fn.__name__
