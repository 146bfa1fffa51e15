"""U-shaped split learning over the network: the labels never leave the client.

One client over InProcessTransport equals the fused `u_shaped(...).step` on the same batches and
keys; two clients taking turns over gRPC equal the same run in process bit for bit; no request the
server receives holds the labels; bad `Backward` requests get their status and change nothing;
`predict` over the transport equals `u_shaped(...).predict`.

Set-up: `cut(mlp(hidden=(16, 16), dropout), 1, 2)` on flat digits (head 64 -> 16 | body 16 -> 16 |
tail 16 -> 10) with Adam; 2 rounds of 2 steps per turn with batches of 16.
"""


import chex
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.transport import schedule as sched
from sljax.transport import wire
from transport_helpers import assert_bitwise, run_in_threads

HIDDEN = (16, 16)
DROPOUT = 0.25  # so that every step key matters
LR = 2e-3
SEED = 0
B = 16
TOKENS = {0: "token-zero", 1: "token-one"}
TIMEOUT = 120


@pytest.fixture(scope="module")
def setup():
  dataset = sljax.data.load_digits(image=False)
  model = sljax.cut(sljax.models.mlp(hidden=HIDDEN, dropout=DROPOUT), 1, 2)
  sl = sljax.u_shaped(model, client_optimizer=optax.adam(LR), server_optimizer=optax.adam(LR))
  return model, sl, dataset


def _server(setup, schedule, **kw):
  model, sl, dataset = setup
  return T.SplitServer(model, sl, schedule=schedule, input_spec=sljax.ArraySpec.of(dataset.x_train),
                       key=jax.random.key(SEED), tokens={t: k for k, t in TOKENS.items() if k < schedule.num_clients},
                       **kw)


def _client_data(setup, k, num_clients):
  dataset = setup[2]
  part = sljax.data.iid(dataset.y_train, num_clients=num_clients, seed=0)[k]
  return dataset.x_train[part], dataset.y_train[part]


class _Recording:
  """A transport that keeps every request it passes on: the bytes the server receives."""

  def __init__(self, inner):
    self.inner, self.requests = inner, []

  def call(self, method, request, *, timeout=None):
    self.requests.append((method, bytes(request)))
    return self.inner.call(method, request, timeout=timeout)


def _run_clients(setup, transports, num_clients):

  def work(k):
    x, y = _client_data(setup, k, num_clients)
    return T.run(T.connect(transports[k], setup[0], setup[1], client=k, x=x, y=y))

  return run_in_threads(work, transports, timeout=TIMEOUT)


ONE = T.Schedule(num_clients=1, rounds=2, local_steps=2, batch_size=B)


@pytest.fixture(scope="module")
def vanilla_one(setup):
  """Vanilla split learning's case: one client, in process, every request recorded."""
  server = _server(setup, ONE)
  link = _Recording(T.InProcessTransport(server.handle, token=TOKENS[0]))
  result = _run_clients(setup, {0: link}, 1)[0]
  return server, link, result


def _fused(setup, schedule):
  """The fused `u_shaped.step`, on client 0's batches in the run's order with the run's step keys."""
  sl = setup[1]
  x, y = _client_data(setup, 0, 1)
  k_model, k_run = jax.random.split(jax.random.key(SEED))  # as sequential_sl_u.init splits its key
  run_key = jax.random.key_data(k_run)
  state = sl.init(k_model, jnp.zeros((B, x.shape[1]), x.dtype))
  rows = sched.row_order(client=0, count=len(x), batch_size=B, run_key=run_key)
  step, losses = jax.jit(sl.step), []
  for r in range(schedule.rounds):
    for s in range(schedule.local_steps):
      batch = np.asarray(rows(sched.data_step(schedule, r, s)))
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(run_key), r), 1), s)
      state, metrics = step(state, (x[batch], y[batch]), key)
      losses.append(float(metrics["loss"]))
  return state, losses


