"""Every algorithm whose clients train at once, over the network (`sljax.transport.ConcurrentServer`,
one parametrization per algorithm in `transport.ALGORITHMS`: parallel SL (vanilla, U-shaped and with
a cut per client), local-loss SL, SplitFed v1 and v2): all clients at once against one server. Over gRPC (client processes or threads) the run equals the
in-process run bit for bit, and the fused simulation (`parallel_sl`, `splitfed(version=1|2)`) within
1e-5; a client that drops after its forward loses exactly that step while the others go on, as
`RoundInputs.dropped` says in simulation; requests out of place get their status and change nothing.

Set-up: the demo MLP (digits, 64 -> 32 | -> 10, dropout, so every key matters) with Adam, two
clients with an iid split of digits, 2 rounds of 3 steps with batches of 16.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time

import chex
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.algorithms import RoundInputs
from sljax.transport import client as transport_client
from sljax.transport import demo, wire
from sljax.transport import schedule as sched
from transport_helpers import (Clock, CrashesAfterCommit, KillAfter, assert_bitwise, client_data, own_setup,
                               run_in_threads)

HIDDEN = (32,)
DROPOUT = 0.25
LR = 2e-3
SEED = 0
SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=3, batch_size=16)
TOKENS = {0: "token-zero", 1: "token-one"}
TIMEOUT = 180


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=HIDDEN, dropout=DROPOUT, lr=LR)


U_SHAPED = ("parallel_sl_u",)
CUTS = {"heterogeneous_parallel_sl": [1, 2]}  # client k's cut into the MLP with two hidden layers


def _for(setup, algorithm, client=0):
  """The set-up client `client` runs in `algorithm`, and the algorithm's options. U-shaped: the demo
  MLP cut in three (64 -> 32 | -> 32 | -> 10), as `sljax serve --u-shaped` cuts it, with `u_shaped`
  legs; heterogeneous cuts: the MLP with two hidden layers cut at the client's own cut."""
  return own_setup(setup, algorithm, client, hidden=HIDDEN, dropout=DROPOUT, lr=LR, cuts=CUTS.get(algorithm, ()))


def _parts(setup):
  return sljax.data.iid(setup.dataset.y_train, num_clients=SCHEDULE.num_clients, seed=0)


def _client_data(setup, k):
  return client_data(setup, k, SCHEDULE.num_clients)


def _server(setup, algorithm, **kw):
  kw = {"lease_seconds": 60.0, **kw}
  setup, options = _for(setup, algorithm)
  return T.ConcurrentServer(setup.model, setup.sl, algorithm=algorithm, schedule=SCHEDULE, options=options,
                            input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(SEED),
                            tokens={t: k for k, t in TOKENS.items()}, **kw)


def _algorithm(setup, algorithm):
  """The registry's algorithm (`sljax.algorithms.REGISTRY`), built for this schedule."""
  protocol = sljax.u_shaped if algorithm in U_SHAPED else sljax.vanilla
  own, options = _for(setup, algorithm)
  sl = protocol(own.model, client_optimizer=optax.adam(LR), server_optimizer=optax.adam(LR))
  return sched.algorithm(algorithm, sl, SCHEDULE, sljax.ArraySpec.of(setup.dataset.x_train), **options)


def _simulate(setup, algorithm, inputs=()):
  """The fused simulation of the same run; `inputs[r]` overrides round r's participation and drops."""
  algo = _algorithm(setup, algorithm)
  data = sljax.data.stack_clients(setup.dataset.x_train, setup.dataset.y_train, _parts(setup))
  state = algo.init(jax.random.key(SEED), data)
  round_fn = jax.jit(algo.round)
  for r in range(SCHEDULE.rounds):
    state, _ = round_fn(state, data, inputs[r] if r < len(inputs) else None)
  return state


def _run_clients(setup, transports, algorithm, errors_ok=()):
  """`connect` and `run` for every client in its own thread; returns their results."""

  def work(k):
    x, y = _client_data(setup, k)
    own, options = _for(setup, algorithm, k)
    return T.run(T.connect(transports[k], own.model, own.sl, client=k, x=x, y=y, options=options))

  return run_in_threads(work, transports, timeout=TIMEOUT, errors_ok=errors_ok)


