"""A client is alive when it makes progress, not when it calls: one that others wait for and that only
polls `Status` is dropped after a lease, and the others go on without it."""

import threading
import time

import jax
import numpy as np
import pytest

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.transport import demo, wire
from transport_helpers import Clock

SCHEDULE = T.Schedule(num_clients=2, rounds=1, local_steps=2, batch_size=8)
TOKENS = {"token-zero": 0, "token-one": 1}
LEASE = 60.0


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(16,), lr=1e-3)


def _call(server, token, method, fields):
  client = TOKENS[token]
  response = T.InProcessTransport(server.handle, token=token).call(method, wire.encode({"client": client, **fields}))
  return wire.decode(method, response, response=True)


def test_a_client_that_only_polls_status_is_dropped_and_the_round_goes_on(setup):
  clock = Clock()
  server = T.ConcurrentServer(setup.model, setup.sl, algorithm="parallel_sl", schedule=SCHEDULE,
                              input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                              tokens=TOKENS, lease_seconds=LEASE, clock=clock)
  b = SCHEDULE.batch_size
  smashed = msgs.to_bytes(msgs.SmashedData(np.ones((b, 16), np.float32), np.zeros((b,), np.int32)))
  answered = {}
  forward = threading.Thread(target=lambda: answered.update(_call(server, "token-zero", "Forward", {
      "round": 0, "step": 0, "message": smashed})))
  forward.start()  # client 0 forwards step 0 and waits at the barrier for client 1
  for _ in range(3):  # client 1 only polls, for more than a lease
    time.sleep(0.2)
    assert _call(server, "token-one", "Status", {})["round"] == 0
    clock.offset += LEASE / 2
  forward.join(30)
  assert not forward.is_alive()
  assert bool(server.state.gone[1]) and not bool(server.state.gone[0])
  assert answered["message"] and np.isfinite(answered["loss"])  # step 0 went on without client 1
  with pytest.raises(T.TransportError, match="client 1 was dropped from round 0"):
    _call(server, "token-one", "Forward", {"round": 0, "step": 0, "message": smashed})
