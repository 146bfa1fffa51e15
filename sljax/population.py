"""Population-scale simulation: each round costs what its participants cost, not the population.

Cross-device studies draw a few clients per round out of a large population. A `ScheduleConfig`
with `participation < 1` runs every round on all K clients and masks those that do not take part,
with every client's data and state on the device as one K-wide array. `Population` runs the same
algorithm on the participants only:

- a `ClientStore` keeps the population's data on the host (numpy, or memory-mapped files on
  disk), each client's samples without padding to the largest client;
- each round draws its M participants (a pure function of the run key and the round:
  `sljax.algorithms._common.participants`, the same draw as the masked round's), gathers their
  data and their per-client state, runs the algorithm's jitted round on M clients (M fixed, so
  one compiled program), and scatters their new state back;
- per-client state (client halves and optimizer states in parallel SL, optimizer and codec states
  in SplitFed) lives in a host `StateStore` that allocates a client's row when it first takes
  part; what every client shares after each round (SplitFed's and FedAvg's averaged halves,
  `ClientAxes.averaged`) is kept once. SplitFed and FedAvg with a stateless client optimizer
  (plain SGD) and stateless codecs keep nothing per client: a population of millions costs its
  data only;
- the next round's data is gathered and sent to the device while the current round runs.

A round over the participants equals the masked round over the whole population with the others
absent, up to float summation order (the server sums M clients' rows instead of K, zeros
included), because every draw of a client (its keys, its data order, its drops, its place in an
order) depends on its id only (`Schedule`, `ClientData.ids`). The tests check it for every
algorithm, with drops and codecs. Server halves with batch statistics are the exception: the
masked round computes them over all K clients' rows, absent ones included.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import mmap
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sljax.algorithms import _common as c
from sljax.data.checks import check_finite, check_label_values
from sljax.data.clients import ClientData
from sljax.execution import shard_clients

logger = logging.getLogger(__name__)

PyTree = Any


class ClientStore:
  """A population's training data on the host: every client's samples, without padding.

  Rows of all clients are concatenated: client k holds rows `offsets[k]:offsets[k + 1]` of `x`
  and `y`. The arrays may be numpy arrays or memory maps (`save` / `open` with `mmap=True`), so a
  population larger than memory stays on disk and a round reads its participants' rows only.

  Attributes:
    x: features, (total rows, *feature_shape).
    y: int32 labels, (total rows,).
    offsets: int64, (num_clients + 1,): where each client's rows start and end.

  Example:
    >>> store = ClientStore.from_clients([np.ones((3, 2)), np.zeros((1, 2))], [np.array([0, 1, 0]), np.array([1])])
    >>> store.num_clients, store.counts.tolist(), store.gather(np.array([1]), rows=3).count.tolist()
    (2, [3, 1], [1])
  """

  def __init__(self, x, y, offsets):
    x, y, offsets = x if isinstance(x, np.ndarray) else np.asarray(x), np.asarray(y), np.asarray(offsets)
    if offsets.ndim != 1 or len(offsets) < 2 or not np.issubdtype(offsets.dtype, np.integer):
      raise ValueError(f"offsets: expected a 1-D integer array of num_clients + 1 >= 2 entries, got shape "
                       f"{offsets.shape} and dtype {offsets.dtype}")
    if offsets[0] != 0 or offsets[-1] != len(x) or np.any(np.diff(offsets) < 0):
      raise ValueError(f"offsets: expected non-decreasing offsets from 0 to len(x)={len(x)}, got from {offsets[0]} "
                       f"to {offsets[-1]}")
    if x.ndim < 1 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"x, y: expected one integer label per row, got x of shape {x.shape} and y of shape {y.shape} "
                       f"and dtype {y.dtype}")
    empty = np.flatnonzero(np.diff(offsets) == 0)
    if len(empty):
      raise ValueError(f"offsets: expected every client to hold at least one sample, got {len(empty)} empty "
                       f"client(s), e.g. client {int(empty[0])}")
    if not isinstance(x, np.memmap):  # a store opened from disk is read where gathered, not scanned here
      check_finite("x", x)
      check_label_values("y", y)
    self.x, self.y, self.offsets = x, y.astype(np.int32, copy=False), offsets.astype(np.int64)
    self._counts = np.diff(self.offsets)  # computed once: a round gathers its clients' counts in O(M)
    self._max_count = int(self._counts.max())

  @classmethod
  def from_clients(cls, xs: Sequence, ys: Sequence) -> ClientStore:
    """A store of one array of features and one of labels per client (a natural partition)."""
    if len(xs) == 0 or len(xs) != len(ys):
      raise ValueError(f"xs, ys: expected one array per client, and at least one, got {len(xs)} and {len(ys)}")
    shapes = {np.shape(x)[1:] for x in xs}
    if len(shapes) != 1:
      raise ValueError(f"xs: expected every client's features to have one shape, got {sorted(shapes)}")
    counts = np.array([len(x) for x in xs], np.int64)
    for k, (x, y) in enumerate(zip(xs, ys)):
      if np.shape(y) != (len(x),):
        raise ValueError(f"ys[{k}]: expected {len(x)} labels (client {k}'s samples), got shape {np.shape(y)}")
    return cls(np.concatenate([np.asarray(x) for x in xs]), np.concatenate([np.asarray(y) for y in ys]),
               np.concatenate([[0], np.cumsum(counts)]))

  @classmethod
  def from_partition(cls, x, y, parts: Sequence) -> ClientStore:
    """A store of the rows `parts[k]` of `x` and `y` for client k (the `sljax.data` partitioners'
    index arrays)."""
    x, y = np.asarray(x), np.asarray(y)
    order = np.concatenate([np.asarray(p, np.int64) for p in parts])
    counts = np.array([len(p) for p in parts], np.int64)
    return cls(x[order], y[order], np.concatenate([[0], np.cumsum(counts)]))

  def save(self, directory: str | os.PathLike) -> None:
    """Writes `x.npy`, `y.npy` and `offsets.npy` into `directory` (made if missing)."""
    os.makedirs(directory, exist_ok=True)
    for name in ("x", "y", "offsets"):
      np.save(os.path.join(directory, f"{name}.npy"), getattr(self, name))

  @classmethod
  def open(cls, directory: str | os.PathLike, *, mmap: bool = True) -> ClientStore:
    """The store `save` wrote; with `mmap`, memory-mapped read-only: rows are read when gathered."""
    mode = "r" if mmap else None
    return cls(*(np.load(os.path.join(directory, f"{name}.npy"), mmap_mode=mode) for name in ("x", "y", "offsets")))

  @property
  def num_clients(self) -> int:
    return len(self.offsets) - 1

  @property
  def counts(self) -> np.ndarray:
    """(num_clients,) int64: each client's number of samples."""
    return self._counts

  @property
  def max_count(self) -> int:
    """The largest client's number of samples: the rows each gathered client is padded to."""
    return self._max_count

  def gather(self, ids, *, rows: int | None = None) -> ClientData:
    """The clients `ids` (sorted ascending) as a `ClientData` on the host (numpy), padded to `rows`
    rows each (default: the largest client's count, so every round has one shape), with `ids` set."""
    ids = np.asarray(ids, np.int64)
    rows = self.max_count if rows is None else rows
    counts = self.counts[ids]
    if np.any(counts > rows):
      raise ValueError(f"rows: expected at least the largest gathered client's {int(counts.max())} samples, got {rows}")
    # one fancy-indexing read per array: row r of client k is store row offsets[k] + r, padding reads row 0
    r = np.arange(rows)
    index = np.where(r[None, :] < counts[:, None], self.offsets[ids][:, None] + r[None, :], 0)
    pad = r[None, :] < counts[:, None]
    x = np.asarray(self.x[index.ravel()]).reshape(len(ids), rows, *self.x.shape[1:])
    x = np.where(pad.reshape(*pad.shape, *(1,) * (x.ndim - 2)), x, np.zeros((), x.dtype))
    y = np.where(pad, np.asarray(self.y[index.ravel()]).reshape(len(ids), rows), 0).astype(np.int32)
    return ClientData(x, y, counts.astype(np.int32), ids.astype(np.int32))


