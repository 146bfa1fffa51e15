"""The round driver: jitted rounds, metrics as JSON lines, a progress bar, checkpoints and resume.

All the logic lives in the algorithm's pure `round`; this module only loops, logs and saves. The
whole state (params, optimizer states, PRNG key, round number, which is also every client's data
cursor) is one pytree, so a checkpoint holds all a resumed run needs and resuming gives results
bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sljax._progress import progress_bar
from sljax.algorithms import Algorithm, SimState
from sljax.data.clients import ClientData
from sljax.execution import replicate, shard_clients
from sljax.population import Population, PopulationState
from sljax.training import algorithm_evaluator, reuse_program

if TYPE_CHECKING:
  from sljax.privacy.accounting import Accountant

logger = logging.getLogger(__name__)


def shard(algorithm: Algorithm, state: SimState, data: ClientData, mesh: Mesh) -> tuple[SimState, ClientData]:
  """Places the client axis of the state and the data over `mesh`; the rest is replicated."""
  placed = {}
  for name in ("clients", "server"):
    part = getattr(state, name)
    placed[name] = shard_clients(part, mesh) if getattr(algorithm.client_axes, name) else replicate(part, mesh)
  if algorithm.client_axes.server_codec and not algorithm.client_axes.server:  # one downlink codec state per client
    placed["server"] = placed["server"].replace(codec_state=shard_clients(state.server.codec_state, mesh))
  state = state.replace(**placed, round=replicate(state.round, mesh), key=replicate(state.key, mesh))
  return state, shard_clients(data, mesh)


def _fetch(value):
  """A host copy of a metric, gathering the client axis from other hosts when it is sharded there."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


# The round's training metrics, renamed in records to say what they are: means over the round's
# training batches, measured during the steps (test figures come from `test=`).
_TRAIN_NAMES = {"loss": "train_batch_loss", "accuracy": "train_batch_accuracy"}


def _record(metrics: dict, round_number: int) -> dict:
  out = {"round": round_number}
  for name, value in metrics.items():
    value = _fetch(value)
    out[_TRAIN_NAMES.get(name, name)] = value.item() if value.ndim == 0 else value.tolist()
  return out


# Per-round byte counts that records also carry summed over the rounds so far (as `<name>_cumulative`).
_CUMULATIVE = ("bytes_up", "bytes_down")


def _cumulative_before(metrics_path, start: int) -> dict[str, int]:
  """The byte totals of rounds 1..start: zeros, or those of the metrics file's record of round `start`.

  A total that a resumed run cannot continue (no such record) is left out: it would be wrong.
  """
  if start == 0:
    return {name: 0 for name in _CUMULATIVE}
  found = [r for r in _read_jsonl(metrics_path) if r["round"] == start] if metrics_path is not None else []
  last = found[-1] if found else {}
  totals = {name: int(last[f"{name}_cumulative"]) for name in _CUMULATIVE if f"{name}_cumulative" in last}
  if len(totals) < len(_CUMULATIVE):
    logger.info("resumed at round %d without its metrics record: records leave out the cumulative byte totals", start)
  return totals


