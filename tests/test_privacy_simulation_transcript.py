"""simulation.run(..., transcript=) records every message of a multi-client run, for every split-learning algorithm
of the registry: the same records (direction, round, step, client, message kind and size, in each client's order) as
the network server records for the same run, with the same payloads (dropout in the model, or Gaussian noise on the
uplink: the keys must agree too); recording leaves the run's result bit for bit as it was; FedAvg and the centralized
baseline, which have no such messages, are refused by name.

Each algorithm runs in the set-up of the test that already runs it over the network and in simulation (the same
model, protocol and schedule: the demo MLP on digits, two clients with an iid split), so that the session's
compilation cache compiles those programs once for both tests.
"""

import functools
from typing import NamedTuple

import chex
import jax
import numpy as np
import optax
import pytest

import sljax
from sljax import transport as T
from sljax.privacy import defenses, transcript
from sljax.transport import schedule as sched
from transport_helpers import assert_bitwise, run_in_threads

TOKENS = {0: "token-zero", 1: "token-one"}
NO_MESSAGES = {"fedavg": "sends no split-learning messages", "centralized": "sends no messages"}
SPLIT = [name for name in sljax.algorithms.REGISTRY if name not in NO_MESSAGES]  # every split-learning algorithm


class Setup(NamedTuple):
  """A run: its schedule, the MLP's hidden widths and dropout, Adam's learning rate, Gaussian noise on the uplink."""

  schedule: T.Schedule
  hidden: tuple[int, ...]
  dropout: float = 0.25
  lr: float = 2e-3
  noise: bool = False


CONCURRENT = T.Schedule(num_clients=2, rounds=2, local_steps=3, batch_size=16)  # tests/test_transport_concurrent.py
SETUPS = {
    "parallel_sl": Setup(T.Schedule(2, 2, 2, 8), (16,), 0.0, 1e-3, noise=True),  # tests/test_privacy_network.py
    "sequential_sl": Setup(T.Schedule(2, 2, 2, 16), (32,)),  # tests/test_transport.py
    "sequential_sl_u": Setup(T.Schedule(2, 2, 2, 16), (16, 16)),  # tests/test_transport_ushaped.py
    "parallel_sl_u": Setup(CONCURRENT, (32, 32)),
    "heterogeneous_parallel_sl": Setup(CONCURRENT, (32, 32)),
}
CUTS = [1, 2]  # heterogeneous parallel SL: client k's cut


@pytest.fixture(scope="module")
def dataset():
  return sljax.data.load_digits(image=False)


def _for(algorithm, client=0):
  """Client `client`'s model and protocol in `algorithm`, and the algorithm's options and schedule."""
  setup = SETUPS.get(algorithm, Setup(CONCURRENT, (32,)))
  opt = optax.adam(setup.lr)
  noise = defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=0.5) if setup.noise else None
  layers = sljax.models.mlp(hidden=setup.hidden, dropout=setup.dropout)
  if algorithm.endswith("_u"):
    model = sljax.cut(layers, 1, 2)
    return model, sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt, uplink=noise), {}, setup.schedule
  cuts = {"cuts": CUTS} if algorithm == "heterogeneous_parallel_sl" else {}
  model = sljax.cut(layers, CUTS[client] if cuts else 1)
  return model, sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, uplink=noise), cuts, setup.schedule


def _client_data(dataset, k, num_clients):
  part = sljax.data.iid(dataset.y_train, num_clients=num_clients, seed=0)[k]
  return dataset.x_train[part], dataset.y_train[part]


def _records(path):
  """The transcript's records as (round, step, client, direction, kind, size, body), sorted by (round, step,
  client) and, within those, in the order they were written (a client's calls are in order; clients interleave)."""
  rows = [(r.round, r.step, r.client, r.direction, *transcript.decode(r.payload), len(r.payload))
          for r in transcript.load(path).records]
  return sorted([(*row[:5], row[6], row[5]) for row in rows], key=lambda row: row[:3])


def _network(dataset, algorithm, path):
  """The same run over the network (in process, clients in threads), recorded by its server."""
  model, sl, options, schedule = _for(algorithm)
  server = T.ConcurrentServer(model, sl, algorithm=algorithm, schedule=schedule,
                              input_spec=sljax.ArraySpec.of(dataset.x_train), key=jax.random.key(0),
                              tokens={t: k for k, t in TOKENS.items()}, recorder=transcript.Recorder(path),
                              options=options)

  def work(k):
    x, y = _client_data(dataset, k, schedule.num_clients)
    own_model, own_sl, own_options, _ = _for(algorithm, k)
    return T.run(T.connect(T.InProcessTransport(server.handle, token=TOKENS[k]), own_model, own_sl, client=k, x=x,
                           y=y, options=own_options))

  try:
    run_in_threads(work, TOKENS, timeout=180)
  finally:
    server.close()


