"""Vertical split learning over the network (`sljax.transport.vertical`): the label party serves,
the other parties are clients in threads. Over InProcessTransport (aligned by PSI over the same
service first) the run equals the fused `vertical_sl` simulation (`sljax.fit` with the schedule's
keys) bit for bit; over gRPC it equals the in-process run bit for bit; no party's ID crosses in any
message; a party that drops mid-step has the step discarded everywhere, as `step(..., dropped=)`
does; with `continue_without` a party that leaves and comes back equals `step(..., dropped=)` then
`step(..., absent=)`, and inference without it `predict(absent=)`; a restarted server (aligned
over the service) resumes and the parties roll back to its checkpoint where needed, ending bit
for bit as the uninterrupted run; bad parties and requests get errors naming them; `sljax
serve --vertical` and `sljax client --vertical --party` run it from the command line.

Set-up: three parties (the label party "bank" with a bottom of its own, "network" and "merchant"
as clients), MLP bottoms with dropout (so every key matters), concat, a dense top, Adam, learned
stand-ins for absent parties; the parties' IDs overlap partly; 2 rounds of 3 steps of 16 rows.
"""

import argparse
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import chex
import grpc
import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

import sljax
from sljax import cli, codecs
from sljax import messages as msgs
from sljax import transport as T
from sljax.protocol import ArraySpec
from sljax.transport import vertical as V
from sljax.transport import wire
from transport_helpers import Clock, assert_bitwise, run_in_threads

NAMES = ("bank", "network", "merchant")
WIDTHS = {"bank": 5, "network": 3, "merchant": 4}
SHARED, EXTRA, BATCH, ROUNDS = 48, 12, 16, 2
TOKENS = {1: "token-network", 2: "token-merchant"}
LEASE = 60.0
KEY = jax.random.key(7)
TIMEOUT = 120


def _bottom():
  return sljax.sequential(*sljax.models.mlp(hidden=(8,), num_classes=6, dropout=0.25))


def _sl(merchant_width=6):
  bottoms = [_bottom(), _bottom(), sljax.sequential(*sljax.models.mlp(hidden=(8,), num_classes=merchant_width))]
  model = sljax.vertical_model(bottoms, sljax.merges.concat(), nn.Dense(2), names=NAMES, label_party="bank")
  # learned stand-ins: they stay as they are while every party takes part, and learn where one is absent
  return sljax.vertical_sl(model, party_optimizers=optax.adam(1e-2), top_optimizer=optax.adam(1e-2),
                           replacement="learned")


class Recording:
  """A transport that keeps the bytes of every request and response."""

  def __init__(self, inner, seen):
    self.inner, self.seen = inner, seen

  def call(self, method, request, *, timeout=None):
    self.seen.append(request)
    response = self.inner.call(method, request, timeout=timeout)
    self.seen.append(response)
    return response


@pytest.fixture(scope="module")
def data():
  """Each party holds the SHARED customers and EXTRA of its own, in its own order, with its columns;
  the bank holds the labels. Aligned by PSI: every party's shared rows in one order."""
  rng = np.random.default_rng(0)
  shared = [f"customer-{i:05d}" for i in rng.choice(10**5, SHARED, replace=False)]
  ids, cols = {}, {}
  for p, name in enumerate(NAMES):
    own = shared + [f"{name}-only-{i:04d}" for i in range(EXTRA)]
    ids[name] = [own[i] for i in rng.permutation(len(own))]
    cols[name] = rng.normal(size=(len(own), WIDTHS[name])).astype(np.float32)
  aligned = sljax.align(ids, leader="bank")  # in one process, for the simulation and the other runs
  assert aligned.size == SHARED
  xs = tuple(aligned.take(name, cols[name]) for name in NAMES)
  y = (xs[0][:, 0] + xs[1][:, 1] - xs[2][:, 2] > 0).astype(np.int32)
  bank_labels = np.zeros(len(ids["bank"]), np.int32)  # the bank's labels of all its customers
  bank_labels[aligned.rows["bank"]] = y
  test = tuple(np.random.default_rng(1).normal(size=(10, WIDTHS[name])).astype(np.float32) for name in NAMES)
  return {"ids": ids, "cols": cols, "bank_labels": bank_labels, "xs": xs, "y": y, "test": test}