def _check_live(state: SimState) -> None:
  """Raises a ValueError naming the donation when the arrays of `state` were deleted."""
  leaves = jax.tree_util.tree_leaves_with_path(state)
  deleted = [path for path, leaf in leaves if isinstance(leaf, jax.Array) and leaf.is_deleted()]
  if deleted:
    raise ValueError(
        f"state: expected a state with live arrays, got one whose arrays were deleted ({len(deleted)} of "
        f"{len(leaves)}, e.g. state{jax.tree_util.keystr(deleted[0])}): it was donated to an earlier "
        "`simulation.run` (which donates its input state by default). Pass the state that run returned, or "
        "run with donate=False to keep the input state usable.")


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _tester(algorithm: Algorithm, state: SimState, test, *, jit: bool) -> Callable[[SimState], dict]:
  """`run`'s `test` checked and placed once: the function of the state that tests it (`sljax.evaluate`)."""
  if isinstance(test, ClientData):
    return algorithm_evaluator(algorithm, state, test, names=("test", "test"), jit=jit)
  if not isinstance(test, (tuple, list)) or len(test) != 2:
    raise ValueError(f"test: expected a test set (x, y) or per-client data (a sljax.data.ClientData), got "
                     f"{type(test).__name__}{f' of length {len(test)}' if isinstance(test, (tuple, list)) else ''}")
  return algorithm_evaluator(algorithm, state, *test, names=("test[0]", "test[1]"), jit=jit)


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """An orbax manager for simulation states (one checkpoint per saved round)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore(manager: ocp.CheckpointManager, like: SimState, step: int | None = None) -> SimState:
  """The state saved at `step` (the latest by default), with the structure of `like`: its jax
  arrays restored as jax arrays placed as in `like`, its numpy arrays (a population's host stores)
  as numpy arrays."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(lambda a: a if isinstance(a, np.ndarray) else ocp.utils.to_shape_dtype_struct(a), like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def run(
    algorithm: Algorithm | Population,
    state: SimState | PopulationState,
    data: ClientData | None,
    *,
    rounds: int,
    test: ClientData | tuple[Any, Any] | None = None,
    eval_every: int = 1,
    jit: bool = True,
    metrics_path: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    evaluate: Callable[[SimState], dict] | None = None,
    progress: bool = False,
    donate: bool = True,
    accountant: Accountant | None = None,
    transcript: Any = None,
) -> tuple[SimState, list[dict]]:
  """Runs rounds until `state.round == rounds`, resuming from `checkpoint_dir` if it has a checkpoint.

  Args:
    algorithm: from `sljax.algorithms`; or a `sljax.population.Population` (rounds on the
      participants gathered from a population: its store is the data, and its host stores are in
      the state and in its checkpoints).
    state: the initial state (`algorithm.init`); replaced by the latest checkpoint if there is one.
    data: the clients' data (`sljax.data.stack_clients`), placed as the state is (see `shard`);
      None for a `Population`.
    rounds: the total number of rounds (not the number still to run).
    test: held-out data, tested every `eval_every` rounds and after the last, as `sljax.evaluate`
      does (softmax cross-entropy for the loss): a test set `(x, y)`, or per-client data (a
      `ClientData`, e.g. `sljax.data.stack_clients` of a held-out split). Where the clients share
      one model (`algorithm.shared_model`: SplitFed, FedAvg, sequential SL, centralized), that model
      on all the samples: `test_accuracy`, `test_loss`. Where each client keeps its own half
      (parallel, local-loss, heterogeneous, U-shaped parallel SL), each half on its client's own
      rows (or on the whole test set `(x, y)`): `test_accuracy_per_client`, `test_accuracy_mean`,
      `test_accuracy_std`, `test_loss_mean`, `test_loss_per_client`. Checked once, before the first
      round (the error names `test` and the shapes); one compiled program for all the rounds.
    eval_every: test (and call `evaluate`) after every `eval_every`-th round and after the last.
    jit: compile each round into one program. Pass False with the `loop` executor to debug.
    metrics_path: append one JSON line per round (its record, see below). On resume, lines after
      the restored round are dropped.
    checkpoint_dir: save the whole state every `checkpoint_every` rounds and at the end.
    evaluate: `evaluate(state) -> dict` merged into the records of the rounds that are tested
      (e.g. other metrics, or `sljax.evaluate` with another loss or batch size).
    progress: show a progress bar over rounds.
    donate: let each jitted round write the new state over the old one
      (`jax.jit(round, donate_argnums=0)`), so that a round holds one state instead of two. The
      `state` passed in is then consumed: its arrays are deleted by the first round, and passing
      it to `run` again raises a ValueError saying so. Pass False to keep using it (e.g. to start
      another run from the same state).
    accountant: a `sljax.privacy.accounting.Accountant` for a run whose uplink adds noise: every
      record then carries `dp_epsilon` and `dp_delta`, the budget spent per example after that
      round (a pure function of the round number, so a resumed run continues it). With its
      `target_epsilon`, the run stops after the last round within the target (that round is tested
      and checkpointed as the last), and a ValueError is raised before any round if the target is
      already spent at the start.
    transcript: None (the default: nothing recorded, the round compiled as always), or a path or a
      `sljax.privacy.transcript.Recorder`: every message of the run is recorded with its round,
      step and client id, as the network server records the same run (`sljax.transport`): each
      step's messages (smashed data up, cut gradient down; U-shaped: body output down, tail
      gradient up too), the client halves handed over (sequential SL, each turn) or handed in and
      averaged (SplitFed), and the initial halves (before round 0) or, in sequential SL, the final
      half (after the last round) that each client fetches. The round is compiled with
      `record=True` (it then also returns its messages); each round's messages reach the host in
      one transfer and a writer thread serializes them. A path's recorder is closed at the end; a
      `Recorder(..., truth=True)` also gets each client's batch of each step it took part in.
      Every split-learning algorithm of `sljax.algorithms.REGISTRY` records; FedAvg and the
      centralized baseline raise a ValueError naming `transcript`.

  Records hold the round's number and metrics as Python numbers: `train_batch_loss` and
  `train_batch_accuracy` (the round's `loss` and `accuracy`: means over its training batches,
  measured during the steps), the bytes up and down (per client and in total), participation and
  completed steps; plus `bytes_up_cumulative` and `bytes_down_cumulative`: the bytes of rounds 1 to
  this one, summed on the host as Python ints (exact past 2**31). A resumed run continues them
  from the metrics file's record of the restored round; without one, its records leave them out.
  The records of tested rounds add the test figures above.

  Example:
    >>> import optax, numpy as np, jax, sljax
    >>> x = np.random.default_rng(0).normal(size=(80, 12)).astype(np.float32)
    >>> y = np.argmax(x[:, :10], 1).astype(np.int32)
    >>> train = sljax.data.stack_clients(x[:64], y[:64], sljax.data.iid(y[:64], num_clients=4, seed=0))
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
    ...                    server_optimizer=optax.sgd(0.1))
    >>> algo = sljax.algorithms.splitfed(sl, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=8),
    ...                                    version=1)
    >>> _, records = run(algo, algo.init(jax.random.key(0), train), train, rounds=3, test=(x[64:], y[64:]),
    ...                  eval_every=2)
    >>> ["test_accuracy" in r for r in records]  # rounds 2 and 3 (the last)
    [False, True, True]

  Calling `run` again with the same `algorithm` and shapes reuses the compiled round.

  Returns:
    The final state and the records of the rounds run in this call.
  """
  for name, value, low, what in (("rounds", rounds, 0, "a non-negative int (the total number of rounds)"),
                                 ("eval_every", eval_every, 1, "a positive int (test every that many rounds)"),
                                 ("checkpoint_every", checkpoint_every, 1,
                                  "a positive int (save every that many rounds)")):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
      raise ValueError(f"{name}: expected {what}, got {value!r}")
  population = algorithm if isinstance(algorithm, Population) else None
  if population is not None:
    if data is not None:
      raise ValueError(f"data: expected None for a Population (its store is the data), got {type(data).__name__}")
    if test is not None and not population.algorithm.shared_model:
      raise ValueError(f"test: a population of {population.algorithm.name} clients keeps a half per client, which "
                       "`test` cannot test; pass evaluate=... (e.g. sljax.evaluate on chosen clients' halves)")
    algorithm = population.algorithm
  manager = checkpoint_manager(checkpoint_dir) if checkpoint_dir is not None else None
  if manager is not None and manager.latest_step() is not None:
    state = restore(manager, state)
    logger.info("resumed from round %d", int(state.round))
  else:
    _check_live(state)
  sim_of = (lambda s: s.sim) if population is not None else (lambda s: s)  # noqa: E731
  test_fn = None if test is None else _tester(algorithm, sim_of(state), test, jit=jit)
  start = int(state.round)
  stop = rounds
  if accountant is not None:
    from sljax.privacy.accounting import Accountant  # noqa: PLC0415 -- dp-accounting is the `privacy` extra

    if not isinstance(accountant, Accountant):
      raise TypeError(f"accountant: expected a sljax.privacy.accounting.Accountant, got {type(accountant).__name__}")
    accountant.check_run(algorithm.local_steps)
    stop = accountant.last_round(start, rounds)
    if stop < rounds:
      logger.info("stopping after round %d of %d: the next would exceed target_epsilon=%s", stop, rounds,
                  accountant.target_epsilon)
  cumulative = _cumulative_before(metrics_path, start)
  if metrics_path is not None:
    _write_jsonl(metrics_path, [r for r in _read_jsonl(metrics_path) if r["round"] <= start])
  round_ = algorithm.round  # held for as long as the program runs (see reuse_program)
  recording = None
  if transcript is not None:
    from sljax.privacy.transcript import RoundRecording  # noqa: PLC0415 -- only when recording

    if population is not None or not jit:
      raise ValueError("transcript: recording runs the jitted round of a stacked simulation (jit=True, no Population)")
    recording = RoundRecording(algorithm, transcript)
    recording.start(state, data)
  if population is not None:
    round_fn = lambda s, _: population.round(s)  # noqa: E731 -- jitted inside, around the host stores
  elif jit and recording is not None:  # another program: the round that also returns its messages
    donated = (0,) if donate else ()
    round_fn = reuse_program(round_, ("round", donated, "record"),
                             lambda f: jax.jit(functools.partial(f, record=True), donate_argnums=donated))
  elif jit:
    donated = (0,) if donate else ()
    round_fn = reuse_program(round_, ("round", donated), lambda f: jax.jit(f, donate_argnums=donated))
  else:
    round_fn = round_
  history = []
  finished = False
  try:
    with progress_bar(range(start, stop), desc=algorithm.name, disable=not progress) as bar:
      for r in bar:
        if recording is None:
          state, metrics = round_fn(state, data)
        else:
          state, metrics = recording.write(r, *round_fn(state, data))
        record = _record(metrics, r + 1)
        for name in _CUMULATIVE:
          if name in cumulative and name in record:
            cumulative[name] += int(record[name])  # a Python int: exact however large the total grows
            record[f"{name}_cumulative"] = cumulative[name]
        if accountant is not None:
          record.update(accountant.record(r + 1))
        if (r + 1) % eval_every == 0 or r + 1 == stop:
          if test_fn is not None:
            record.update(test_fn(sim_of(state)))
          if evaluate is not None:
            record.update(evaluate(state))
        history.append(record)
        if "train_batch_loss" in record:
          bar.set_postfix(loss=f"{record['train_batch_loss']:.4f}")
        if metrics_path is not None:
          with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if manager is not None and ((r + 1) % checkpoint_every == 0 or r + 1 == stop):
          manager.save(r + 1, args=ocp.args.StandardSave(state))
          if (donate and jit) or population is not None:
            # the next round overwrites these arrays (donated, or a population's stores, written in place):
            # let orbax finish reading them first
            manager.wait_until_finished()
    finished = True
  finally:
    if recording is not None:
      recording.finish(state, last=finished)
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return state, history