@pytest.mark.parametrize("algorithm", SPLIT)
def test_a_simulated_run_records_what_the_network_server_records(dataset, algorithm, tmp_path):
  _, sl, options, schedule = _for(algorithm)
  algo = sched.algorithm(algorithm, sl, schedule, sljax.ArraySpec.of(dataset.x_train), **options)
  parts = sljax.data.iid(dataset.y_train, num_clients=schedule.num_clients, seed=0)
  data = sljax.data.stack_clients(dataset.x_train, dataset.y_train, parts)
  init = algo.init(jax.random.key(0), data)
  plain, _ = sljax.simulation.run(algo, init, data, rounds=schedule.rounds, donate=False)
  recorded, _ = sljax.simulation.run(algo, init, data, rounds=schedule.rounds, donate=False,
                                     transcript=tmp_path / "sim.sljt")
  assert_bitwise(recorded, plain)  # recording changes nothing
  _network(dataset, algorithm, tmp_path / "net.sljt")
  sim, net = _records(tmp_path / "sim.sljt"), _records(tmp_path / "net.sljt")
  assert [row[:6] for row in sim] == [row[:6] for row in net]
  for a, b in zip(sim, net):
    chex.assert_trees_all_close(a[6], b[6], atol=1e-5, rtol=0)  # dropout masks and noise included: the same keys
  kinds = {row[4] for row in sim}
  assert {"SmashedData", "ClientHalf"} <= kinds
  assert ("CutGradient" in kinds) == (algorithm != "local_loss_sl")
  assert ({"BodyOutput", "TailGradient"} <= kinds) == algorithm.endswith("_u")
  assert ("ModelWeights" in kinds) == algorithm.startswith("splitfed")
  if SETUPS.get(algorithm, Setup(CONCURRENT, ())).noise:  # the noise codec ran (the client half ends in a ReLU)
    assert any((row[6]["activations"] < 0).any() for row in sim if row[4] == "SmashedData")


@pytest.mark.parametrize("algorithm", NO_MESSAGES)
def test_recording_an_algorithm_without_split_messages_is_refused(dataset, algorithm, tmp_path):
  model = sljax.cut(sljax.models.mlp(hidden=(16,)), 1)
  algo = sljax.algorithms.REGISTRY[algorithm].factory(sljax.centralized(model, optimizer=optax.adam(1e-3)),
                                                      sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=8))
  data = sljax.data.stack_clients(dataset.x_train[:32], dataset.y_train[:32], [np.arange(16), np.arange(16, 32)])
  with pytest.raises(ValueError, match=rf"^transcript: {algorithm} {NO_MESSAGES[algorithm]}"):
    sljax.simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=1, transcript=tmp_path / "t.sljt")
  assert not (tmp_path / "t.sljt").exists()


def test_a_client_that_drops_is_recorded_up_to_its_last_message(dataset, tmp_path):
  """Sequential SL, client 1 drops in step 1 (after its forward pass): it got the half and sent its smashed data of
  steps 0 and 1, got the cut gradient of step 0 only, and hands nothing back; client 0 is recorded whole. Asked
  for, each step's batch comes first (truth records), the rows the round trained on."""
  _, sl, _, schedule = _for("sequential_sl")
  algo = sched.algorithm("sequential_sl", sl, schedule, sljax.ArraySpec.of(dataset.x_train))
  data = sljax.data.stack_clients(dataset.x_train, dataset.y_train,
                                  sljax.data.iid(dataset.y_train, num_clients=2, seed=0))
  inputs = sljax.algorithms.RoundInputs(np.array([True, True]), np.array([[False, False], [False, True]]))
  with transcript.Recorder(tmp_path / "t.sljt", truth=True) as recorder:
    recording = transcript.RoundRecording(algo, recorder)
    state = algo.init(jax.random.key(0), data)
    recording.start(state, data)
    recording.write(0, *jax.jit(functools.partial(algo.round, record=True))(state, data, inputs))
    recording.finish()
  records = transcript.load(tmp_path / "t.sljt").records
  kinds = [(r.step, r.client, r.direction, "batch" if r.direction == "truth" else transcript.decode(r.payload)[0])
           for r in records]
  assert [k for k in kinds if k[1] == 1] == [(0, 1, "truth", "batch"), (0, 1, "down", "ClientHalf"),
                                            (0, 1, "up", "SmashedData"), (0, 1, "down", "CutGradient"),
                                            (1, 1, "truth", "batch"), (1, 1, "up", "SmashedData")]
  assert [k for k in kinds if k[1] == 0] == [(0, 0, "truth", "batch"), (0, 0, "down", "ClientHalf"),
                                            (0, 0, "up", "SmashedData"), (0, 0, "down", "CutGradient"),
                                            (1, 0, "truth", "batch"), (1, 0, "up", "SmashedData"),
                                            (1, 0, "down", "CutGradient"), (2, 0, "up", "ClientHalf")]
  x, y, _ = sljax.data.client_batches(data, 1, batch_size=schedule.batch_size, key=jax.random.wrap_key_data(state.key))
  (step_1,) = [e for e in transcript.load(tmp_path / "t.sljt").exchanges() if (e.step, e.client) == (1, 1)]
  np.testing.assert_array_equal(step_1.inputs, x[1])
  np.testing.assert_array_equal(step_1.true_labels, y[1])
  np.testing.assert_array_equal(step_1.labels, y[1])  # vanilla SL sends the labels with the smashed data