def _server(sl, data, **kw):
  xs = data["xs"]
  kw = {"labels": data["y"], "features": xs[0], "rounds": ROUNDS, **kw}
  return V.VerticalServer(sl, input_specs={n: ArraySpec.of(x) for n, x in zip(NAMES, xs)}, key=KEY,
                          batch_size=BATCH, local_steps=3, predict_features=data["test"][0],
                          tokens={t: k for k, t in TOKENS.items()}, lease_seconds=LEASE, **kw)


def _run_parties(sl, data, transports, *, wrap=lambda p, t: t, align=False, parties=(1, 2)):
  def work(p):
    name = NAMES[p]
    x, ids = (data["cols"][name], data["ids"][name]) if align else (data["xs"][p], None)
    session = V.connect_party(wrap(p, transports(p)), sl, party=name, x=x, ids=ids)
    return session, V.run_party(session)

  return run_in_threads(work, list(parties), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def in_process(data):
  """The run in process, aligned over the same service first: the bank's server holds an `Aligner`
  of its IDs, each party gives `connect_party` its IDs and all its rows."""
  sl = _sl()
  clock = Clock()
  aligner = T.Aligner(data["ids"]["bank"], members={1: "network", 2: "merchant"}, name="bank")
  server = _server(sl, data, clock=clock, labels=data["bank_labels"], features=data["cols"]["bank"], aligner=aligner)
  seen = []
  runs = _run_parties(sl, data, lambda p: T.InProcessTransport(server.handle, token=TOKENS[p]),
                      wrap=lambda p, t: Recording(t, seen), align=True)
  return {"sl": sl, "server": server, "runs": runs, "seen": seen, "clock": clock}


def _simulate(sl, data, dropped=None, absent=lambda r, s: ()):
  """The fused simulation of the same steps: `fit`'s epochs (keys and rows from `vertical_schedule`);
  with `dropped(r, s)`, `step(..., dropped=)` step by step, or `step(..., absent=)` where `absent(r, s)`
  names parties."""
  init_key, epoch = V.vertical_schedule(jax.random.key_data(KEY), samples=SHARED, batch_size=BATCH)
  xs, y = data["xs"], data["y"]
  state = sl.init(init_key, tuple(x[:BATCH] for x in xs))
  if dropped is None:
    # local_steps = 3 = SHARED // BATCH: each round is one epoch of `fit`, the simulation as users run it
    _, fit_key = jax.random.split(KEY)
    return sljax.fit(sl, state, xs, y, key=fit_key, epochs=ROUNDS, batch_size=BATCH)[0]
  step = jax.jit(sl.step, static_argnames="absent")
  for r in range(ROUNDS):
    rows, keys = epoch(r)
    for s in range(3):
      batch = (tuple(x[rows[s]] for x in xs), y[rows[s]])
      flags = {"absent": absent(r, s)} if absent(r, s) else {"dropped": np.asarray(dropped(r, s))}
      state, _ = step(state, batch, jax.random.wrap_key_data(keys[s]), **flags)
  return state


def _states(server, runs):
  own, top, *_ = server.state.server  # and the learned stand-ins
  return (own, runs[1][1].state, runs[2][1].state), top


def test_in_process_equals_the_fused_simulation_bitwise(data, in_process):
  sl, server, runs = in_process["sl"], in_process["server"], in_process["runs"]
  parties, top = _states(server, runs)
  sim = _simulate(sl, data)
  assert_bitwise(parties, sim.parties)  # the bank's own bottom (on the server) and each party's (its own)
  assert_bitwise(top, sim.top)
  assert all(r["applied"] for p in (1, 2) for r in runs[p][1].history)
  assert all(runs[p][0].aligned.size == SHARED for p in (1, 2))  # aligned over the service, then trained
  assert server.coordinator.done(server.s) and len(runs[1][1].history) == ROUNDS * 3
  # bytes per step: the party's smashed data up (16 x 6 float32 and framing), its gradient down
  record = runs[1][1].history[0]
  assert record["bytes_up"] == sljax.wire_size(sljax.SmashedData(np.zeros((BATCH, 6), np.float32)))
  assert record["bytes_down"] == sljax.wire_size(sljax.CutGradient(np.zeros((BATCH, 6), np.float32)))
  # collaborative inference: every party's rows, the bank's own from predict_features; as `sl.predict`
  test = data["test"]
  out = run_in_threads(lambda p: V.predict_party(runs[p][0], runs[p][1].state, test[p], batch_size=6), [1, 2],
                       timeout=TIMEOUT)
  expected, _ = jax.jit(sl.predict)(sim, test)
  np.testing.assert_allclose(out[1], expected, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(out[1], out[2])
  # the samples are named, not counted as they arrive: samples 4 .. 9 again meet the bank's rows 4 .. 9
  again = run_in_threads(lambda p: V.predict_party(runs[p][0], runs[p][1].state, test[p][4:], offset=4), [1, 2],
                         timeout=TIMEOUT)
  np.testing.assert_array_equal(again[1], out[1][4:])


def test_over_grpc_equals_in_process_bitwise(data, in_process, tmp_path):
  """Over gRPC (threads, a real channel), checkpointing: the run in process, bit for bit; a server
  restarted on the checkpoints resumes the final state."""
  sl = in_process["sl"]
  server = _server(sl, data, checkpoint_dir=tmp_path)
  running = T.serve(server.handle, address="127.0.0.1:0")
  try:
    runs = _run_parties(sl, data, lambda p: T.GrpcTransport(f"127.0.0.1:{running.port}", token=TOKENS[p]))
  finally:
    running.stop()
    server.close()
  assert_bitwise(_states(server, runs), _states(in_process["server"], in_process["runs"]))
  restarted = _server(sl, data, checkpoint_dir=tmp_path)
  assert_bitwise(restarted.state, server.state)
  assert restarted.coordinator.done(restarted.s)


def test_codecs_per_party_over_the_network(data):
  """Each party's own codecs (8-bit quantization both ways for the network, top-k with error feedback
  up for the merchant): the messages are the codecs' payloads, their states where the simulation
  keeps them; one round equals `fit`'s epoch within 1e-8 (the codecs' programs fuse otherwise)."""
  model = _sl().model
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-2), top_optimizer=optax.adam(1e-2),
                         uplink=[None, codecs.quantize(bits=8), codecs.top_k(k=3, error_feedback=True)],
                         downlink=[None, codecs.quantize(bits=8), None])
  server = _server(sl, data, rounds=1)
  runs = _run_parties(sl, data, lambda p: T.InProcessTransport(server.handle, token=TOKENS[p]))
  init_key, _ = V.vertical_schedule(jax.random.key_data(KEY), samples=SHARED, batch_size=BATCH)
  state = sl.init(init_key, tuple(x[:BATCH] for x in data["xs"]))
  sim, history = sljax.fit(sl, state, data["xs"], data["y"], key=jax.random.split(KEY)[1], epochs=1, batch_size=BATCH)
  chex.assert_trees_all_close(_states(server, runs), (sim.parties, sim.top), atol=1e-8, rtol=0)
  up = sum(r["bytes_up"] for p in (1, 2) for r in runs[p][1].history)
  down = sum(r["bytes_down"] for p in (1, 2) for r in runs[p][1].history)
  assert (up, down) == (history[0]["bytes_up"], history[0]["bytes_down"])  # as the simulation counts them


