"""The coordinators of the concurrent server as pure state transitions: no threads, no sockets, no
clock. A request maps a state to a new state and a `Reply` or a `Wait`; these tests drive them by
hand, as the shell would, and check who waits for whom, what each client gets, and that a refused
request leaves the state it was given exactly as it was.

Set-up: the demo MLP on digits, two clients, 2 rounds of 2 steps with batches of 8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sljax
from sljax import messages as msgs
from sljax.transport import coordinators as coord
from sljax.transport import demo
from sljax.transport import schedule as sched
from sljax.transport.wire import TransportError
from transport_helpers import assert_bitwise

SCHEDULE = sched.Schedule(num_clients=2, rounds=2, local_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(16,), dropout=0.0, lr=1e-2)


@pytest.fixture(scope="module")
def coordinator(setup):
  """`coordinator(algorithm)`: the coordinator, its started state and the halves' init, built once per
  algorithm in this module. A coordinator is pure (a request maps a state to a new state), so the tests
  share its compiled programs, each starting from the same state."""
  built = {}

  def get(algorithm):
    if algorithm not in built:
      built[algorithm] = _coordinator(setup, algorithm)
    return built[algorithm]

  return get


def _coordinator(setup, algorithm):
  sl = setup.sl
  spec = sljax.ArraySpec.of(setup.dataset.x_train)
  algo = sched.algorithm(algorithm, sl, SCHEDULE, spec)
  sim = jax.jit(algo.init)(jax.random.key(0), sched.stand_in_data(SCHEDULE, spec))
  x_struct = jax.ShapeDtypeStruct((SCHEDULE.batch_size, *spec.shape), spec.dtype)
  y_struct = jax.ShapeDtypeStruct((SCHEDULE.batch_size,), jnp.int32)
  init = jax.jit(sl.init)(jax.random.key(0), jnp.zeros(x_struct.shape, x_struct.dtype))
  smashed = jax.eval_shape(sl.client_forward, init.client, x_struct, y_struct, jax.random.key(0))[0]
  first = jax.tree.map(lambda a: a[0], sim.clients)
  c = coord.COORDINATORS[algorithm](algo, schedule=SCHEDULE, lease_seconds=1.0, smashed_template=smashed,
                                    weights_template=msgs.spec_of(coord.weights_of(first)), max_message_bytes=1 << 26)
  s = c.start(c.initial(sim)).replace(samples=np.array([10, 30], np.int32))
  return c, s, init


def _smashed(setup, init, client, step):
  x = setup.dataset.x_train[client * 8 + step:client * 8 + step + 8]
  y = setup.dataset.y_train[client * 8 + step:client * 8 + step + 8].astype(np.int32)
  up, _ = setup.sl.client_forward(init.client, x, y, jax.random.key(client))
  return msgs.to_bytes(up)


def _resolve(outcome, s):
  """What the shell does once a `Wait`'s condition holds: call its continuation."""
  assert isinstance(outcome, coord.Wait) and outcome.until(s)
  return outcome.then(s)


def test_lockstep_holds_each_forward_until_every_client_has_forwarded(setup, coordinator):
  c, s0, init = coordinator("parallel_sl")
  s1, wait0 = c.on_forward(s0, 0, 0, 0, _smashed(setup, init, 0, 0))
  assert isinstance(wait0, coord.Wait) and not wait0.until(s1)  # client 1 has not forwarded: no server step yet
  assert c.waited_for(s1, 1) and not c.waited_for(s1, 0)
  s2, wait1 = c.on_forward(s1, 1, 0, 0, _smashed(setup, init, 1, 0))
  assert wait1.until(s2) and wait0.until(s2)  # the barrier is passed: one server step on both
  s2, reply0 = wait0.then(s2)
  s2, reply1 = wait1.then(s2)
  assert reply0.fields["message"] != reply1.fields["message"]  # each gets the gradient of its own loss
  assert_bitwise(s2.durable.server, s0.durable.server)  # not applied before the commits
  # commits: the first waits for the second, then the update is applied
  s3, commit0 = c.on_commit(s2, 0, 0, 0)
  assert not commit0.until(s3) and c.waited_for(s3, 1)
  s4, commit1 = c.on_commit(s3, 1, 0, 0)
  assert commit1.until(s4) and commit0.until(s4)
  assert int(s4.durable.step) == 1 and s4.durable.upto.tolist() == [1, 1]
  assert s4.volatile.commits_since_save == 1
  _, reply = commit0.then(s4)
  assert reply.fields is coord.POSITION  # the shell fills in the position once the checkpoint is written
  assert c.position(s4, 0)["step"] == 1 and c.position(s4, 0)["durable"] == 0  # not checkpointed yet
  assert c.position(c.saved(s4), 0)["durable"] == 1