def _party(setup, algorithm, state, k):
  """Client k's party in the simulation's state."""
  view = _algorithm(setup, algorithm).schedule.clients
  return jax.tree.map(lambda a: a[k], state.clients) if view is None else view.party(state, k)


@pytest.fixture(scope="module", params=T.ALGORITHMS)  # every algorithm that runs over the network
def in_process(request, setup):
  """The reference: the run over InProcessTransport, clients in threads."""
  server = _server(setup, request.param)
  results = _run_clients(setup, {k: T.InProcessTransport(server.handle, token=t) for k, t in TOKENS.items()},
                         request.param)
  return request.param, server, results


def test_in_process_run_equals_the_simulation(setup, in_process):
  algorithm, server, results = in_process
  sim = _simulate(setup, algorithm)
  for k, result in results.items():
    assert [(h["round"], h["step"]) for h in result.history] == [
        (r, s) for r in range(SCHEDULE.rounds) for s in range(SCHEDULE.local_steps)]
    # Not bitwise: the simulation fuses the round into one program, XLA may fuse differently.
    party = _party(setup, algorithm, sim, k)
    chex.assert_trees_all_close(result.half.params, party.params, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(result.half.opt_state, party.opt_state, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(server.state.server.params, sim.server.params, atol=1e-5, rtol=0)
  if server.coordinator.averages:  # FedAvg at the end of each round: every client holds the average
    assert_bitwise(results[0].half.params, results[1].half.params)
  else:
    assert not np.allclose(jax.tree.leaves(results[0].half.params)[0], jax.tree.leaves(results[1].half.params)[0])
  # Collaborative inference over the same connection, with the client's half and its server half.
  x, y = _client_data(setup, 1)
  own, options = _for(setup, algorithm, 1)
  session = T.connect(T.InProcessTransport(server.handle, token=TOKENS[1]), own.model, own.sl, client=1, x=x, y=y,
                      options=options)
  logits = T.predict(session, results[1].half, setup.dataset.x_test)
  expected = jax.jit(_algorithm(setup, algorithm).predict, static_argnums=2)(sim, setup.dataset.x_test, 1)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def _cli(*args):
  deeper = {"--u-shaped", "--cuts", *U_SHAPED, *CUTS} & set(args)
  hidden = HIDDEN + HIDDEN if deeper else HIDDEN  # as `_for` cuts it
  return [sys.executable, "-m", "sljax.cli", *args, "--hidden", ",".join(map(str, hidden)), "--lr", str(LR),
          "--dropout", str(DROPOUT), "--num-clients", str(SCHEDULE.num_clients)]


def _cuts(algorithm):
  return ["--cuts", ",".join(map(str, CUTS[algorithm]))] if algorithm in CUTS else []


def _stop(process):
  if process.poll() is None:
    process.kill()
    process.wait(timeout=20)


def _start_server(tmp_path, algorithm, port, name, *, checkpoint_every):
  tokens = tmp_path / "tokens.txt"
  tokens.write_text("".join(f"{k} {t}\n" for k, t in TOKENS.items()))
  port_file, r = tmp_path / f"port-{name}", SCHEDULE
  with open(tmp_path / f"{name}.log", "w") as log:
    process = subprocess.Popen(
        _cli("serve", "--algorithm", algorithm, "--port", str(port), "--port-file", str(port_file), "--token-file",
             str(tokens), "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", str(checkpoint_every),
             "--rounds", str(r.rounds), "--local-steps", str(r.local_steps), "--batch-size", str(r.batch_size),
             "--seed", str(SEED), *_cuts(algorithm)),
        stdout=subprocess.DEVNULL, stderr=log)
  for _ in range(1200):
    if port_file.exists() or process.poll() is not None:
      break
    time.sleep(0.1)
  assert port_file.exists(), (tmp_path / f"{name}.log").read_text()[-3000:]
  return process, int(port_file.read_text()), str(tokens)


def _restored(path, like):
  manager = sljax.simulation.checkpoint_manager(path)
  try:
    return sljax.simulation.restore(manager, jax.device_get(like))
  finally:
    manager.close()


def test_grpc_server_and_two_client_processes_equal_in_process_bitwise(setup, in_process, tmp_path):
  """`sljax serve --algorithm ...` and two `sljax client` processes against it."""
  algorithm, reference, _ = in_process
  server, port, tokens = _start_server(tmp_path, algorithm, 0, "server", checkpoint_every=1)
  clients = []
  try:
    u_shaped = ["--u-shaped"] if algorithm in U_SHAPED else _cuts(algorithm)
    clients = [subprocess.Popen(_cli("client", "--target", f"127.0.0.1:{port}", "--client-id", str(k), "--token-file",
                                     tokens, "--json", *u_shaped), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k in TOKENS]
    outputs = [c.communicate(timeout=TIMEOUT) for c in clients]
  finally:
    for c in clients:
      _stop(c)
    _stop(server)
  for c, (out, err) in zip(clients, outputs, strict=True):
    assert c.returncode == 0, err[-3000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["steps"] == SCHEDULE.rounds * SCHEDULE.local_steps and 0 <= row["test_accuracy"] <= 1
  # The server's last checkpoint (written at the end of the last round) holds its final state.
  restored = _restored(tmp_path / "ckpt", reference.state)
  assert_bitwise(restored, jax.device_get(reference.state))


def test_server_killed_mid_round_resumes_exactly(setup, in_process, tmp_path, caplog):
  caplog.set_level("WARNING", logger="sljax")
  algorithm, reference, expected = in_process
  # Checkpoints every 2 steps: the 3rd Forward response is in step 1 of round 0 (parallel SL: step
  # 0 is applied and not checkpointed), so the clients must roll back and replay.
  first, port, _ = _start_server(tmp_path, algorithm, 0, "first", checkpoint_every=2)
  second, transports = None, {}
  try:
    shared = {"lock": threading.Lock(), "forwards": 0, "kill_at": 3, "process": first, "killed": threading.Event()}
    transports = {k: KillAfter(T.GrpcTransport(f"127.0.0.1:{port}", token=t, retries=400, backoff=0.05,
                                                max_backoff=0.25, deadline=30), shared) for k, t in TOKENS.items()}
    outcome = {}
    clients = threading.Thread(target=lambda: outcome.update(_run_clients(setup, transports, algorithm)))
    clients.start()
    assert shared["killed"].wait(TIMEOUT) and first.returncode == -signal.SIGKILL
    second, _, _ = _start_server(tmp_path, algorithm, port, "second", checkpoint_every=2)
    clients.join(TIMEOUT)
    assert set(outcome) == set(TOKENS), (tmp_path / "second.log").read_text()[-3000:]
  finally:
    for t in transports.values():
      t.inner.close()
    _stop(first)
    if second is not None:
      _stop(second)
  if algorithm == "parallel_sl":
    assert "rolling back" in caplog.text
  steps = [(r, s) for r in range(SCHEDULE.rounds) for s in range(SCHEDULE.local_steps)]
  for k, result in outcome.items():  # every step once, in order, despite the replay
    assert [(h["round"], h["step"]) for h in result.history] == steps
    assert_bitwise(result.half, expected[k].half)
  assert_bitwise(_restored(tmp_path / "ckpt", reference.state), jax.device_get(reference.state))


class _DiesAfterForward:
  """A client transport that goes silent for good after the Forward of (round, step)."""

  def __init__(self, inner, round_, step):
    self.inner, self.at, self.dead = inner, (round_, step), threading.Event()

  def call(self, method, request, *, timeout=None):
    if self.dead.is_set():
      raise SystemExit  # ends the client's thread quietly
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Forward":
      fields = wire.decode(method, request)
      if (fields["round"], fields["step"]) == self.at:
        self.dead.set()
    return response


def _expire_while_waited_for(server, client, clock, runner):
  """Jumps `clock` past `client`'s lease each time the server waits for it (a lease counts from when
  the others began to wait), until `runner` ends: no real lease goes by. While the others wait for
  the silent client, the state changes only by its expiry, so no other client is dropped by a jump."""
  deadline = time.monotonic() + TIMEOUT
  while runner.is_alive() and time.monotonic() < deadline:
    if server.coordinator.droppable(server.s, client):
      time.sleep(0.2)  # the server's wait loop notes, within 0.05 s, when it began to wait for the client
      if server.coordinator.droppable(server.s, client):
        clock.offset += 120.0
        for _ in range(20):  # until the server has dropped it (a jump before that note: jump again)
          if not server.coordinator.droppable(server.s, client):
            break
          time.sleep(0.05)
    runner.join(0.05)


@pytest.mark.parametrize("algorithm", T.ALGORITHMS)
def test_client_dropping_after_forward_loses_that_step_and_the_others_go_on(setup, algorithm):
  clock = Clock()
  server = _server(setup, algorithm, clock=clock)
  dying = _DiesAfterForward(T.InProcessTransport(server.handle, token=TOKENS[1]), 0, 1)
  transports = {0: T.InProcessTransport(server.handle, token=TOKENS[0]), 1: dying}
  done = {}
  runner = threading.Thread(target=lambda: done.update(_run_clients(setup, transports, algorithm,
                                                                     errors_ok=(SystemExit,))))
  runner.start()
  assert dying.dead.wait(TIMEOUT)
  _expire_while_waited_for(server, 1, clock, runner)  # in round 0 (its step 1) and again in round 1
  runner.join(TIMEOUT)
  assert set(done) == {0}
  state = server.state
  steps = SCHEDULE.local_steps
  assert int(state.upto[1]) == 1  # its step 0 of round 0 counts; step 1 was discarded, round 1 it missed
  assert int(state.upto[0]) == SCHEDULE.rounds * steps
  # The simulation with the same drops: round 0 client 1 drops in step 1; round 1 in step 0.
  rounds = []
  for step in (1, 0):
    dropped = np.zeros((steps, SCHEDULE.num_clients), bool)
    dropped[step, 1] = True
    rounds.append(RoundInputs(jnp.ones(SCHEDULE.num_clients, bool), jnp.asarray(dropped)))
  sim = _simulate(setup, algorithm, rounds)
  chex.assert_trees_all_close(done[0].half.params, _party(setup, algorithm, sim, 0).params, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(state.server.params, sim.server.params, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def parallel_served(setup):
  server = _server(setup, "parallel_sl")
  running = T.serve(server.handle, address="127.0.0.1:0")
  yield server, running
  running.stop()


def _request(method, **fields):
  base = {"Forward": {"client": 0, "round": 0, "step": 0, "message": b""},
          "Commit": {"client": 0, "round": 0, "step": 0},
          "Handover": {"client": 0, "round": 0, "op": "get", "steps": 0, "wait": 0.0, "message": None}}[method]
  return wire.encode({**base, **fields})


def test_requests_out_of_place_get_their_status_and_change_nothing(setup):
  for algorithm in T.ALGORITHMS:
    server = _server(setup, algorithm)
    link = T.InProcessTransport(server.handle, token=TOKENS[0])
    b = SCHEDULE.batch_size
    good = msgs.to_bytes(msgs.SmashedData(np.zeros((b, HIDDEN[0]), np.float32), np.zeros((b,), np.int32)))
    average = jax.device_get(server.state.average) or {"params": {}, "model_state": {}}
    weights = msgs.to_bytes(msgs.ModelWeights(average))
    code = grpc.StatusCode
    cases = [
        ("Forward", _request("Forward", round=1, message=good), code.FAILED_PRECONDITION, "round 1 has not begun"),
        ("Forward", _request("Forward", step=1, message=good), code.FAILED_PRECONDITION, "not the next step"),
        ("Forward", _request("Forward", step=3, message=good), code.FAILED_PRECONDITION, "not the next step"),
        ("Forward", _request("Forward", message=good[:-10]), code.INVALID_ARGUMENT, "malformed or truncated"),
        ("Commit", _request("Commit"), code.ABORTED, "not staged"),
        ("Handover", _request("Handover", round=3), code.FAILED_PRECONDITION, r"round 3 is not in \[0, 2\]"),
        ("Handover", _request("Handover", op="put", steps=3, message=weights), code.FAILED_PRECONDITION,
         "after 3 committed steps" if server.coordinator.averages else "averages nothing"),
    ]
    if server.coordinator.averages:
      nan = jax.tree.map(lambda a: np.full_like(a, np.nan), average)
      cases += [
          ("Handover", _request("Handover", op="put", steps=3, message=msgs.to_bytes(msgs.ModelWeights(nan))),
           code.INVALID_ARGUMENT, "Handover put.*NaN or infinite"),
          ("Handover", _request("Handover", op="put", steps=3, message=good), code.INVALID_ARGUMENT,
           "expected kind ModelWeights"),
      ]
    before = server.snapshot()
    for method, request, want, match in cases:
      with pytest.raises(T.TransportError) as e:
        link.call(method, request)
      assert e.value.code == want and re.search(match, e.value.details), (algorithm, method, e.value)
      assert server.snapshot() == before, (algorithm, method)
    position = transport_client.call(link, "Status", {"client": 0})
    assert position == {"round": 0, "turn": 0, "step": 0, "durable": 0, "done": False}


def test_client_restarted_from_its_checkpoint_ends_as_the_uninterrupted_run(setup, in_process, tmp_path):
  """A client process that dies mid-round and comes back (within the lease) resumes from its own
  checkpoint at the step the server waits for: the run ends bit for bit as the uninterrupted one."""
  algorithm, reference, expected = in_process
  server = _server(setup, algorithm)
  first = CrashesAfterCommit(T.InProcessTransport(server.handle, token=TOKENS[1]), 0, 1)
  done, errors = {}, []

  def client(k, transport, key):
    try:
      xs, ys = _client_data(setup, k)
      own, options = _for(setup, algorithm, k)
      done[key] = T.run(T.connect(transport, own.model, own.sl, client=k, x=xs, y=ys, options=options),
                        checkpoint_dir=tmp_path / f"client-{k}")
    except SystemExit:
      pass
    except BaseException as e:  # noqa: BLE001 -- re-raised below
      errors.append(e)

  threads = [threading.Thread(target=client, args=(0, T.InProcessTransport(server.handle, token=TOKENS[0]), 0)),
             threading.Thread(target=client, args=(1, first, "first"))]
  for t in threads:
    t.start()
  assert first.crashed.wait(TIMEOUT)
  threads[1].join(TIMEOUT)
  restarted = threading.Thread(target=client, args=(1, T.InProcessTransport(server.handle, token=TOKENS[1]), 1))
  restarted.start()
  for t in (threads[0], restarted):
    t.join(TIMEOUT)
  assert not errors, errors
  assert "first" not in done and set(done) == {0, 1}
  steps = [(r, s) for r in range(SCHEDULE.rounds) for s in range(SCHEDULE.local_steps)]
  assert [(h["round"], h["step"]) for h in done[1].history] == steps[2:]  # resumed at step 2 of round 0
  for k in (0, 1):
    assert_bitwise(done[k].half, expected[k].half)
  assert_bitwise(jax.device_get(server.state), jax.device_get(reference.state))


def test_every_split_learning_algorithm_of_the_registry_runs_over_the_network():
  """A new algorithm in `sljax.algorithms.REGISTRY` is served (and so walked by the tests above, or by
  tests/test_transport.py for sequential SL) once it has a coordinator; only the baselines, which are
  not split learning, run in simulation alone."""
  baselines = {"fedavg", "centralized"}
  assert set(sljax.algorithms.REGISTRY) - baselines == {"sequential_sl", "sequential_sl_u", *T.ALGORITHMS}