def test_no_id_crosses_in_any_message(data, in_process):
  """Aligned by PSI over the same service, then trained: no party's ID, shared or not, is in the
  bytes of any call either way (the PSI messages included)."""
  seen = b"".join(in_process["seen"])
  assert len(in_process["seen"]) > 4 * ROUNDS * 3  # every Handshake, Handover, Forward, Commit, Status, both ways
  for name, ids in data["ids"].items():
    for i in ids:
      assert i.encode() not in seen, (name, i)
      assert i.split("-")[-1].encode() not in seen or len(i.split("-")[-1]) < 5, (name, i)


class Drops:
  """A party's transport that holds back its `method` call (Forward or Commit) of (round, step) until
  the server has gone past the step (the test lets the lease run out meanwhile), then sends it."""

  def __init__(self, inner, method, at, server):
    self.inner, self.method, self.at, self.server, self.held = inner, method, at, server, threading.Event()

  def call(self, method, request, *, timeout=None):
    fields = wire.decode(method, request)
    if method == self.method and (fields["round"], fields["step"]) == self.at:
      self.held.set()
      deadline = time.monotonic() + TIMEOUT
      while (int(self.server.s.durable.round), int(self.server.s.durable.step)) <= self.at:
        assert time.monotonic() < deadline, "the step was never discarded"
        time.sleep(0.02)
    return self.inner.call(method, request, timeout=timeout)


