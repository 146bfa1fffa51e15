"""A client killed at each point of a step and restarted, with and without its own checkpoint, for
every algorithm served over the network: the run completes, no step is lost or applied twice, and
it ends bit for bit as the uninterrupted run where the restart loses nothing, or within 1e-5 of the
simulation with the same drop (`RoundInputs.dropped`) where a step is lost with the client.

The kill points (`transport_helpers.KILL_POINTS`): before the client's Forward of step 1 of round 0,
once that Forward is answered (the step staged), and once its Commit is done on the server, before
the client heard so. A client restarted from its checkpoint resumes at the server's position
(it saved its half after each step before sending the Commit). Without a checkpoint, a sequential SL
client redoes its turn from the half the server relayed at the turn's start (the server rolls its
own half back to the turn's start); a client of an algorithm whose clients train at once leaves
the round (`Handover leave`: dropped at once, as a lease would) and joins the next one with the
initial half (SplitFed: with the average), which the simulation's reference reproduces by the drop
and a reset of that client's state before the next round.

Most cells crash a client thread in process (`KillAt`: its memory is gone); two cells SIGKILL an
`sljax client` process (`KillsProcessAt`, the server in this process sees the calls). The full
matrix runs for parallel SL; each other algorithm runs the cells listed in `CELLS`, and every
algorithm the full matrix with `pytest tests/test_faults.py --fault-matrix=full` (docs/protocol.md, "Faults").
Every wait is bounded: a hang fails.

Set-up: the demo MLP (digits, 64 -> 32 | -> 10, dropout, so every key matters) with Adam, two
clients with an iid split of digits, 2 rounds of 3 steps with batches of 16; client 1 is killed.
"""

import json
import subprocess
import sys
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sljax
from sljax import transport as T
from sljax.algorithms import RoundInputs
from sljax.privacy import handoff
from sljax.transport import client as transport_client
from sljax.transport import demo
from sljax.transport import schedule as sched
from sljax.transport import wire
from transport_helpers import (KILL_POINTS, KillAt, KillsProcessAt, assert_bitwise, client_data, own_setup,
                               run_in_threads)

HIDDEN = (32,)
DROPOUT = 0.25
LR = 2e-3
SEED = 0
SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=3, batch_size=16)
TOKENS = {0: "token-zero", 1: "token-one"}
TIMEOUT = 120  # seconds any one wait may take before the test fails
KILLED, AT = 1, (0, 1)  # client 1 is killed in step 1 of round 0
SEQUENTIAL = ("sequential_sl", "sequential_sl_u")
U_SHAPED = ("parallel_sl_u", "sequential_sl_u")
CUTS = {"heterogeneous_parallel_sl": [1, 2]}  # client k's cut into the MLP with two hidden layers
STEPS = [(r, s) for r in range(SCHEDULE.rounds) for s in range(SCHEDULE.local_steps)]

ALGORITHMS = (*T.ALGORITHMS, *SEQUENTIAL)
# `pytest --fault-matrix=full`: every kill point, with and without a checkpoint, for every algorithm.
FULL_MATRIX = [(a, p, c) for a in ALGORITHMS for p in KILL_POINTS for c in (True, False)]
# The default run (the test-time budget): the full matrix for parallel SL, and for each other algorithm one or two
# cells: every kill point and both restarts among them, the rollback of a sequential turn (plain and U-shaped), and
# SplitFed's leave.
CELLS = [(a, p, c) for a, p, c in FULL_MATRIX if a == "parallel_sl"] + [
    ("sequential_sl", "after forward", False),
    ("sequential_sl", "after commit", True),
    ("sequential_sl_u", "after forward", False),
    ("parallel_sl_u", "after commit", True),
    ("heterogeneous_parallel_sl", "before forward", True),
    ("local_loss_sl", "after commit", True),
    ("splitfed_v1", "after commit", False),
    ("splitfed_v2", "after commit", False),
]


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=HIDDEN, dropout=DROPOUT, lr=LR)


_BUILT = {}  # (algorithm, client) -> (set-up, options), and algorithm -> the simulated algorithm: built once


def _for(setup, algorithm, client=0):
  """The set-up client `client` runs in `algorithm`, and the algorithm's options (as in
  tests/test_transport_concurrent.py: U-shaped and heterogeneous cuts of the MLP with two hidden layers).
  Built once per test session, so that every server and client of the algorithm reuses its compiled steps."""
  if (algorithm, client) not in _BUILT:
    _BUILT[algorithm, client] = _build(setup, algorithm, client)
  return _BUILT[algorithm, client]


