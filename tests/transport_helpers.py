"""What the transport tests share: running clients in threads, bitwise comparison, and transports
that fail on purpose (a crashing client, a server killed mid-step) or a clock a test can jump."""

import signal
import threading
import time

import chex
import jax
import numpy as np

import sljax
from sljax.transport import wire


def assert_bitwise(a, b):
  """Same tree structure, and every leaf equal bit for bit (dtype included)."""
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True)


def client_data(setup, k, num_clients):
  """Client k's share of the demo's digits, split iid (seed 0) over `num_clients`, as the
  simulations of these tests split them."""
  part = sljax.data.iid(setup.dataset.y_train, num_clients=num_clients, seed=0)[k]
  return setup.dataset.x_train[part], setup.dataset.y_train[part]


def run_in_threads(work, keys, *, timeout, errors_ok=()):
  """Runs `work(k)` for every k in its own thread; returns {k: result}. Exceptions of the types in
  `errors_ok` end a thread quietly (its k is missing from the result); any other is re-raised."""
  results, errors = {}, []

  def one(k):
    try:
      results[k] = work(k)
    except errors_ok:
      pass
    except BaseException as e:  # noqa: BLE001 -- re-raised in the test's thread
      errors.append(e)

  threads = [threading.Thread(target=one, args=(k,)) for k in keys]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)
  if errors:
    raise errors[0]
  assert not any(t.is_alive() for t in threads), "a client did not finish in time"
  return results


class Clock:
  """Real time plus an offset the test can jump ahead, to let a lease run out at once."""

  def __init__(self):
    self.offset = 0.0

  def __call__(self):
    return time.monotonic() + self.offset


class KillAfter:
  """A transport that SIGKILLs the server process once the n-th Forward response (of any client)
  has arrived, so that the step is computed on the server and not committed."""

  def __init__(self, inner, shared):
    self.inner, self.shared = inner, shared

  def call(self, method, request, *, timeout=None):
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Forward":
      with self.shared["lock"]:
        self.shared["forwards"] += 1
        if self.shared["forwards"] == self.shared["kill_at"]:
          self.shared["process"].send_signal(signal.SIGKILL)
          self.shared["process"].wait(timeout=20)
          self.shared["killed"].set()
    return response


class CrashesAfterCommit:
  """A client transport whose process "crashes" (its thread ends with SystemExit) once the Commit
  of (round, step) has been answered: the step is committed on the server."""

  def __init__(self, inner, round_, step):
    self.inner, self.at, self.crashed = inner, (round_, step), threading.Event()

  def call(self, method, request, *, timeout=None):
    if self.crashed.is_set():
      raise SystemExit
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Commit":
      fields = wire.decode(method, request)
      if (fields["round"], fields["step"]) == self.at:
        self.crashed.set()
    return response