def test_lockstep_discards_the_step_of_a_client_dropped_after_its_forward(setup, coordinator):
  c, s, init = coordinator("parallel_sl")
  s, wait0 = c.on_forward(s, 0, 0, 0, _smashed(setup, init, 0, 0))
  s, wait1 = c.on_forward(s, 1, 0, 0, _smashed(setup, init, 1, 0))
  s, _ = wait0.then(s)
  s, _ = wait1.then(s)
  s, commit0 = c.on_commit(s, 0, 0, 0)
  dropped = c.advance(c.drop(s, 1, "test"))  # client 1 never commits: dropped, the step is applied without it
  assert commit0.until(dropped) and dropped.durable.upto.tolist() == [1, 0] and dropped.durable.gone.tolist() == [
      False, True]
  # the same as a step on client 0 alone, from the same start
  _, t, _ = coordinator("parallel_sl")
  t = c.drop(t, 1, "sits out")
  t, w = c.on_forward(t, 0, 0, 0, _smashed(setup, init, 0, 0))
  t, _ = _resolve(w, t)
  t, w = c.on_commit(t, 0, 0, 0)
  t, _ = _resolve(w, t)
  assert_bitwise(dropped.durable.server, t.durable.server)


def test_refused_requests_leave_the_state_as_it_was(setup, coordinator):
  c, s, init = coordinator("parallel_sl")
  before = jax.device_get(s)
  with pytest.raises(TransportError, match="step 1 is not the next step"):
    c.on_forward(s, 0, 0, 1, _smashed(setup, init, 0, 0))
  with pytest.raises(TransportError, match="round 1 has not begun"):
    c.on_commit(s, 0, 1, 0)
  with pytest.raises(TransportError, match="Commit: step 0 of round 0 is not staged"):
    c.on_commit(s, 0, 0, 0)
  with pytest.raises(TransportError, match="parallel_sl averages nothing"):
    c.on_put(s, 0, 0, 2, b"")
  with pytest.raises(TransportError, match="Forward: SmashedData: malformed or truncated message"):
    c.on_forward(s, 0, 0, 0, b"not msgpack")
  assert_bitwise(jax.device_get(s), before)


def test_copies_serve_at_once_and_average_at_the_end_of_the_round(setup, coordinator):
  c, s, init = coordinator("splitfed_v1")
  for step in range(SCHEDULE.local_steps):
    for k in (0, 1):
      s, reply = c.on_forward(s, k, 0, step, _smashed(setup, init, k, step))
      assert isinstance(reply, coord.Reply)  # no barrier: each client has its own server copy
      s, reply = c.on_commit(s, k, 0, step)
      assert isinstance(reply, coord.Reply)
  assert s.volatile.must_save  # a client's last step of the round is made durable at once
  half = msgs.to_bytes(coord.weights_of(init.client))
  s, reply = c.on_put(s, 0, 0, SCHEDULE.local_steps, half)
  assert int(s.durable.round) == 0 and c.waited_for(s, 1)  # client 0 waits for client 1's weights
  s, get = c.on_get(s, 0, 1, 5.0, b"")
  assert isinstance(get, coord.Wait) and not get.until(s)
  s, reply = c.on_put(s, 1, 0, SCHEDULE.local_steps, half)
  assert int(s.durable.round) == 1 and s.durable.handed.tolist() == [False, False]
  s, got = get.then(s)
  assert got.fields["ready"] and got.fields["message"] is not None
  # the copies were averaged with the clients' sample counts (10, 30): every copy holds the average
  params = jax.tree.leaves(s.durable.server.params)
  assert all(np.array_equal(p[0], p[1]) for p in params)


def test_in_order_holds_a_forward_until_the_clients_before_it_committed(setup, coordinator):
  c, s, init = coordinator("splitfed_v2")
  first, second = (int(k) for k in c.round_order(s))
  s, wait_second = c.on_forward(s, second, 0, 0, _smashed(setup, init, second, 0))
  assert not wait_second.until(s) and c.waited_for(s, first)
  s, wait_first = c.on_forward(s, first, 0, 0, _smashed(setup, init, first, 0))
  s, _ = _resolve(wait_first, s)
  assert not wait_second.until(s)  # the first client's step is staged, not committed
  s, _ = c.on_commit(s, first, 0, 0)
  s, reply = _resolve(wait_second, s)  # now the server half holds the first client's update
  assert isinstance(reply, coord.Reply)
  with pytest.raises(TransportError, match="is not staged"):
    c.on_commit(s, first, 0, 1)
  # a dropped client is passed over: the turn goes on to the next step
  s = c.advance(c.drop(s, second, "test"))
  assert int(s.durable.step) == 1 and c.serving(s) == first


def test_local_loss_answers_with_no_gradient(setup, coordinator):
  c, s, init = coordinator("local_loss_sl")
  s, wait0 = c.on_forward(s, 0, 0, 0, _smashed(setup, init, 0, 0))
  s, wait1 = c.on_forward(s, 1, 0, 0, _smashed(setup, init, 1, 0))
  s, reply = _resolve(wait0, s)
  assert reply.fields["message"] == b"" and reply.fields["loss"] > 0  # nothing goes down
  s, _ = _resolve(wait1, s)
  s, commit0 = c.on_commit(s, 0, 0, 0)
  s, commit1 = c.on_commit(s, 1, 0, 0)
  assert commit0.until(s) and s.durable.upto.tolist() == [1, 1]


def test_every_network_algorithm_has_a_coordinator_and_a_simulation():
  assert set(coord.COORDINATORS) <= set(sljax.algorithms.REGISTRY)
