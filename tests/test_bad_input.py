"""The Python API's bad inputs (issue 9's sweep): what once trained silently to a wrong result or
escaped as a traceback from deep inside JAX now gets an error naming the argument, the expected and
the actual value."""

import jax
import numpy as np
import optax
import pytest

import sljax
from sljax import simulation

X = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
Y = np.argmax(X[:, :3], 1).astype(np.int32)
MODEL = sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=3), 1)
SL = sljax.vanilla(MODEL, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))


def _with(array, index, value):
  array = array.copy()
  array[index] = value
  return array


@pytest.mark.parametrize("x, y, message", [
    (_with(X, (3, 2), np.nan), Y, r"^x: expected finite values, got nan at index \(3, 2\)$"),
    (_with(X, (0, 0), np.inf), Y, r"^x: expected finite values, got inf at index \(0, 0\)$"),
    (X, _with(Y, 5, -1), r"^y: expected class labels in \[0, 3\), got -1 at index 5$"),
    (X, _with(Y, 0, 7), r"^y: expected class labels in \[0, 3\), got 7 at index 0$"),
    (X, Y[:30], r"^y: expected 40 labels, one per sample of x, got 30$"),
], ids=["nan", "inf", "negative label", "label past the classes", "fewer labels"])
def test_fit_refuses_data_that_would_train_to_a_wrong_result(x, y, message):
  state = SL.init(jax.random.key(0), X[:8])
  with pytest.raises(ValueError, match=message):
    sljax.fit(SL, state, x, y, key=jax.random.key(1), epochs=1, batch_size=8)
  with pytest.raises(ValueError, match=message):
    sljax.evaluate(SL, state, x, y)


def test_bad_sizes_and_arguments_are_named():
  state = SL.init(jax.random.key(0), X[:8])
  with pytest.raises(ValueError, match=r"^epochs: expected a positive int, got 0$"):
    sljax.fit(SL, state, X, Y, key=jax.random.key(1), epochs=0, batch_size=8)
  with pytest.raises(ValueError, match=r"^x, y: expected at least one test sample, got 0$"):
    sljax.evaluate(SL, state, X[:0], Y[:0])
  with pytest.raises(ValueError, match=r"^batch_size: expected a positive int, got 0$"):
    sljax.evaluate(SL, state, X, Y, batch_size=0)
  with pytest.raises(TypeError, match=r"^client_optimizer: expected an optax.GradientTransformation .* got NoneType$"):
    sljax.vanilla(MODEL, client_optimizer=None, server_optimizer=optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"^model: expected a SplitModel .* got list$"):
    sljax.centralized(sljax.models.mlp(hidden=(8,), num_classes=3), optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"^x \(client 1\): expected finite values, got nan at index \(0, 2\)$"):
    sljax.data.stack_clients([X[:4], _with(X[4:8], (0, 2), np.nan)], [Y[:4], Y[4:8]])
  with pytest.raises(ValueError, match=r"^y \(client 0\): expected class labels in \[0, \.\.\.\), got -1 at index 0$"):
    sljax.data.stack_clients([X[:4]], [_with(Y[:4], 0, -1)])
  data = sljax.data.stack_clients([X[:20], X[20:]], [Y[:20], Y[20:]])
  algo = sljax.algorithms.parallel_sl(SL, sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=4))
  state = algo.init(jax.random.key(0), data)
  for kw, message in ((dict(rounds=-1), r"^rounds: expected a non-negative int .*, got -1$"),
                      (dict(rounds=1.5), r"^rounds: expected a non-negative int .*, got 1.5$"),
                      (dict(rounds=1, checkpoint_every=0), r"^checkpoint_every: expected a positive int .*, got 0$")):
    with pytest.raises(ValueError, match=message):
      simulation.run(algo, state, data, **kw)
