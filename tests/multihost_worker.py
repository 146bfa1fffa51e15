"""One process of the two-process test in test_multihost.py (run as a script, not collected)."""

import os
import sys

process_id, num_processes, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
# Two devices per process; XLA compiling for a quick start, as in the test process (tests/conftest.py).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                           process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from sljax import execution, simulation  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from multihost_setup import make  # noqa: E402

algo, state, data = make()
mesh = execution.client_mesh()  # all 4 devices of both processes
state, data = simulation.shard(algo, state, data, mesh)
state, history = simulation.run(algo, state, data, rounds=2)
leaves = [np.asarray(multihost_utils.process_allgather(leaf, tiled=True)) for leaf in jax.tree.leaves(state)]
if process_id == 0:
  np.savez(out_path, *leaves, loss=np.asarray([h["train_batch_loss"] for h in history]))
