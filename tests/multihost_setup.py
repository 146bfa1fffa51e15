"""The run shared by test_multihost.py and its worker processes."""

import jax
import numpy as np
import optax

import sljax
from sljax import algorithms as A
from sljax import data as D


def make():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 12)).astype(np.float32)
  y = np.argmax(x[:, :10], axis=1).astype(np.int32)
  data = D.stack_clients(x, y, D.iid(y, num_clients=8, seed=0))
  sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16, 16)), 1), client_optimizer=optax.adam(1e-2),
                     server_optimizer=optax.adam(1e-2))
  algo = A.parallel_sl(sl, A.ScheduleConfig(num_clients=8, batch_size=8))
  return algo, algo.init(jax.random.key(2), data), data
