"""simulation.run(..., transcript=) records every message of a multi-client run (a defended one: Gaussian noise on
the uplink), the same messages as the network server records for the same run; off, nothing changes."""

import chex
import jax
import numpy as np
import optax
import pytest

import sljax
from sljax import transport as T
from sljax.privacy import defenses, transcript
from sljax.transport import demo
from sljax.transport import schedule as sched
from transport_helpers import client_data, run_in_threads

SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=2, batch_size=8)
TOKENS = {0: "token-zero", 1: "token-one"}


def test_a_simulated_run_records_what_the_network_server_records(tmp_path):
  setup = demo.digits_setup(model="mlp", hidden=(16,), lr=1e-3)
  opt = optax.adam(1e-3)
  sl = sljax.vanilla(setup.model, client_optimizer=opt, server_optimizer=opt,
                     uplink=defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=0.5))
  spec = sljax.ArraySpec.of(setup.dataset.x_train)
  algo = sched.algorithm("parallel_sl", sl, SCHEDULE, spec)
  parts = sljax.data.iid(setup.dataset.y_train, num_clients=SCHEDULE.num_clients, seed=0)
  data = sljax.data.stack_clients(setup.dataset.x_train, setup.dataset.y_train, parts)
  init = algo.init(jax.random.key(0), data)
  plain, _ = sljax.simulation.run(algo, init, data, rounds=SCHEDULE.rounds, donate=False)
  recorded, _ = sljax.simulation.run(algo, init, data, rounds=SCHEDULE.rounds, donate=False,
                                     transcript=tmp_path / "sim.sljt")
  chex.assert_trees_all_close(recorded.clients.params, plain.clients.params, atol=1e-6, rtol=0)
  sim = transcript.load(tmp_path / "sim.sljt")
  # the same run over the network (in process), recorded by its server
  rec = transcript.Recorder(tmp_path / "net.sljt")
  server = T.ConcurrentServer(setup.model, sl, algorithm="parallel_sl", schedule=SCHEDULE, input_spec=spec,
                              key=jax.random.key(0), tokens={t: k for k, t in TOKENS.items()}, recorder=rec)

  def work(k):
    x, y = client_data(setup, k, SCHEDULE.num_clients)
    return T.run(T.connect(T.InProcessTransport(server.handle, token=TOKENS[k]), setup.model, sl, client=k, x=x, y=y))

  try:
    run_in_threads(work, TOKENS, timeout=180)
  finally:
    server.close()
  net = transcript.load(tmp_path / "net.sljt")
  key = lambda e: (e.round, e.step, e.client)  # noqa: E731
  sim_steps, net_steps = sorted(sim.exchanges(), key=key), sorted(net.exchanges(), key=key)
  assert [key(e) for e in sim_steps] == [key(e) for e in net_steps] == [
      (r, s, k) for r in range(2) for s in range(2) for k in range(2)]
  for a, b in zip(sim_steps, net_steps):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.smashed, b.smashed, atol=1e-5)  # noise included: the same keys
    np.testing.assert_allclose(a.grad, b.grad, atol=1e-5)
    assert (np.asarray(a.smashed) < 0).any()  # the noise codec ran (the half ends in a ReLU)


def test_recording_an_algorithm_whose_round_returns_no_messages_is_refused(tmp_path):
  setup = demo.digits_setup(model="mlp", hidden=(16,), lr=1e-3)
  spec = sljax.ArraySpec.of(setup.dataset.x_train)
  algo = sched.algorithm("splitfed_v1", setup.sl, SCHEDULE, spec)
  data = sljax.data.stack_clients(setup.dataset.x_train[:32], setup.dataset.y_train[:32],
                                  [np.arange(16), np.arange(16, 32)])
  with pytest.raises(ValueError, match=r"^transcript: the round of splitfed_v1 does not return its messages"):
    sljax.simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=1, transcript=tmp_path / "t.sljt")