@pytest.mark.parametrize("method", ["Forward", "Commit"])
def test_a_party_that_drops_mid_step_has_the_step_discarded_everywhere(data, in_process, method):
  """The merchant goes silent before its Forward, or after it (before its Commit), of step (0, 1):
  the network waits at the barrier, the lease runs out (the test's clock jumps), the step is
  discarded everywhere; the merchant's late call hears so, and both go on. As `step(..., dropped=)`."""
  sl, clock = in_process["sl"], Clock()
  server = _server(sl, data, clock=clock)
  at = (0, 1)
  drops = Drops(T.InProcessTransport(server.handle, token=TOKENS[2]), method, at, server)

  def jump_when_waiting():  # once the server counts the merchant's lease (others wait for it), it runs out
    assert drops.held.wait(TIMEOUT)
    while 2 not in server._waited_since:  # noqa: SLF001 -- the shell's record of whom others wait for since when
      time.sleep(0.02)
    clock.offset += LEASE + 5

  jumper = threading.Thread(target=jump_when_waiting)
  jumper.start()
  runs = _run_parties(sl, data, lambda p: drops if p == 2 else T.InProcessTransport(server.handle, token=TOKENS[p]))
  jumper.join(TIMEOUT)
  for p in (1, 2):
    assert [r["applied"] for r in runs[p][1].history] == [True, False, True, True, True, True]
  sim = _simulate(sl, data, dropped=lambda r, s: [False, False, (r, s) == at])
  parties, top = _states(server, runs)
  assert_bitwise((parties, top), (sim.parties, sim.top))


class Leaves:
  """A party's transport that holds back its Forward of `at` until the server is past `until`, then
  sends it (and goes on); or, with `back_of`, a transport that holds its Forward of `at` until party
  `back_of` is back (no longer absent)."""

  def __init__(self, inner, at, server, *, until=None, back_of=None):
    self.inner, self.at, self.server, self.until, self.back_of = inner, at, server, until, back_of
    self.held = threading.Event()

  def call(self, method, request, *, timeout=None):
    fields = wire.decode(method, request)
    if method == "Forward" and (fields["round"], fields["step"]) == self.at:
      self.held.set()
      deadline, d = time.monotonic() + TIMEOUT, lambda: self.server.s.durable  # noqa: E731
      while ((int(d().round), int(d().step)) <= self.until if self.back_of is None else d().absent[self.back_of]):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.02)
    return self.inner.call(method, request, timeout=timeout)


def test_continue_without_a_party_that_left_and_infer_without_it(data, in_process):
  """`continue_without=True`: the merchant goes silent before its Forward of (0, 1); the lease runs
  out (the clock jumps): (0, 1) is discarded everywhere, (0, 2) runs without the merchant (its
  stand-in in its place), and the merchant, back at (1, 0) with its state as it was, takes part
  again. As `step(..., dropped=)` at (0, 1), then `step(..., absent=)` without it at (0, 2), bit for bit. Then
  the network infers alone: after a lease the answer stands in for the merchant, as
  `predict(absent=["merchant"])`, and says so."""
  sl, clock = in_process["sl"], Clock()
  server = _server(sl, data, clock=clock, continue_without=True)
  link = lambda p: T.InProcessTransport(server.handle, token=TOKENS[p])  # noqa: E731
  merchant = Leaves(link(2), (0, 1), server, until=(0, 2))
  network = Leaves(link(1), (1, 0), server, back_of=2)

  def jump_when_waiting():
    assert merchant.held.wait(TIMEOUT)
    while 2 not in server._waited_since:  # noqa: SLF001 -- the shell's record of whom others wait for since when
      time.sleep(0.02)
    clock.offset += LEASE + 5

  jumper = threading.Thread(target=jump_when_waiting)
  jumper.start()
  runs = _run_parties(sl, data, lambda p: merchant if p == 2 else network)
  jumper.join(TIMEOUT)
  assert [r["applied"] for r in runs[1][1].history] == [True, False, True, True, True, True]
  assert [r["applied"] for r in runs[2][1].history] == [True, False, False, True, True, True]
  sim = _simulate(sl, data, dropped=lambda r, s: [False, False, (r, s) == (0, 1)],
                  absent=lambda r, s: ("merchant",) if (r, s) == (0, 2) else ())
  assert_bitwise(_states(server, runs), (sim.parties, sim.top))
  assert_bitwise(server.state.server[2], sim.replacement)  # the merchant's stand-in learned at (0, 2) only
  assert np.any(sim.replacement[2].params != 0) and not np.any(sim.replacement[1].params != 0)
  assert not server.state.absent.any()

  session, result = runs[1]
  answer = {}
  caller = threading.Thread(target=lambda: answer.update(
      out=V.predict_party(session, result.state, data["test"][1], return_stood_in=True)))
  caller.start()
  deadline = time.monotonic() + TIMEOUT
  while caller.is_alive() and time.monotonic() < deadline:  # the lease runs out while it waits
    clock.offset += LEASE + 5
    caller.join(0.2)
  out, stood_in = answer["out"]
  expected, _ = jax.jit(sl.predict, static_argnames="absent")(sim, data["test"][:2] + (None,), absent=("merchant",))
  np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
  assert stood_in == ("merchant",)


