"""A thin driver for one client and one server: epochs of jitted steps, evaluation, inference.

The logic lives in the protocol's pure `step`; this module only shuffles, batches and loops. One
epoch is one jitted program (`lax.scan` over its steps), so Python dispatch never sits on the hot
path; the same driver trains `vanilla`, `u_shaped` and `centralized` trainers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def make_epoch(step: Callable, *, batch_size: int) -> Callable:
  """A jitted function running one shuffled epoch of `step` over (x, y).

  `epoch(state, x, y, key) -> (state, metrics)` where `metrics` stacks the per-step metrics. The
  data order and the step keys derive from `key` alone. The last partial batch is dropped, so
  every step has the same shape and nothing recompiles.
  """

  @jax.jit
  def epoch(state, x, y, key):
    n = x.shape[0]
    steps = n // batch_size
    if steps == 0:
      raise ValueError(f"batch_size: expected at most the {n} training samples, got {batch_size}")
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
    The final state and, per epoch, the mean loss and accuracy and the total bytes up and down.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  epoch_fn = make_epoch(trainer.step, batch_size=batch_size)
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
      }
      history.append(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}")
      logger.debug("epoch %d: %s", e + 1, record)
  return state, history


def evaluate(trainer: Any, state: Any, x: Any, y: Any, *, batch_size: int = 1024) -> dict[str, float]:
  """Accuracy and inference traffic of collaborative inference (client forward, then server)."""
  predict = jax.jit(trainer.predict)
  x, y = np.asarray(x), np.asarray(y)
  correct, bytes_up, bytes_down = 0, 0, 0
  for start in range(0, len(x), batch_size):
    out, traffic = predict(state, jnp.asarray(x[start : start + batch_size]))
    correct += int(np.sum(np.argmax(np.asarray(out), axis=-1) == y[start : start + batch_size]))
    bytes_up += int(traffic["bytes_up"])
    bytes_down += int(traffic["bytes_down"])
  return {"accuracy": correct / len(x), "bytes_up": bytes_up, "bytes_down": bytes_down}