def test_one_client_equals_the_fused_step(setup, vanilla_one):
  server, _, result = vanilla_one
  assert server.algorithm == "sequential_sl_u"
  assert [(h["round"], h["step"]) for h in result.history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert_bitwise(result.half.params, server.state.client_half.params)
  fused, losses = _fused(setup, ONE)
  # Not bitwise: the fused step is one program, XLA may fuse differently.
  chex.assert_trees_all_close(server.state.server.params, fused.server.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(server.state.server.opt_state, fused.server.opt_state, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(result.half.params, fused.client.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(result.half.opt_state, fused.client.opt_state, atol=1e-6, rtol=0)
  # The metrics come from the client's tail, not from the server.
  np.testing.assert_allclose([h["loss"] for h in result.history], losses, atol=1e-6, rtol=0)


def test_the_server_never_receives_the_labels(setup, vanilla_one):
  _, link, _ = vanilla_one
  x, y = _client_data(setup, 0, 1)
  run_key = jax.random.key_data(jax.random.split(jax.random.key(SEED))[1])
  rows = sched.row_order(client=0, count=len(x), batch_size=B, run_key=run_key)
  batches = [np.asarray(rows(t)) for t in range(ONE.rounds * ONE.local_steps)]
  # The check can fail: a vanilla uplink of the same batch holds the labels' bytes.
  assert y[batches[0]].tobytes() in msgs.to_bytes(msgs.SmashedData(np.zeros((B, HIDDEN[0]), np.float32), y[batches[0]]))
  methods = [m for m, _ in link.requests]
  assert methods.count("Forward") == methods.count("Backward") == methods.count("Commit") == 4
  for method, request in link.requests:
    for rows_t in batches:
      assert y[rows_t].tobytes() not in request, method
      assert x[rows_t[0]].tobytes() not in request, method
    if method == "Forward":
      message = wire.decode(method, request)["message"]
      assert serialization.msgpack_restore(message)["body"]["labels"] is None


def test_two_clients_over_grpc_equal_in_process_bitwise(setup):
  two = T.Schedule(num_clients=2, rounds=2, local_steps=2, batch_size=B)
  reference = _server(setup, two)
  in_process = _run_clients(setup, {k: T.InProcessTransport(reference.handle, token=t) for k, t in TOKENS.items()}, 2)
  server = _server(setup, two)
  running = T.serve(server.handle, address="127.0.0.1:0")
  links = {k: T.GrpcTransport(f"127.0.0.1:{running.port}", token=t) for k, t in TOKENS.items()}
  try:
    over_grpc = _run_clients(setup, links, 2)
  finally:
    for link in links.values():
      link.close()
    running.stop()
  assert int(server.state.round) == two.rounds and bool(server.state.last_completed.all())
  assert_bitwise((server.state.server, server.state.client_half),
                  (reference.state.server, reference.state.client_half))
  for k in TOKENS:
    assert_bitwise(over_grpc[k].half.params, in_process[k].half.params)
    assert over_grpc[k].history == in_process[k].history
  # ... and the fused simulation of the same run, `sequential_sl_u` from the registry, within 1e-6
  model, sl, dataset = setup
  algo = sljax.algorithms.sequential_sl_u(sl, sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=B,
                                                                             local_steps=two.local_steps))
  data = sljax.data.stack_clients(dataset.x_train, dataset.y_train, sljax.data.iid(dataset.y_train, num_clients=2,
                                                                                   seed=0))
  sim, round_fn = algo.init(jax.random.key(SEED), data), jax.jit(algo.round)
  for _ in range(two.rounds):
    sim, _ = round_fn(sim, data)
  chex.assert_trees_all_close(reference.state.server.params, sim.server.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(reference.state.client_half.params, sim.clients.params, atol=1e-6, rtol=0)


def _request(round_=0, step=0, message=b"", client=0):
  return wire.encode({"client": client, "round": round_, "step": step, "message": message})


def _tail_grad(grad):
  return msgs.to_bytes(msgs.TailGradient(grad))


def test_bad_backward_gets_its_status_and_leaves_the_server_unchanged(setup):
  server = _server(setup, ONE, max_message_bytes=100_000)
  link = T.InProcessTransport(server.handle, token=TOKENS[0])
  code = grpc.StatusCode
  good = _tail_grad(np.zeros((B, HIDDEN[1]), np.float32))

  def refused(method, request, want, match):
    before = server.snapshot()
    with pytest.raises(T.TransportError, match=match) as e:
      link.call(method, request)
    assert e.value.code == want, (match, e.value)
    assert server.snapshot() == before, match

  link.call("Handover", wire.encode({"client": 0, "round": 0, "op": "get", "steps": 0, "wait": 1.0, "message": None}))
  refused("Backward", _request(message=good), code.ABORTED, "Backward: step 0 of round 0 is not staged")
  smashed = msgs.to_bytes(msgs.SmashedData(np.zeros((B, HIDDEN[0]), np.float32)))
  with_labels = msgs.to_bytes(msgs.SmashedData(np.zeros((B, HIDDEN[0]), np.float32), np.zeros((B,), np.int32)))
  refused("Forward", _request(message=with_labels), code.INVALID_ARGUMENT, "labels")
  forward = wire.decode("Forward", link.call("Forward", _request(message=smashed)), response=True)
  assert forward["loss"] == forward["accuracy"] == 0.0
  refused("Commit", wire.encode({"client": 0, "round": 0, "step": 0}), code.ABORTED, "no Backward yet")
  nan = np.full((B, HIDDEN[1]), np.nan, np.float32)
  for request, want, match in [
      (_request(message=_tail_grad(np.zeros((B, 15), np.float32))), code.INVALID_ARGUMENT,
       r"field grad: expected shape \(16, 16\) float32, got \(16, 15\) float32"),
      (_request(message=_tail_grad(np.zeros((B, HIDDEN[1]), np.float64))), code.INVALID_ARGUMENT,
       r"got \(16, 16\) float64"),
      (_request(message=_tail_grad(nan)), code.INVALID_ARGUMENT, "grad.*NaN or infinite"),
      (_request(message=msgs.to_bytes(msgs.CutGradient(np.zeros((B, HIDDEN[1]), np.float32)))),
       code.INVALID_ARGUMENT, "expected kind TailGradient"),
      (_request(message=good[:-20]), code.INVALID_ARGUMENT, "malformed or truncated"),
      (_request(message=good) + b"\x00" * 120_000, code.RESOURCE_EXHAUSTED, "exceeds the maximum"),
      (_request(step=1, message=good), code.FAILED_PRECONDITION, "not the next step"),
      (_request(round_=1, message=good), code.FAILED_PRECONDITION, "has not begun"),
      (_request(message=good, client=1), code.PERMISSION_DENIED, "credentials are client 0's"),
  ]:
    refused("Backward", request, want, match)
  # The staged step goes on: Backward (twice: a retry recomputes the same), then Commit.
  before = server.snapshot()
  first = link.call("Backward", _request(message=good))
  assert server.snapshot() != before
  staged = server.snapshot()
  assert link.call("Backward", _request(message=good)) == first and server.snapshot() == staged
  assert wire.decode("Commit", link.call("Commit", wire.encode({"client": 0, "round": 0, "step": 0})),
                     response=True)["step"] == 1
  refused("Backward", _request(message=good), code.ALREADY_EXISTS, "already committed")


def test_predict_over_the_transport_equals_the_fused_predict(setup, vanilla_one):
  model, sl, dataset = setup
  server, _, result = vanilla_one
  session = T.connect(T.InProcessTransport(server.handle, token=TOKENS[0]), model, sl, client=0,
                      x=dataset.x_train[:20], y=dataset.y_train[:20])
  logits = T.predict(session, result.half, dataset.x_test, batch_size=128)
  state = sljax.SplitState(result.half, server.state.server, jnp.zeros((), jnp.int32))
  expected, _ = sl.predict(state, dataset.x_test)
  assert logits.shape == expected.shape == (len(dataset.x_test), 10)
  np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=0)
