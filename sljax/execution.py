"""How the client axis runs: executors, and sharding of the client axis over devices.

An executor maps a per-client function over a leading client axis of its arguments:

    executor(fn, *args) == stack([fn(*[a[k] for a in args]) for k in range(K)])

All of them give the same results; they differ in memory and speed:

- `vmap()`: one batched program over all clients (fastest; memory grows with K).
- `chunked_vmap(chunk_size)`: `lax.map` over chunks of `chunk_size` vmapped clients (bounded memory).
- `lax_map()`: one client at a time inside the compiled program (least memory).
- `loop()`: a Python loop, for debugging. Use it with the round not jitted (`simulation.run`
  does that for you): errors then name the client.

Executors are plain values passed as arguments: there is no global switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


class Executor(NamedTuple):
  """Maps a per-client function over the leading client axis. `jit` says whether rounds may be jitted."""

  name: str
  map: Callable[..., PyTree]
  jit: bool = True

  def __call__(self, fn: Callable[..., PyTree], *args: PyTree) -> PyTree:
    return self.map(fn, *args)


def _num_clients(args) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(args)}
  if len(sizes) != 1:
    raise ValueError(f"client axis: every argument needs the same leading size, got sizes {sorted(sizes)}")
  return sizes.pop()


def vmap() -> Executor:
  """All clients in one batched program."""
  return Executor("vmap", lambda fn, *args: jax.vmap(fn)(*args))


def lax_map() -> Executor:
  """One client after another inside the compiled program (`jax.lax.map`)."""
  return Executor("lax_map", lambda fn, *args: jax.lax.map(lambda a: fn(*a), args))


def chunked_vmap(chunk_size: int) -> Executor:
  """`lax.map` over chunks of `chunk_size` vmapped clients: memory bounded by the chunk.

  The number of clients must be a multiple of `chunk_size`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive number of clients, got {chunk_size}")

  def run(fn, *args):
    k = _num_clients(args)
    if k % chunk_size:
      raise ValueError(f"chunk_size: {k} clients do not split into chunks of {chunk_size}")
    chunks = jax.tree.map(lambda a: a.reshape(k // chunk_size, chunk_size, *a.shape[1:]), args)
    out = jax.lax.map(lambda a: jax.vmap(fn)(*a), chunks)
    return jax.tree.map(lambda a: a.reshape(k, *a.shape[2:]), out)

  return Executor(f"chunked_vmap({chunk_size})", run)


class ClientError(RuntimeError):
  """An error raised inside one client's computation under the `loop` executor."""


def loop() -> Executor:
  """A Python loop over clients, for debugging; errors name the failing client.

  Run it un-jitted (`jax.disable_jit()` or `simulation.run(..., executor=loop())`) to step
  through one client in a debugger.
  """

  def run(fn, *args):
    outs = []
    for k in range(_num_clients(args)):
      try:
        outs.append(fn(*jax.tree.map(lambda a: a[k], args)))
      except Exception as e:  # noqa: BLE001 -- re-raised naming the client
        raise ClientError(f"client {k}: {type(e).__name__}: {e}") from e
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return Executor("loop", run, jit=False)


def client_mesh(devices: Any = None, *, axis_name: str = "clients") -> Mesh:
  """A one-axis device mesh for the client axis (all local devices by default)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (axis_name,))


def shard_clients(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a client-stacked tree with its leading client axis split over the mesh's axis.

  Inside a jitted round, `vmap` over a sharded client axis runs each device's clients on that
  device. The number of clients must be a multiple of the number of devices.
  """
  (axis_name,) = mesh.axis_names
  n = mesh.shape[axis_name]
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
  bad = sorted(s for s in sizes if s % n)
  if bad:
    raise ValueError(f"tree: the client axis must split evenly over {n} devices, got client axes of size {bad}")
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(axis_name)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a tree on every device of the mesh (for state shared by all clients, e.g. one server)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