def _lazy_zeros(shape: tuple, dtype) -> np.ndarray:
  """Zeros whose memory the OS allocates when a row is first written, a 4 KiB page at a time.

  `np.zeros` asks Linux for transparent huge pages on arrays of 4 MB and more
  (`madvise(MADV_HUGEPAGE)`), and then the first write of a client's row zero-fills the 2 MiB
  around it: 64 scattered rows a round cost 100 to 500 ms, and the whole (N, ...) store becomes
  resident after a few dozen rounds (parallel SL, N = 10^5: 845 MB). An anonymous mapping with
  `MADV_NOHUGEPAGE` keeps both the cost and the memory to the rows written.
  """
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  if size < 4 << 20 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
    return np.zeros(shape, dtype)
  buffer = mmap.mmap(-1, size)
  buffer.madvise(mmap.MADV_NOHUGEPAGE)
  return np.frombuffer(buffer, dtype).reshape(shape)


@struct.dataclass
class PopulationState:
  """The whole state of a population run: what a resumed run needs.

  Attributes:
    sim: the algorithm's state on M clients; its per-client parts are those of the last round's
      participants (the store holds every client's), its shared parts everyone's.
    store: the per-client leaves on the host, (N, ...) numpy arrays, one per leaf of `sim` that
      `Population.per_client` selects.
    seen: (N,) bools: the clients whose rows of `store` were written; the others hold the initial
      per-client values (`initial`).
    initial: the per-client leaves' initial values, one client's (what `init` gives every client).
  """

  sim: c.SimState
  store: tuple
  seen: np.ndarray
  initial: tuple

  @property
  def round(self):
    return self.sim.round

  @property
  def key(self):
    return self.sim.key


