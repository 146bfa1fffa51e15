"""Two processes joined by jax.distributed (CPU, gloo) run one sharded simulation; it equals one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from sljax import simulation

sys.path.insert(0, os.path.dirname(__file__))
from multihost_setup import make  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  out = tmp_path / "state.npz"
  port = str(_free_port())
  worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", port, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  algo, state, data = make()
  state, history = simulation.run(algo, state, data, rounds=2)
  got = np.load(out)
  np.testing.assert_allclose(got["loss"], [h["train_batch_loss"] for h in history], rtol=1e-6)
  for i, leaf in enumerate(jax.tree.leaves(state)):
    np.testing.assert_allclose(got[f"arr_{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6)