class Restarts:
  """The parties' transports to a server (checkpointing every 2 applied steps and at each round's
  end) that restarts from its checkpoints at given calls: after the Commit of (0, 1) was applied and
  checkpointed (its answers lost: the parties retry it and hear it was applied); before the first
  Forward of (1, 1), with (1, 0) applied but not checkpointed (the server goes back to (1, 0): the
  parties roll back to their state there and replay it); and before the first Commit of (1, 2)
  (the step under way lost: the parties forward it again)."""

  BEFORE = (("Forward", 1, 1), ("Commit", 1, 2))
  AFTER = (("Commit", 0, 1),)

  def __init__(self, make_server):
    self.make_server, self.server, self.servers = make_server, make_server(), []
    self.lock, self.done = threading.Lock(), set()

  def restart(self, point):
    with self.lock:
      if point not in self.done:
        self.done.add(point)
        self.servers.append(self.server)
        self.server = self.make_server()

  def link(self, p):
    restarts = self

    class Link:
      def call(self, method, request, *, timeout=None):
        fields = wire.decode(method, request)
        point = (method, fields.get("round"), fields.get("step"))
        if point in restarts.BEFORE:
          restarts.restart(point)
        one = lambda: T.InProcessTransport(restarts.server.handle, token=TOKENS[p]).call(method, request)  # noqa: E731
        response = one()
        if point in restarts.AFTER:
          restarts.restart(point)
          response = one()  # the retry of a call whose answer was lost
        return response

    return Link()


def test_a_restarted_server_resumes_and_the_parties_carry_on(data, in_process, tmp_path, caplog):
  """Aligned over the service first (the restarted servers hold a new `Aligner` of the bank's IDs:
  they resume the alignment saved beside the checkpoints, and a party aligning again gets its rows)."""
  caplog.set_level("WARNING", logger="sljax")
  sl = in_process["sl"]
  members = {1: "network", 2: "merchant"}
  aligned = lambda: dict(aligner=T.Aligner(data["ids"]["bank"], members=members, name="bank"),  # noqa: E731
                         labels=data["bank_labels"], features=data["cols"]["bank"])
  restarts = Restarts(lambda: _server(sl, data, checkpoint_dir=tmp_path, checkpoint_every=2, **aligned()))
  try:
    runs = _run_parties(sl, data, restarts.link, align=True)
  finally:
    for server in restarts.servers + [restarts.server]:
      server.close()
  assert len(restarts.servers) == 3
  assert caplog.text.count("rolling back to it") == 2  # each party, once
  for p in (1, 2):  # every step once, each applied: none lost, none doubled
    assert [(r["round"], r["step"], r["applied"]) for r in runs[p][1].history] == [
        (r, s, True) for r in range(ROUNDS) for s in range(3)]
  assert_bitwise(_states(restarts.server, runs), _states(in_process["server"], in_process["runs"]))
  again = T.align(T.InProcessTransport(restarts.server.handle, token=TOKENS[2]), data["ids"]["merchant"], client=2)
  np.testing.assert_array_equal(again.rows["merchant"], runs[2][0].aligned.rows["merchant"])
  other = T.Aligner(data["ids"]["bank"][::-1], members=members, name="bank")
  sha = r"SHA-256 [0-9a-f]{12}\.\.\."
  with pytest.raises(ValueError, match=rf"saved: the alignment saved was of other IDs \(60, {sha}\) "
                                       rf"than the aligner's \(60, {sha}\): give it the IDs"):
    _server(sl, data, checkpoint_dir=tmp_path, **{**aligned(), "aligner": other})


