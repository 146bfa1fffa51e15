"""`fit` with test data and an evaluation callback: the figures `sljax.evaluate` gives, on the epochs asked for,
in a history of flat records with the same keys."""

import doctest
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import training

B = 8
OPT = optax.sgd(0.1)


def _xy(n, *, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)
  return x, np.argmax(x[:, :10], axis=1).astype(np.int32)


@pytest.fixture(scope="module")
def setup():
  x, y = _xy(84)
  sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=OPT, server_optimizer=OPT)
  return sl, sl.init(jax.random.key(0), x[:1]), (x[:60], y[:60]), (x[60:], y[60:])


def test_test_figures_are_those_of_evaluate_on_the_tested_epochs(setup):
  sl, state, (x, y), (xt, yt) = setup
  calls = []

  def extra(s):
    calls.append(s)
    return {"calls": len(calls), "half": np.float32(0.5)}

  final, history = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=5, batch_size=B, test=(xt, yt),
                             evaluate=extra, eval_every=2)
  tested = [not math.isnan(h["test_accuracy"]) for h in history]
  assert tested == [False, True, False, True, True]  # every second epoch and the last
  assert len(calls) == 3 and [h["calls"] for h in history if not math.isnan(h["calls"])] == [1, 2, 3]
  # one record per epoch, the same keys in each, Python numbers only: what DataFrame(history) or a plot takes
  assert all(list(h) == list(history[0]) for h in history)
  assert all(type(v) in (int, float) for h in history for v in h.values())
  assert history[-1]["half"] == 0.5 and [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
  after = sljax.evaluate(sl, final, xt, yt)
  assert {k: history[-1][f"test_{k}"] for k in after} == after
  assert history[-1]["test_accuracy"] == after["accuracy"]
  # epoch 2 tested the state of epoch 2: that of a 2-epoch fit with the same key
  two, _ = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=2, batch_size=B)
  assert history[1]["test_accuracy"] == sljax.evaluate(sl, two, xt, yt)["accuracy"]
  assert history[1]["test_loss"] == pytest.approx(sljax.evaluate(sl, two, xt, yt)["loss"], rel=1e-6)


def test_evaluate_reports_the_mean_loss_per_sample_over_uneven_batches(setup):
  sl, state, _, (xt, yt) = setup
  whole = sljax.evaluate(sl, state, xt, yt)  # one batch of 24: its mean loss
  assert sljax.evaluate(sl, state, xt, yt, batch_size=16)["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # 16 + 8


class _Vertical(NamedTuple):
  """A trainer over two parties' columns that only counts steps, its logits the first columns of theirs."""

  step: Callable
  predict: Callable


def test_a_pytree_of_party_columns_is_tested_by_vertical_evaluate():
  def step(s, batch, key):
    return s + 1, {"loss": 0.0, "accuracy": 0.0, "bytes_up": 0, "bytes_down": 0}

  def predict(s, xs):
    return jnp.concatenate([xs[0][:, :2], xs[1][:, :1]], -1), {"bytes_up": 1, "bytes_down": 2}

  trainer = _Vertical(step, predict)
  x, y = _xy(40)
  # three classes: no AUC (it imports sklearn)
  xs, test = (x[:32, :5], x[:32, 5:]), ((x[32:, :5], x[32:, 5:]), y[32:] % 3)
  _, history = sljax.fit(trainer, jnp.zeros(()), xs, y[:32] % 3, key=jax.random.key(1), epochs=1, batch_size=B,
                         test=test)
  after = sljax.vertical_evaluate(trainer, jnp.zeros(()), *test)
  assert {k: history[-1][f"test_{k}"] for k in after} == after and after["bytes_down"] == 2


def test_bad_arguments_are_named(setup):
  sl, state, (x, y), (xt, yt) = setup
  fit = lambda **kw: sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=B, **kw)  # noqa: E731
  with pytest.raises(ValueError, match=r"^eval_every: expected a positive int \(test every that many epochs\), "
                                       r"got 0$"):
    fit(test=(xt, yt), eval_every=0)
  with pytest.raises(ValueError, match=r"^test: expected a test set \(x, y\), got tuple of length 1$"):
    fit(test=(xt,))
  with pytest.raises(ValueError, match=r"^test: expected a test set \(x, y\), got ndarray$"):
    fit(test=xt)
  with pytest.raises(ValueError, match=r"^test\[0\]: expected samples of shape \(12,\) as in x, got shape \(24, 10\)$"):
    fit(test=(xt[:, :10], yt))
  with pytest.raises(ValueError, match=r"^test\[0\]: expected the structure of x, PyTreeDef\(\*\), got "
                                       r"PyTreeDef\(\(\*, \*\)\)$"):
    fit(test=((xt, xt), yt))
  with pytest.raises(ValueError, match=r"^test\[1\]: expected 24 integer labels, one per sample of test\[0\], got "
                                       r"shape \(20,\) int32$"):
    fit(test=(xt, yt[:20]))
  with pytest.raises(TypeError, match=r"^evaluate: expected a function of the state returning a dict, got dict$"):
    fit(evaluate={"accuracy": 1.0})
  with pytest.raises(TypeError, match=r"^evaluate: expected a dict of figures, got float$"):
    fit(evaluate=lambda s: 1.0)
  with pytest.raises(ValueError, match=r"^evaluate: expected names other than the record's own, got 'loss'$"):
    fit(evaluate=lambda s: {"loss": 1.0})


def test_docstring_example_runs():
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in doctest.DocTestFinder().find(training.fit, globs={}):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 0