def _algorithm(setup, algorithm):
  """The simulated algorithm both the servers and the simulation run, built once."""
  if algorithm not in _BUILT:
    own, options = _for(setup, algorithm)
    _BUILT[algorithm] = sched.algorithm(algorithm, own.sl, SCHEDULE, sljax.ArraySpec.of(setup.dataset.x_train),
                                        **options)
  return _BUILT[algorithm]


def _build(setup, algorithm, client):
  return own_setup(setup, algorithm, client, hidden=HIDDEN, dropout=DROPOUT, lr=LR, cuts=CUTS.get(algorithm, ()))


def _server(setup, algorithm, **extra):
  own, options = _for(setup, algorithm)
  kw = {"schedule": SCHEDULE, "input_spec": sljax.ArraySpec.of(setup.dataset.x_train), "key": jax.random.key(SEED),
        "tokens": {t: k for k, t in TOKENS.items()}, "lease_seconds": 60.0, "simulated": _algorithm(setup, algorithm)}
  kw.update(extra)
  if algorithm in SEQUENTIAL:
    return T.SplitServer(own.model, own.sl, **kw)
  return T.ConcurrentServer(own.model, own.sl, algorithm=algorithm, options=options, **kw)


def _client(setup, algorithm, k, transport, checkpoint_dir=None):
  x, y = client_data(setup, k, SCHEDULE.num_clients)
  own, options = _for(setup, algorithm, k)
  return T.run(T.connect(transport, own.model, own.sl, client=k, x=x, y=y, options=options),
               checkpoint_dir=checkpoint_dir)


def _join_all(threads):
  for t in threads:
    t.join(TIMEOUT)
  assert not any(t.is_alive() for t in threads), "a client did not finish in time"


def _kill_and_restart(work, zero, killing, restarted, *, never="reached its kill point"):
  """Client 0 runs `work(0, zero)` and client KILLED `work(KILLED, killing)`, each in a thread; once
  `killing` has killed client KILLED (its thread ends there, its memory lost), client KILLED starts
  again as `work(KILLED, restarted)`. Returns {client: result} of the runs that finished; every wait
  is bounded, and what a client raised (SystemExit, the kill, aside) is raised here."""
  results, errors = {}, []

  def one(k, transport):
    try:
      results[k] = work(k, transport)
    except SystemExit:
      pass
    except BaseException as e:  # noqa: BLE001 -- re-raised below
      errors.append(e)

  threads = [threading.Thread(target=one, args=(0, zero), daemon=True),
             threading.Thread(target=one, args=(KILLED, killing), daemon=True)]
  for t in threads:
    t.start()
  assert killing.killed.wait(TIMEOUT), f"client {KILLED} never {never}"
  threads[1].join(TIMEOUT)
  assert not threads[1].is_alive() and KILLED not in results
  threads.append(threading.Thread(target=one, args=(KILLED, restarted), daemon=True))
  threads[-1].start()
  _join_all(threads)
  assert not errors, errors
  return results


_REFERENCES = {}


@pytest.fixture(scope="module")
def reference(setup):
  """algorithm -> (server, results) of the uninterrupted in-process run, computed once per algorithm."""

  def get(algorithm):
    if algorithm not in _REFERENCES:
      server = _server(setup, algorithm)
      results = run_in_threads(lambda k: _client(setup, algorithm, k, T.InProcessTransport(server.handle,
                                                                                            token=TOKENS[k])),
                               TOKENS, timeout=TIMEOUT)
      _REFERENCES[algorithm] = server, results
    return _REFERENCES[algorithm]

  yield get
  _REFERENCES.clear()
  _BUILT.clear()