class Dies:
  """A party's transport whose process "dies" (SystemExit) at its Commit of `at`: as it is about to
  send it ("before": its checkpoint of the step is saved) or once it was answered ("after")."""

  def __init__(self, inner, at, when):
    self.inner, self.at, self.when, self.died = inner, at, when, False

  def call(self, method, request, *, timeout=None):
    fields = wire.decode(method, request)
    hit = method == "Commit" and (fields["round"], fields["step"]) == self.at and not self.died
    if hit and self.when == "before":
      self.died = True
      raise SystemExit
    response = self.inner.call(method, request, timeout=timeout)
    if hit:
      self.died = True
      raise SystemExit
    return response


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_party_restarted_from_its_checkpoint_carries_on(data, in_process, tmp_path, when):
  """The merchant's process dies at its Commit of (0, 1) and starts again on its checkpoint directory
  (the network waits at a barrier meanwhile): it takes its state after the step if the step was
  applied, before it if not, and the run ends bit for bit as the uninterrupted one."""
  sl = in_process["sl"]
  server = _server(sl, data)
  link = lambda p: T.InProcessTransport(server.handle, token=TOKENS[p])  # noqa: E731
  network = {}
  thread = threading.Thread(target=lambda: network.update(_run_parties(sl, data, link, parties=(1,))))
  thread.start()

  def merchant(transport):
    session = V.connect_party(transport, sl, party="merchant", x=data["xs"][2])
    return session, V.run_party(session, checkpoint_dir=tmp_path / "merchant")

  with pytest.raises(SystemExit):
    merchant(Dies(link(2), (0, 1), when))
  restarted = merchant(link(2))  # the process started again
  thread.join(TIMEOUT)
  assert [(r["round"], r["step"]) for r in restarted[1].history] == [(0, 2), (1, 0), (1, 1), (1, 2)]
  assert_bitwise(_states(server, {**network, 2: restarted}), _states(in_process["server"], in_process["runs"]))


def test_bad_parties_get_errors_naming_them(data, in_process):
  sl, server, xs = in_process["sl"], in_process["server"], data["xs"]
  link = lambda p: T.InProcessTransport(server.handle, token=TOKENS[p])  # noqa: E731
  with pytest.raises(ValueError, match=re.escape("party: expected one of the parties ('bank', 'network', "
                                                 "'merchant'), got 'shop'")):
    V.connect_party(link(1), sl, party="shop", x=xs[1])
  with pytest.raises(ValueError, match="party: 'bank' is the label party, which runs the server"):
    V.connect_party(link(1), sl, party="bank", x=xs[0])
  with pytest.raises(T.TransportError, match="PERMISSION_DENIED: Handshake: field 'client' is 2, but the "
                                             "credentials are client 1's"):
    V.connect_party(link(1), sl, party="merchant", x=xs[2])
  with pytest.raises(T.TransportError, match=re.escape("FAILED_PRECONDITION: model signature: the server's half "
                                                       "takes cut activations of shape (B, 6) float32 from party "
                                                       "'merchant', the client's half makes (B, 4) float32")):
    V.connect_party(link(2), _sl(merchant_width=4), party="merchant", x=xs[2])
  with pytest.raises(T.TransportError, match=re.escape("FAILED_PRECONDITION: Handshake: party 'merchant' holds 47 "
                                                       "aligned samples, the label party 48")):
    V.connect_party(link(2), sl, party="merchant", x=xs[2][:-1])
  with pytest.raises(ValueError, match=re.escape("x (party 'merchant'): the server's model was built for other "
                                                 "columns than these, of shape (B, 5) float32")):
    V.connect_party(link(2), sl, party="merchant", x=np.zeros((SHARED, 5), np.float32))


