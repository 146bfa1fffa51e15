"""What the studies in experiments/<study>/ share: data sets, models, partitions, algorithms, output.

Every study builds each algorithm once per (data set, K, schedule) and reuses it across seeds and
partitions: the clients' data is padded to a fixed number of rows (the whole training set), so the
shapes, and so the compiled round (`sljax.simulation.run` keeps one program per `algorithm.round`),
are the same for every seed and partition. Padding rows are never read (`sljax.data.client_batches`).

Import it from a study with `sys.path.insert(0, <experiments>)`; tests/test_studies.py does the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sljax
from sljax.algorithms import REGISTRY, ScheduleConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# The six algorithms of the SplitFed comparison, in table order.
ALGORITHMS = ("centralized", "fedavg", "sequential_sl", "parallel_sl", "splitfed_v1", "splitfed_v2")
CENTRAL = ("centralized", "fedavg")  # built from `sljax.centralized`; the others from `sljax.vanilla`


class Task(NamedTuple):
  """A data set and the split model trained on it."""

  name: str
  load: Callable[[], sljax.data.Dataset]
  model: Callable[[int], sljax.SplitModel]  # num_classes -> the split model


TASKS = {
    "digits": Task("digits", lambda: sljax.data.load_digits(image=False),
                   lambda n: sljax.cut(sljax.models.mlp(hidden=(64, 64), num_classes=n), 1)),
    "breast_cancer": Task("breast_cancer", sljax.data.load_breast_cancer,
                          lambda n: sljax.cut(sljax.models.mlp(hidden=(32, 32), num_classes=n), 1)),
    "wine": Task("wine", sljax.data.load_wine,
                 lambda n: sljax.cut(sljax.models.mlp(hidden=(32, 32), num_classes=n), 1)),
    "mnist1d": Task("mnist1d", sljax.data.make_mnist1d,
                    lambda n: sljax.cut(sljax.models.cnn1d(channels=(16, 32), hidden=64, num_classes=n), 1)),
}


@functools.cache
def dataset(name: str) -> sljax.data.Dataset:
  """The task's data set (split seed 0, as `sljax.data` loads it), loaded once."""
  return TASKS[name].load()


def partition(y: np.ndarray, scheme: str, *, num_clients: int, seed: int) -> list[np.ndarray]:
  """The clients' index arrays: "iid", or "dir<alpha>" (Dirichlet label skew, e.g. "dir0.1")."""
  if scheme == "iid":
    return sljax.data.iid(y, num_clients=num_clients, seed=seed)
  if scheme.startswith("dir"):
    return sljax.data.dirichlet(y, num_clients=num_clients, alpha=float(scheme[3:]), seed=seed)
  raise ValueError(f"scheme: expected 'iid' or 'dir<alpha>', got {scheme!r}")


def padded_clients(x: np.ndarray, y: np.ndarray, parts, rows: int) -> sljax.data.ClientData:
  """`sljax.data.stack_clients(x, y, parts)` padded to `rows` rows per client, whatever the partition.

  The padding is zeros past each client's `count`, which no batch reads: same data, fixed shape.
  """
  data = sljax.data.stack_clients(x, y, parts)
  extra = rows - data.x.shape[1]
  if extra < 0:
    raise ValueError(f"rows: expected at least the largest client's {data.x.shape[1]} rows, got {rows}")
  pad_x = [(0, 0), (0, extra)] + [(0, 0)] * (data.x.ndim - 2)
  return data.replace(x=jnp.pad(data.x, pad_x), y=jnp.pad(data.y, [(0, 0), (0, extra)]))


def build(name: str, model: sljax.SplitModel, config: ScheduleConfig, *, learning_rate: float,
          uplink=None, downlink=None) -> sljax.algorithms.Algorithm:
  """Algorithm `name` of `sljax.algorithms.REGISTRY` on `model`, Adam(`learning_rate`) everywhere."""
  entry = REGISTRY[name]
  adam = optax.adam(learning_rate)
  if name in CENTRAL:
    proto = sljax.centralized(model, optimizer=adam)
  else:
    proto = sljax.vanilla(model, client_optimizer=adam, server_optimizer=adam, uplink=uplink, downlink=downlink)
  return entry.factory(proto, config, **entry.options)


def steps_per_epoch(num_train: int, *, num_clients: int, batch_size: int) -> int:
  """Steps per round so that a round reads about the whole training set once (K clients, batch B each)."""
  return max(1, math.ceil(num_train / (num_clients * batch_size)))


def test_accuracy(record: dict) -> float:
  """The final test accuracy of a run's last record: the shared model's, or the clients' mean."""
  return float(record["test_accuracy"] if "test_accuracy" in record else record["test_accuracy_mean"])


def mean_std(values) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
          "n": int(len(values))}


def environment(seconds: float, **extra) -> dict:
  return {"backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
          "seconds": round(seconds, 1), **extra}


def write_json(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


def figure(*args, **kwargs):
  """A matplotlib Figure drawn off-screen (no pyplot state, no display needed)."""
  from matplotlib.figure import Figure  # noqa: PLC0415 -- matplotlib only when a study plots

  return Figure(*args, **kwargs)


class Timer:
  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.start