def _simulate(setup, algorithm, dropped_step):
  """The simulation of the run in which client 1 drops in step `dropped_step` of round 0 (gone for
  the rest of the round; None: it completes the round) and restarts before round 1 with the initial
  half (SplitFed: its params and model state are the average every client receives, its optimizer
  and codec states the initial)."""
  algo = _algorithm(setup, algorithm)
  parts = sljax.data.iid(setup.dataset.y_train, num_clients=SCHEDULE.num_clients, seed=0)
  data = sljax.data.stack_clients(setup.dataset.x_train, setup.dataset.y_train, parts)
  initial = algo.init(jax.random.key(SEED), data)
  everyone = jnp.ones(SCHEDULE.num_clients, bool)
  dropped = np.zeros((SCHEDULE.local_steps, SCHEDULE.num_clients), bool)
  if dropped_step is not None:
    dropped[dropped_step, KILLED] = True
  round_fn = jax.jit(algo.round)
  state, _ = round_fn(initial, data, RoundInputs(everyone, jnp.asarray(dropped)))
  if algorithm in CUTS:  # a tuple of client groups, one per cut; with cuts [1, 2], client k is group k's only member
    clients = list(state.clients)
    clients[KILLED] = initial.clients[KILLED]
    state, _ = round_fn(state.replace(clients=tuple(clients)), data, RoundInputs(everyone, jnp.zeros_like(dropped)))
    return state
  fresh = jax.tree.map(lambda a: a[KILLED], initial.clients)
  if algorithm.startswith("splitfed"):
    after = jax.tree.map(lambda a: a[KILLED], state.clients)
    fresh = fresh.replace(params=after.params, model_state=after.model_state)
  state = state.replace(clients=jax.tree.map(lambda a, f: a.at[KILLED].set(f), state.clients, fresh))
  state, _ = round_fn(state, data, RoundInputs(everyone, jnp.zeros_like(dropped)))
  return state


def _resumed_at(algorithm, point, checkpoint):
  """Where the restarted client starts: (round, step) it resumes at, None if it leaves round 0."""
  if algorithm in SEQUENTIAL and not checkpoint:
    return (0, 0)  # the turn starts over from the half the server relayed
  if not checkpoint:
    return None
  return (AT[0], AT[1] + (point == "after commit"))


def pytest_generate_tests(metafunc):
  """The kill-point cells: `CELLS`, or with `--fault-matrix=full` (tests/conftest.py) `FULL_MATRIX`."""
  if metafunc.definition.name == "test_a_client_killed_and_restarted_loses_and_doubles_no_step":
    cells = FULL_MATRIX if metafunc.config.getoption("fault_matrix") == "full" else CELLS
    metafunc.parametrize(("algorithm", "point", "checkpoint"), cells,
                         ids=[f"{a}-{p.replace(' ', '_')}-{'checkpoint' if c else 'none'}" for a, p, c in cells])


def test_a_client_killed_and_restarted_loses_and_doubles_no_step(setup, reference, tmp_path, algorithm, point,
                                                                  checkpoint):
  server = _server(setup, algorithm)
  killing = KillAt(T.InProcessTransport(server.handle, token=TOKENS[KILLED]), point, *AT)
  directory = tmp_path / "client-1" if checkpoint else None  # both processes of client 1 use it
  results = _kill_and_restart(
      lambda k, transport: _client(setup, algorithm, k, transport, directory if k == KILLED else None),
      T.InProcessTransport(server.handle, token=TOKENS[0]), killing,
      T.InProcessTransport(server.handle, token=TOKENS[KILLED]))
  assert set(results) == {0, KILLED}
  assert [(h["round"], h["step"]) for h in results[0].history] == STEPS

  resumed = _resumed_at(algorithm, point, checkpoint)
  history = [(h["round"], h["step"]) for h in results[KILLED].history]
  if resumed is not None:  # nothing lost: the restarted process takes every step from where it resumed
    expected_server, expected = reference(algorithm)
    assert history == STEPS[STEPS.index(resumed):]
    if algorithm not in SEQUENTIAL or checkpoint:  # together, both processes committed each step exactly once
      assert killing.committed + history == STEPS
    assert_bitwise(jax.device_get(server.state), jax.device_get(expected_server.state))
    for k in (0, KILLED):
      assert_bitwise(results[k].half, expected[k].half)
    return
  # Without a checkpoint: client 1 leaves round 0 after the steps it committed, and takes round 1 whole.
  assert history == STEPS[SCHEDULE.local_steps:]
  assert killing.committed + history == [(0, s) for s in range(len(killing.committed))] + STEPS[SCHEDULE.local_steps:]
  sim = _simulate(setup, algorithm, dropped_step=len(killing.committed))
  chex.assert_trees_all_close(server.state.server.params, sim.server.params, atol=1e-5, rtol=0)
  view = _algorithm(setup, algorithm).schedule.clients  # where the clients differ (a cut per client)
  for k in (0, KILLED):
    party = view.party(sim, k) if view is not None else jax.tree.map(lambda a, k=k: a[k], sim.clients)
    chex.assert_trees_all_close(results[k].half.params, party.params, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(results[k].half.opt_state, party.opt_state, atol=1e-5, rtol=0)


def _cli(*args):
  return [sys.executable, "-m", "sljax.cli", *args, "--hidden", ",".join(map(str, HIDDEN)), "--lr", str(LR),
          "--dropout", str(DROPOUT), "--num-clients", str(SCHEDULE.num_clients)]


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
def test_a_client_process_sigkilled_after_the_commit_resumes_from_its_checkpoint(setup, reference, tmp_path,
                                                                                 algorithm):
  """A real `sljax client --checkpoint-dir` process, SIGKILLed once the server has committed its step 1
  of round 0 and before the answer reaches it, restarted on the same directory: the run ends bit for
  bit as the uninterrupted one, and the restarted process takes the steps from step 2 on."""
  expected_server, expected = reference(algorithm)
  server = _server(setup, algorithm)
  killing = KillsProcessAt(server.handle, "after commit", KILLED, *AT)
  running = T.serve(killing.handle, address="127.0.0.1:0", authenticate=server.authenticate_metadata)
  tokens = tmp_path / "tokens.txt"
  tokens.write_text("".join(f"{k} {t}\n" for k, t in TOKENS.items()))
  command = _cli("client", "--target", f"127.0.0.1:{running.port}", "--client-id", str(KILLED), "--token-file",
                 str(tokens), "--json", "--checkpoint-dir", str(tmp_path / "client-1"))
  results, processes = {}, []
  zero = threading.Thread(target=lambda: results.update(
      {0: _client(setup, algorithm, 0, T.InProcessTransport(server.handle, token=TOKENS[0]))}), daemon=True)
  try:
    zero.start()
    with open(tmp_path / "first.log", "w") as log:
      processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log))
    killing.process = processes[0]
    assert killing.killed.wait(TIMEOUT), (tmp_path / "first.log").read_text()[-3000:]
    processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out, err = processes[1].communicate(timeout=TIMEOUT)
    _join_all([zero])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait(timeout=20)
    running.stop()
  assert processes[0].returncode == -9 and processes[1].returncode == 0, err[-3000:]
  assert json.loads(out.strip().splitlines()[-1])["steps"] == len(STEPS) - 2  # from step 2 of round 0 on
  assert_bitwise(jax.device_get(server.state), jax.device_get(expected_server.state))
  assert_bitwise(results[0].half, expected[0].half)