def test_a_bad_server_configuration_names_what_is_wrong(data, in_process):
  sl, xs, y = in_process["sl"], data["xs"], data["y"]
  specs = {n: ArraySpec.of(x) for n, x in zip(NAMES, xs)}
  common = dict(labels=y, input_specs=specs, key=KEY, rounds=1, batch_size=BATCH, features=xs[0],
                tokens={"t1": 1, "t2": 2})
  cases = [
      (dict(tokens={"t0": 0, "t1": 1}), "tokens: client id 0 is the label party 'bank', which runs this server"),
      (dict(input_specs={"bank": specs["bank"]}), "input_specs: expected one ArraySpec per party ('bank', "
                                                  "'network', 'merchant'), got parties ('bank',)"),
      (dict(features=None), "features: the label party 'bank' holds a bottom: expected its (48, ...) columns"),
      (dict(features=xs[0][:, :4]), "features (party 'bank'): expected shape (48, 5) float32, got (48, 4) float32"),
      (dict(local_steps=4), "local_steps: expected an int in [1, 3] (steps in an epoch of 48 samples in batches of "
                            "16), got 4"),
      (dict(labels=y[:, None]), "labels: expected (N,) integer labels of the aligned samples, got (48, 1) int32"),
  ]
  def aligner(members=None):
    return T.Aligner(data["ids"]["bank"], members=members or {1: "network", 2: "merchant"})

  own = {"labels": data["bank_labels"], "features": data["cols"]["bank"]}  # all the bank's rows, one per ID
  cases += [
      (dict(aligner=aligner()), "labels: expected one label per ID the aligner holds (60), got 48"),
      (dict(aligner=aligner(members={1: "network"}), **own),
       "aligner: expected the members {1: 'network', 2: 'merchant'} (client id: party), got {1: 'network'}"),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=re.escape(message)):
      V.VerticalServer(sl, **{**common, **change})
  # with an aligner, training waits for the alignment
  server = V.VerticalServer(sl, **{**common, **own, "aligner": aligner()})
  with pytest.raises(T.TransportError, match=re.escape("FAILED_PRECONDITION: Handshake: the parties are not aligned "
                                                       "yet (merchant, network to go)")):
    V.connect_party(T.InProcessTransport(server.handle, token="t1"), sl, party="network", x=xs[1])


def test_requests_out_of_place_get_their_status_and_change_nothing(data, in_process):
  server = _server(in_process["sl"], data)
  link = T.InProcessTransport(server.handle, token=TOKENS[1])
  def smashed(shape, labels=None):
    return msgs.to_bytes(msgs.SmashedData(np.zeros(shape, np.float32), labels))

  good = smashed((BATCH, 6))
  forward = lambda **kw: wire.encode({"client": 1, "round": 0, "step": 0, "message": good, **kw})  # noqa: E731
  code = grpc.StatusCode
  cases = [
      ("Forward", forward(round=1), code.FAILED_PRECONDITION, "step 0 of round 1 is not the next step"),
      ("Forward", forward(step=1), code.FAILED_PRECONDITION, "step 1 of round 0 is not the next step"),
      ("Forward", forward(message=smashed((BATCH, 6), np.zeros(BATCH, np.int32))), code.INVALID_ARGUMENT, "labels"),
      ("Forward", forward(message=smashed((BATCH, 5))), code.INVALID_ARGUMENT,
       "field activations: expected shape (16, 6) float32, got (16, 5) float32"),
      ("Commit", wire.encode({"client": 1, "round": 0, "step": 0}), code.ABORTED, "is not staged"),
      ("Backward", forward(), code.UNIMPLEMENTED, "only U-shaped split learning has a Backward"),
      ("Handover", wire.encode({"client": 1, "round": 0, "op": "put", "steps": 3, "wait": 0.0, "message": b""}),
       code.FAILED_PRECONDITION, "vertical_sl averages nothing"),
      ("Handover", wire.encode({"client": 1, "round": 0, "op": "leave", "steps": 0, "wait": 0.0, "message": None}),
       code.FAILED_PRECONDITION, "takes part step by step in vertical SL; there is no round to leave"),
      ("Forward", wire.encode({"client": 2, "round": 0, "step": 0, "message": good}), code.PERMISSION_DENIED,
       "field 'client' is 2, but the credentials are client 1's"),
  ]
  before = server.snapshot()
  for method, request, status, details in cases:
    with pytest.raises(T.TransportError) as error:
      link.call(method, request)
    assert error.value.code == status and details in error.value.details, (method, error.value)
    assert server.snapshot() == before, method