@dataclasses.dataclass(frozen=True)
class _Split:
  """Which leaves of a `SimState` are per client: a bool per leaf of the flattened state."""

  per_client: tuple[bool, ...]
  treedef: Any


def _per_client_mask(algorithm: c.Algorithm, state: c.SimState) -> _Split:
  """The leaves of `state` kept per client: the stacked parties' (`ClientAxes`) and the server's
  per-client codec states, except the fields every client shares after each round (`averaged`)."""
  axes = algorithm.client_axes

  def party_mask(party, stacked: bool):
    if not stacked:
      return jax.tree.map(lambda _: False, party)
    return party.replace(**{f.name: jax.tree.map(lambda _, keep=f.name not in axes.averaged: keep,
                                                 getattr(party, f.name))
                            for f in dataclasses.fields(party) if f.metadata.get("pytree_node", True)})

  mask = state.replace(clients=party_mask(state.clients, axes.clients), server=party_mask(state.server, axes.server),
                       round=False, key=False)
  if axes.server_codec and not axes.server:
    mask = mask.replace(server=mask.server.replace(codec_state=jax.tree.map(lambda _: True,
                                                                          state.server.codec_state)))
  leaves, treedef = jax.tree.flatten(mask)
  return _Split(tuple(bool(b) for b in leaves), treedef)