def test_a_sealed_turn_restarted_without_a_checkpoint_starts_over_bit_for_bit(setup, reference):
  """Sequential SL with sealed hand-offs (the server holds the turn's starting half as bytes it cannot
  read): client 1, killed once its step 1 of round 0 is committed, restarted without a checkpoint, gets
  those bytes back and redoes its turn; the halves end bit for bit as in the plain uninterrupted run."""
  expected_server, expected = reference("sequential_sl")
  server = _server(setup, "sequential_sl", sealed_handoffs=True)
  key = handoff.new_key()
  killing = KillAt(T.InProcessTransport(server.handle, token=TOKENS[KILLED]), "after commit", *AT)

  def client(k, transport):
    x, y = client_data(setup, k, SCHEDULE.num_clients)
    return T.run(T.connect(transport, setup.model, setup.sl, client=k, x=x, y=y, handoff_key=key))

  results = _kill_and_restart(client, T.InProcessTransport(server.handle, token=TOKENS[0]), killing,
                              T.InProcessTransport(server.handle, token=TOKENS[KILLED]))
  assert set(results) == {0, KILLED}
  assert [(h["round"], h["step"]) for h in results[KILLED].history] == STEPS  # the turn of round 0 redone
  assert isinstance(server.state.client_half, np.ndarray)  # sealed bytes all along
  assert_bitwise(jax.device_get(server.state.server), jax.device_get(expected_server.state.server))
  for k in (0, KILLED):
    assert_bitwise(results[k].half, expected[k].half)