def test_inference_without_a_party_names_it(data, in_process):
  server, runs, clock = in_process["server"], in_process["runs"], in_process["clock"]
  session, result = runs[1]
  errors = []

  def alone():
    try:
      V.predict_party(session, result.state, data["test"][1])
    except T.TransportError as e:
      errors.append(e)

  merchant = runs[2]
  with pytest.raises(T.TransportError, match=re.escape("INVALID_ARGUMENT: Predict: field 'offset' + 'batch' must be "
                                                       "at most the 10 samples of the label party's predict_features, "
                                                       "got 8 + 10")):
    V.predict_party(merchant[0], merchant[1].state, data["test"][2], offset=8)
  caller = threading.Thread(target=alone)
  caller.start()
  deadline = time.monotonic() + TIMEOUT
  while 1 not in server.s.volatile.inference:
    assert time.monotonic() < deadline
    time.sleep(0.02)
  with pytest.raises(T.TransportError, match=re.escape("INVALID_ARGUMENT: Predict: party 'merchant' sends the samples "
                                                       "4 .. 9, party 'network' 0 .. 9: every party sends its rows of "
                                                       "the same samples")):
    V.predict_party(merchant[0], merchant[1].state, data["test"][2][4:], offset=4)
  while caller.is_alive() and time.monotonic() < deadline:  # again, should the call's wait begin after a jump
    clock.offset += LEASE + 5
    caller.join(0.2)
  assert len(errors) == 1 and errors[0].code == grpc.StatusCode.FAILED_PRECONDITION
  assert errors[0].details == ("Predict: collaborative inference needs every party ('bank', 'network', 'merchant'); "
                               "party 'merchant' sent no rows within the lease (60.0 s)")
  assert not server.s.volatile.inference  # nothing left waiting


def test_sljax_serve_and_client(tmp_path, capsys):
  """`sljax serve --vertical` on the label party, a process, and `sljax client --vertical --party` on
  the other (its `main`, here: one process less to start), started together (the party retries
  until the server listens), each holding 90% of the samples (`--align --overlap 0.9`): aligned by
  PSI first (the plain intersection's size), every step applied, the party's bytes as its
  messages', inference on its test rows."""
  tokens = tmp_path / "tokens.txt"
  tokens.write_text("1 token-shape\n")
  with socket.socket() as s:  # a free port for both
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  common = ["--vertical", "breast_cancer_2", "--token-file", str(tokens), "--align", "--overlap", "0.9"]
  with open(tmp_path / "serve.log", "w") as log:
    server = subprocess.Popen([sys.executable, "-m", "sljax.cli", "serve", *common, "--port", str(port), "--rounds",
                               "1", "--local-steps", "2", "--batch-size", "32", "--continue-without"],
                              stdout=subprocess.DEVNULL, stderr=log)
  # `main` sets the process's compilation cache and the sljax logger's level: put both back after it
  enabled, level = jax.config.jax_enable_compilation_cache, logging.getLogger("sljax").level
  try:
    code = cli.main(["client", *common, "--party", "shape_symmetry", "--target", f"127.0.0.1:{port}", "--retries",
                     "30", "--json", "--no-compilation-cache"])
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    logging.getLogger("sljax").setLevel(level)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
  row = json.loads(out.strip().splitlines()[-1])
  ds = sljax.data.load_breast_cancer_vertical(num_parties=2)
  args = argparse.Namespace(align=True, overlap=0.9, data_seed=0)
  shared = set(ds.ids_train[cli._party_rows(args, ds, 0)]) & set(ds.ids_train[cli._party_rows(args, ds, 1)])
  assert row["aligned"] == len(shared) < len(ds.ids_train)  # aligned by PSI over the service first
  smashed = sljax.wire_size(sljax.SmashedData(np.zeros((32, 8), np.float32)))
  assert (row["party"], row["steps"], row["applied"], row["predictions"]) == ("shape_symmetry", 2, 2,
                                                                              len(ds.dataset.y_test))
  assert row["train_bytes_up"] == 2 * smashed