class Population:
  """An algorithm run over a population of `store.num_clients` clients, M of them per round.

  `algorithm` is built for the M participants of a round (`config.num_clients = M`,
  `config.participation = 1`); `config.drop_rate` applies to them. Round r draws its
  participants and their drops as the same algorithm built for all N clients with
  `participation = M / N` draws them (`sample_inputs`), gathers their data from `store` and their
  state from the host, runs the algorithm's jitted round on them, and writes their state back.
  The result equals that masked round (see the module's docstring) at a cost set by M.

  Args:
    algorithm: from `sljax.algorithms`, built with `num_clients = M`; not heterogeneous parallel
      SL (its clients differ by index) nor the centralized baseline (no clients).
    store: the population's data (a `ClientStore`).
    prefetch: gather and send the next round's data to the device while a round runs.
    mesh: a client mesh (`sljax.execution.client_mesh`) to shard the M participants over, as
      `sljax.simulation.shard` places a stacked run (M a multiple of its size); None: one device.

  Example:
    >>> import optax, sljax
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.normal(size=(int(n), 12)).astype(np.float32) for n in rng.integers(1, 20, size=1000)]
    >>> store = ClientStore.from_clients(xs, [np.argmax(x[:, :10], 1) for x in xs])
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
    ...                    server_optimizer=optax.sgd(0.1))
    >>> algo = sljax.algorithms.splitfed(sl, sljax.algorithms.ScheduleConfig(num_clients=8, batch_size=4),
    ...                                  version=1)
    >>> population = Population(algo, store)
    >>> state = population.init(jax.random.key(0))
    >>> state, metrics = population.round(state)
    >>> metrics["participants"].shape, int(state.round)
    ((8,), 1)
  """

  def __init__(self, algorithm: c.Algorithm, store: ClientStore, *, prefetch: bool = True, mesh=None):
    if not isinstance(algorithm, c.Algorithm) or algorithm.config is None:
      raise TypeError(f"algorithm: expected a sljax.algorithms algorithm, got {type(algorithm).__name__}")
    if algorithm.name in ("heterogeneous_parallel_sl", "centralized"):
      raise ValueError(f"algorithm: {algorithm.name} cannot run over a population (expected an algorithm whose "
                       "clients are interchangeable: parallel, U-shaped parallel, local-loss or sequential SL, "
                       "SplitFed v1/v2, FedAvg)")
    if not isinstance(store, ClientStore):
      raise TypeError(f"store: expected a sljax.population.ClientStore, got {type(store).__name__}")
    config = algorithm.config
    if config.participation != 1.0:
      raise ValueError(f"algorithm: expected one built for the round's participants (config.participation=1.0, "
                       f"num_clients=M), got participation={config.participation}")
    if store.num_clients < config.num_clients:
      raise ValueError(f"store: expected a population of at least config.num_clients={config.num_clients} clients "
                       f"(the participants of a round), got {store.num_clients}")
    if mesh is not None and config.num_clients % mesh.size:
      raise ValueError(f"mesh: expected a mesh whose {mesh.size} devices divide the {config.num_clients} participants "
                       "of a round (config.num_clients)")
    self.algorithm, self.store, self.prefetch, self.mesh = algorithm, store, prefetch, mesh
    self.num_participants, self.num_clients = config.num_clients, store.num_clients
    self._round = jax.jit(algorithm.round, donate_argnums=0)
    self._draw = jax.jit(self._inputs)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sljax-prefetch") if prefetch else None
    self._next: tuple[tuple[int, bytes], concurrent.futures.Future] | None = None  # (round, run key): its data
    self._split: _Split | None = None

  def _inputs(self, run_key, round_):
    """Round `round_`'s participants (M,) and their drops (S, M), as `sample_inputs` draws them."""
    config = self.algorithm.config
    k_part, k_drop = jax.random.split(jax.random.fold_in(c.round_key_of(run_key, round_), 0))
    ids = c.participants(k_part, self.num_clients, self.num_participants)
    dropped = c.sample_drops(k_drop, ids, local_steps=config.local_steps, drop_rate=config.drop_rate)
    return ids, dropped

  def reference_config(self) -> c.ScheduleConfig:
    """The `ScheduleConfig` of the masked equivalent: the algorithm over all N clients with
    `participation = M / N` (what a round here equals)."""
    config = self.algorithm.config
    return dataclasses.replace(config, num_clients=self.num_clients,
                               participation=self.num_participants / self.num_clients)

  def init(self, key: jax.Array) -> PopulationState:
    """Every client starts from the algorithm's initial state (`algorithm.init(key, ...)`), as in the
    masked run over the whole population."""
    data = self.store.gather(np.arange(self.num_participants))
    sim = self.algorithm.init(key, jax.tree.map(jnp.asarray, data))
    split = self._split_of(sim)
    leaves = jax.tree.leaves(sim)
    initial = tuple(np.asarray(leaf[0]) for leaf, keep in zip(leaves, split.per_client) if keep)
    store = tuple(_lazy_zeros((self.num_clients, *a.shape), a.dtype) for a in initial)
    return PopulationState(sim, store, np.zeros((self.num_clients,), bool), initial)

  def _split_of(self, sim: c.SimState) -> _Split:
    if self._split is None:
      self._split = _per_client_mask(self.algorithm, sim)
    return self._split

  def _data(self, state_key, round_: int):
    """Round `round_`'s participants, drops and data on the device."""
    ids, dropped = self._draw(state_key, jnp.int32(round_))
    data = self.store.gather(np.asarray(ids))
    return ids, dropped, (jax.device_put(data) if self.mesh is None else shard_clients(data, self.mesh))

  def round(self, state: PopulationState) -> tuple[PopulationState, dict]:
    """One round on the participants: `(state, metrics)`. The metrics are the algorithm's for the M
    participants (per-client figures in the order of `metrics["participants"]`, their ids).

    The state is consumed: its device arrays are donated to the jitted round and its host stores
    are written in place (keep the returned state, as with `simulation.run`'s donation).
    """
    if not isinstance(state, PopulationState):
      raise TypeError(f"state: expected a PopulationState (from Population.init), got {type(state).__name__}")
    spec = state.sim.clients.input_spec
    if (tuple(self.store.x.shape[1:]), np.dtype(self.store.x.dtype).name) != (tuple(spec.shape), spec.dtype):
      raise ValueError(f"store: expected features of the model's input {spec.describe()}, got "
                       f"(B, {', '.join(map(str, self.store.x.shape[1:]))}) {np.dtype(self.store.x.dtype).name}")
    round_, run_key = int(state.sim.round), np.asarray(state.sim.key)  # a host copy: the round donates the state
    if self._next is not None and self._next[0] == (round_, run_key.tobytes()):
      ids, dropped, data = self._next[1].result()
    else:
      ids, dropped, data = self._data(run_key, round_)
    self._next = None
    if self._pool is not None:
      self._next = ((round_ + 1, run_key.tobytes()), self._pool.submit(self._data, run_key, round_ + 1))
    host_ids = np.asarray(ids)
    sim = self._gather_state(state, host_ids)
    inputs = c.RoundInputs(jnp.ones((self.num_participants,), bool), dropped)
    sim, metrics = self._round(sim, data, inputs)
    state = self._scatter_state(state, sim, host_ids)
    return state, {**metrics, "participants": host_ids}

  def _gather_state(self, state: PopulationState, ids: np.ndarray) -> c.SimState:
    split = self._split_of(state.sim)
    leaves = jax.tree.leaves(state.sim)
    seen = state.seen[ids]
    gathered = iter(np.where(seen.reshape(-1, *(1,) * (init.ndim)), store[ids], init[None])
                    for store, init in zip(state.store, state.initial))
    out = [jnp.asarray(next(gathered)) if keep else leaf for leaf, keep in zip(leaves, split.per_client)]
    sim = jax.tree.unflatten(split.treedef, out)
    if self.mesh is not None:
      from sljax.simulation import shard  # noqa: PLC0415 -- sljax.simulation imports this module

      sim, _ = shard(self.algorithm, sim, (), self.mesh)
    return sim

  def _scatter_state(self, state: PopulationState, sim: c.SimState, ids: np.ndarray) -> PopulationState:
    split = self._split_of(sim)
    per_client = [leaf for leaf, keep in zip(jax.tree.leaves(sim), split.per_client) if keep]
    for store, leaf in zip(state.store, jax.device_get(per_client)):
      store[ids] = leaf
    state.seen[ids] = True
    return state.replace(sim=sim)

  def close(self) -> None:
    """Stops the prefetching thread."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