@pytest.mark.parametrize("algorithm", ["parallel_sl", "sequential_sl"])
def test_handover_leave_drops_the_caller_from_the_round_once(setup, algorithm):
  """`Handover leave` (what a client restarted without its half of the round sends): the caller is out
  of the round at once (sequential SL: its turn ends and passes on); again, or for another round, it
  changes nothing."""
  server = _server(setup, algorithm)
  link = T.InProcessTransport(server.handle, token=TOKENS[0])

  def leave(round_):
    return transport_client.call(link, "Handover", {"client": 0, "round": round_, "op": "leave", "steps": 0,
                                                    "wait": 0.0, "message": None})

  before = server.snapshot()
  assert leave(1)["ready"] and server.snapshot() == before  # a round not begun: nothing
  position = leave(0)["position"]
  if algorithm in SEQUENTIAL:  # client 0's turn ended without a hand-over: client 1's turn
    assert (position["round"], position["turn"]) == (0, 1) and not bool(server.state.last_completed[0])
  else:
    assert position["turn"] == -1 and bool(server.state.gone[0]) and not bool(server.state.gone[1])
  after = server.snapshot()
  leave(0)
  assert server.snapshot() == after


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
def test_a_client_killed_after_its_last_commit_of_a_round_resumes_from_its_checkpoint(setup, reference, tmp_path,
                                                                                        algorithm):
  """Killed once the server committed its last step of round 0, restarted from its checkpoint: parallel SL
  is in round 1 by then (the client starts it with the half saved after its last step), SplitFed waits for
  its weights (it hands them in from that half); the run ends bit for bit as the uninterrupted one."""
  expected_server, expected = reference(algorithm)
  server = _server(setup, algorithm)
  last = (0, SCHEDULE.local_steps - 1)
  killing = KillAt(T.InProcessTransport(server.handle, token=TOKENS[KILLED]), "after commit", *last)
  results = _kill_and_restart(
      lambda k, transport: _client(setup, algorithm, k, transport, tmp_path / f"client-{k}" if k == KILLED else None),
      T.InProcessTransport(server.handle, token=TOKENS[0]), killing,
      T.InProcessTransport(server.handle, token=TOKENS[KILLED]))
  assert set(results) == {0, KILLED}
  assert killing.committed + [(h["round"], h["step"]) for h in results[KILLED].history] == STEPS
  assert_bitwise(jax.device_get(server.state), jax.device_get(expected_server.state))
  for k in (0, KILLED):
    assert_bitwise(results[k].half, expected[k].half)


class _KillAfterPut:
  """A client transport whose "process" is killed once the server has its weights of round 0
  (`Handover put` answered), before the client hears so."""

  def __init__(self, inner):
    self.inner, self.killed = inner, threading.Event()

  def call(self, method, request, *, timeout=None):
    if self.killed.is_set():
      raise SystemExit
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Handover" and wire.decode(method, request)["op"] == "put":
      self.killed.set()
      raise SystemExit
    return response


class _Handovers:
  """A client transport that holds its `Handover put` until `before` is set, and sets `left` once it
  sent a `Handover leave`."""

  def __init__(self, inner, before=None):
    self.inner, self.before, self.left = inner, before, threading.Event()

  def call(self, method, request, *, timeout=None):
    op = wire.decode(method, request)["op"] if method == "Handover" else None
    if op == "put" and self.before is not None:
      assert self.before.wait(TIMEOUT), "the restarted client never left the round"
    response = self.inner.call(method, request, timeout=timeout)
    if op == "leave":
      self.left.set()
    return response


def test_a_splitfed_client_restarted_without_a_checkpoint_after_its_handin_still_counts_in_the_average(setup):
  """SplitFed v1: client 1, killed once the server has its weights of round 0 and restarted without a
  checkpoint while round 0 waits for client 0's weights, leaves round 0 (`Handover leave`), but the
  weights it handed in count in round 0's average: it completed the round, as a client that drops
  after its last step does in simulation (no step dropped). It takes round 1 whole from the average,
  with fresh optimizer and codec states: the run ends as the simulation of that reset, within 1e-5."""
  algorithm = "splitfed_v1"
  server = _server(setup, algorithm)
  killing = _KillAfterPut(T.InProcessTransport(server.handle, token=TOKENS[KILLED]))
  restarted = _Handovers(T.InProcessTransport(server.handle, token=TOKENS[KILLED]))
  zero = _Handovers(T.InProcessTransport(server.handle, token=TOKENS[0]), before=restarted.left)
  results = _kill_and_restart(lambda k, transport: _client(setup, algorithm, k, transport), zero, killing, restarted,
                              never="handed in its weights")
  assert set(results) == {0, KILLED} and restarted.left.is_set()
  assert [(h["round"], h["step"]) for h in results[KILLED].history] == STEPS[SCHEDULE.local_steps:]
  sim = _simulate(setup, algorithm, dropped_step=None)
  chex.assert_trees_all_close(server.state.server.params, sim.server.params, atol=1e-5, rtol=0)
  for k in (0, KILLED):
    party = jax.tree.map(lambda a, k=k: a[k], sim.clients)
    chex.assert_trees_all_close(results[k].half.params, party.params, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(results[k].half.opt_state, party.opt_state, atol=1e-5, rtol=0)
