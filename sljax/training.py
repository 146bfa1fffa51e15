"""A thin driver for one client and one server: epochs of jitted steps, evaluation, inference.

The logic lives in the protocol's pure `step`; this module only shuffles, batches and loops. One
epoch is one jitted program (`lax.scan` over its steps), so Python dispatch never sits on the hot
path; the same driver trains `vanilla`, `u_shaped` and `centralized` trainers.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Programs built by `reuse_program`: per function (held weakly), per static options.
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reuse_program(fn: Callable, options: tuple[Hashable, ...], build: Callable[[Callable], Callable]) -> Callable:
  """`build(fn)` (a jitted program calling `fn`), built once per `fn` and `options`, then reused.

  The drivers (`fit`, `evaluate`, `simulation.run`) get their programs here, so that calling a
  driver again with the same trainer or algorithm (a notebook cell run twice) neither traces nor
  compiles again: `jax.jit` keeps its compiled executables on the jitted object, and a new
  object would start empty. The cache holds `fn` weakly and the program calls `fn` through a
  weak reference, so a trainer that goes away takes its programs with it. A function that cannot
  be held weakly gets a fresh program.

  Args:
    fn: the pure function the program runs (`trainer.step`, `algorithm.round`); keep a reference
      to it while the program runs.
    options: the static options `build` depends on (e.g. `("epoch", batch_size)`).
    build: makes the jitted program from a function standing for `fn`.
  """
  try:
    programs = _PROGRAMS.setdefault(fn, {})
  except TypeError:  # not weakly referenceable, or not hashable
    return build(fn)
  if options not in programs:
    ref = weakref.ref(fn)

    def call(*args, **kwargs):
      return ref()(*args, **kwargs)

    call.__name__ = call.__qualname__ = getattr(fn, "__name__", "fn")
    programs[options] = build(call)
  return programs[options]


def _check_labels(x, y) -> None:
  """Raises a ValueError unless `y` holds one label per sample (row) of `x`."""
  if x.ndim == 0:
    raise ValueError(f"x: expected samples along a leading axis, got shape {x.shape}")
  if y.ndim == 0 or y.shape[0] != x.shape[0]:
    got = y.shape[0] if y.ndim else f"shape {y.shape}"
    raise ValueError(f"y: expected {x.shape[0]} labels, one per sample of x, got {got}")


def _check_batch_size(n: int, batch_size: int) -> None:
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size: expected at least 1 and at most the {n} training samples, got {batch_size}")


def make_epoch(step: Callable, *, batch_size: int) -> Callable:
  """A jitted function running one shuffled epoch of `step` over (x, y).

  `epoch(state, x, y, key) -> (state, metrics)` where `metrics` stacks the per-step metrics. The
  data order and the step keys derive from `key` alone. The last partial batch is dropped (the
  `n % batch_size` samples left after the shuffle, different ones each epoch), so every step has
  the same shape and nothing recompiles.
  """

  @jax.jit
  def epoch(state, x, y, key):
    n = x.shape[0]
    _check_batch_size(n, batch_size)
    steps = n // batch_size
    k_perm, k_steps = jax.random.split(key)
    order = jax.random.permutation(k_perm, n)[: steps * batch_size].reshape(steps, batch_size)

    def body(state, inputs):
      idx, k = inputs
      return step(state, (x[idx], y[idx]), k)

    return jax.lax.scan(body, state, (order, jax.random.split(k_steps, steps)))

  return epoch


def fit(
    trainer: Any,
    state: Any,
    x: Any,
    y: Any,
    *,
    key: jax.Array,
    epochs: int,
    batch_size: int,
    progress: bool = False,
    description: str = "training",
) -> tuple[Any, list[dict[str, float]]]:
  """Trains for `epochs` shuffled epochs and returns the state and per-epoch metrics.

  Every epoch takes `len(x) // batch_size` full batches of a fresh shuffle; the
  `len(x) % batch_size` samples left over (different ones each epoch) are dropped, so that every
  step has one shape. Each record says how many (`dropped_samples`), and a log message too.

  Calling `fit` again with the same `trainer` and data shapes reuses the compiled epoch.

  Args:
    trainer: anything with a pure `step(state, (x, y), key) -> (state, metrics)`
      (`vanilla`, `u_shaped`, `centralized`).
    state: the trainer's state (from `trainer.init`).
    x, y: the training data.
    key: PRNG key; epoch `e` uses `fold_in(key, e)` for its order and step keys.
    epochs: number of passes.
    batch_size: samples per step.
    progress: show a progress bar.
    description: the progress bar's label.

  Returns:
    The final state and, per epoch, the mean loss and accuracy, the total bytes up and down
    (Python ints, exact past 2**31) and the number of samples the epoch dropped.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  _check_labels(x, y)
  n = x.shape[0]
  _check_batch_size(n, batch_size)
  dropped = n % batch_size
  if dropped:
    logger.info("fit: %d samples make %d batches of %d; each epoch drops the %d left over (different ones each epoch)",
                n, n // batch_size, batch_size, dropped)
  step = trainer.step  # held for as long as the program runs (see reuse_program)
  epoch_fn = reuse_program(step, ("epoch", batch_size), lambda f: make_epoch(f, batch_size=batch_size))
  history = []
  with tqdm(range(epochs), desc=description, disable=not progress, leave=False) as bar:
    for e in bar:
      state, metrics = epoch_fn(state, x, y, jax.random.fold_in(key, e))
      metrics = jax.device_get(metrics)
      steps = len(metrics["loss"])
      record = {
          "epoch": e + 1,
          "loss": float(np.mean(metrics["loss"])),
          "accuracy": float(np.mean(metrics["accuracy"])),
          # static per-step counts (see protocol.Metrics) or per-step arrays alike
          "bytes_up": int(np.sum(np.broadcast_to(np.asarray(metrics["bytes_up"], np.int64), (steps,)))),
          "bytes_down": int(np.sum(np.broadcast_to(np.asarray(metrics["bytes_down"], np.int64), (steps,)))),
          "dropped_samples": dropped,
      }
      history.append(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}")
      logger.debug("epoch %d: %s", e + 1, record)
  return state, history


def evaluate(trainer: Any, state: Any, x: Any, y: Any, *, batch_size: int = 1024) -> dict[str, float]:
  """Accuracy and inference traffic of collaborative inference (client forward, then server).

  Every sample counts: the last batch may be smaller (one more compile, for its shape). Calling
  `evaluate` again with the same `trainer` and shapes reuses the compiled programs.
  """
  predict_fn = trainer.predict  # held for as long as the program runs (see reuse_program)
  predict = reuse_program(predict_fn, ("predict",), jax.jit)
  x, y = np.asarray(x), np.asarray(y)
  _check_labels(x, y)
  correct, bytes_up, bytes_down = 0, 0, 0
  for start in range(0, len(x), batch_size):
    out, traffic = predict(state, jnp.asarray(x[start : start + batch_size]))
    correct += int(np.sum(np.argmax(np.asarray(out), axis=-1) == y[start : start + batch_size]))
    bytes_up += int(traffic["bytes_up"])
    bytes_down += int(traffic["bytes_down"])
  return {"accuracy": correct / len(x), "bytes_up": bytes_up, "bytes_down": bytes_down}
