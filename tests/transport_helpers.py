"""What the transport tests share: running clients in threads, bitwise comparison, and transports
that fail on purpose (a crashing client, a server killed mid-step) or a clock a test can jump."""

import signal
import threading
import time

import chex
import grpc
import jax
import numpy as np
import optax

import sljax
from sljax.transport import wire


def own_setup(setup, algorithm, client=0, *, hidden, dropout, lr, cuts=(1, 2)):
  """The set-up client `client` runs in `algorithm`, and the algorithm's options, as `sljax serve`
  builds them from the demo MLP: U-shaped algorithms cut the MLP with two hidden layers in three
  (`u_shaped` legs); heterogeneous parallel SL cuts it at client k's `cuts[k]`; the others run
  `setup` (a `demo.digits_setup`) as it is. Adam with learning rate `lr` on both sides."""
  opt = optax.adam(lr)
  deeper = sljax.models.mlp(hidden=tuple(hidden) * 2, dropout=dropout)
  if algorithm in ("parallel_sl_u", "sequential_sl_u"):
    model = sljax.cut(deeper, 1, 2)
    return setup._replace(model=model, sl=sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt)), {}
  if algorithm == "heterogeneous_parallel_sl":
    model = sljax.cut(deeper, cuts[client])
    return (setup._replace(model=model, sl=sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)),
            {"cuts": list(cuts)})
  return setup, {}


def raw_call(port, method, request, token):
  """`request` (bytes) sent as `method` to the server on loopback `port` over plain gRPC, with the
  bearer `token` (None: no credentials): `(status code, response bytes or the error's details)`."""
  channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 25)])
  metadata = () if token is None else (("authorization", f"Bearer {token}"),)
  try:
    return grpc.StatusCode.OK, channel.unary_unary(wire.method_path(method))(request, metadata=metadata, timeout=30)
  except grpc.RpcError as e:
    return e.code(), e.details()
  finally:
    channel.close()


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


# The points of a client's step where the fault tests kill it: before its Forward is sent; once its
# Forward is answered (the step staged on the server); once the server committed its Commit, before
# the client heard so (and so before it could save anything after it).
KILL_POINTS = ("before forward", "after forward", "after commit")


def _kill_here(point, method, request, at):
  """Whether call (`method`, `request`) of a client is at kill point `point` of step `at` (round, step),
  and so whether to kill before the call ("before forward") or after it."""
  if method != {"before forward": "Forward", "after forward": "Forward", "after commit": "Commit"}[point]:
    return False
  fields = wire.decode(method, request)
  return (fields["round"], fields["step"]) == at


class KillAt:
  """A client transport whose "process" is killed at `point` (one of `KILL_POINTS`) of step
  (round_, step): its thread ends there with SystemExit, so whatever the client held in memory is
  lost, and every later call of this transport raises SystemExit too. `committed` lists the
  (round, step) of the Commits answered before the kill."""

  def __init__(self, inner, point, round_, step):
    if point not in KILL_POINTS:
      raise ValueError(f"point: expected one of {KILL_POINTS}, got {point!r}")
    self.inner, self.point, self.at = inner, point, (round_, step)
    self.killed, self.committed = threading.Event(), []

  def call(self, method, request, *, timeout=None):
    if self.killed.is_set():
      raise SystemExit
    here = _kill_here(self.point, method, request, self.at)
    if here and self.point == "before forward":
      self.killed.set()
      raise SystemExit
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Commit":
      fields = wire.decode(method, request)
      self.committed.append((fields["round"], fields["step"]))
    if here:
      self.killed.set()
      raise SystemExit
    return response


class KillsProcessAt:
  """Wraps a server's `handle` so that it SIGKILLs the process of client `client` (set `process`
  once started) at `point` of its step (round_, step), as the server sees the calls: before serving
  that Forward (the call then fails UNAVAILABLE, like a call cut by the process's death), or after
  serving that Forward or Commit and before its answer is returned to the dead process."""

  def __init__(self, handle, point, client, round_, step):
    if point not in KILL_POINTS:
      raise ValueError(f"point: expected one of {KILL_POINTS}, got {point!r}")
    self.inner, self.point, self.client, self.at = handle, point, client, (round_, step)
    self.process, self.killed = None, threading.Event()

  def _kill(self):
    self.process.send_signal(signal.SIGKILL)
    self.process.wait(timeout=20)
    self.killed.set()

  def handle(self, method, request, *, metadata, peer_names=()):
    here = (not self.killed.is_set() and method in ("Forward", "Commit")
            and wire.decode(method, request)["client"] == self.client
            and _kill_here(self.point, method, request, self.at))
    if here and self.point == "before forward":
      self._kill()
      raise wire.TransportError(grpc.StatusCode.UNAVAILABLE, "the client process was killed")
    response = self.inner(method, request, metadata=metadata, peer_names=peer_names)
    if here:
      self._kill()
    return response
