"""simulation.run(..., transcript=) records every message of a multi-client run, for every split-learning algorithm
of the registry: the same records (direction, round, step, client, message kind and size, in each client's order) as
the network server records for the same run, with the same payloads (a defended run: Gaussian noise on the uplink,
so the keys must agree too); recording leaves the run's result bit for bit as it was; FedAvg and the centralized
baseline, which have no such messages, are refused by name.

Set-up: the demo MLP on digits (64 -> 16 | -> 10; U-shaped and heterogeneous cuts: 64 -> 16 -> 16 -> 10 cut as
tests/test_transport_concurrent.py cuts it), Adam, two clients with an iid split, 2 rounds of 2 steps of 8 rows.
"""

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
from transport_helpers import assert_bitwise, client_data, run_in_threads

SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=2, batch_size=8)
TOKENS = {0: "token-zero", 1: "token-one"}
NO_MESSAGES = {"fedavg": "sends no split-learning messages", "centralized": "sends no messages"}
SPLIT = [name for name in sljax.algorithms.REGISTRY if name not in NO_MESSAGES]  # every split-learning algorithm
CUTS = [1, 2]  # heterogeneous parallel SL: client k's cut


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(16,), lr=1e-3)


def _for(setup, algorithm, client=0):
  """Client `client`'s model and protocol in `algorithm` (defended: noise on the uplink), and the algorithm's options."""
  opt = optax.adam(1e-3)
  noise = defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=0.5)
  deeper = sljax.models.mlp(hidden=(16, 16))
  if algorithm.endswith("_u"):
    model = sljax.cut(deeper, 1, 2)
    return model, sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt, uplink=noise), {}
  model, options = setup.model, {}
  if algorithm == "heterogeneous_parallel_sl":
    model, options = sljax.cut(deeper, CUTS[client]), {"cuts": CUTS}
  return model, sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, uplink=noise), options


def _records(path):
  """The transcript's records as (round, step, client, direction, kind, size, body), sorted by (round, step,
  client) and, within those, in the order they were written (a client's calls are in order; clients interleave)."""
  rows = [(r.round, r.step, r.client, r.direction, *transcript.decode(r.payload), len(r.payload))
          for r in transcript.load(path).records]
  return sorted([(*row[:5], row[6], row[5]) for row in rows], key=lambda row: row[:3])


def _network(setup, algorithm, path):
  """The same run over the network (in process, clients in threads), recorded by its server."""
  model, sl, options = _for(setup, algorithm)
  server = T.ConcurrentServer(model, sl, algorithm=algorithm, schedule=SCHEDULE,
                              input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                              tokens={t: k for k, t in TOKENS.items()}, recorder=transcript.Recorder(path),
                              options=options)

  def work(k):
    x, y = client_data(setup, k, SCHEDULE.num_clients)
    own_model, own_sl, own_options = _for(setup, algorithm, k)
    return T.run(T.connect(T.InProcessTransport(server.handle, token=TOKENS[k]), own_model, own_sl, client=k, x=x,
                           y=y, options=own_options))

  try:
    run_in_threads(work, TOKENS, timeout=180)
  finally:
    server.close()


@pytest.mark.parametrize("algorithm", SPLIT)
def test_a_simulated_run_records_what_the_network_server_records(setup, algorithm, tmp_path):
  _, sl, options = _for(setup, algorithm)
  algo = sched.algorithm(algorithm, sl, SCHEDULE, sljax.ArraySpec.of(setup.dataset.x_train), **options)
  parts = sljax.data.iid(setup.dataset.y_train, num_clients=SCHEDULE.num_clients, seed=0)
  data = sljax.data.stack_clients(setup.dataset.x_train, setup.dataset.y_train, parts)
  init = algo.init(jax.random.key(0), data)
  plain, _ = sljax.simulation.run(algo, init, data, rounds=SCHEDULE.rounds, donate=False)
  recorded, _ = sljax.simulation.run(algo, init, data, rounds=SCHEDULE.rounds, donate=False,
                                     transcript=tmp_path / "sim.sljt")
  assert_bitwise(recorded, plain)  # recording changes nothing
  _network(setup, algorithm, tmp_path / "net.sljt")
  sim, net = _records(tmp_path / "sim.sljt"), _records(tmp_path / "net.sljt")
  assert [row[:6] for row in sim] == [row[:6] for row in net]
  for a, b in zip(sim, net):
    chex.assert_trees_all_close(a[6], b[6], atol=1e-5, rtol=0)  # noise included: the same keys
  kinds = {row[4] for row in sim}
  assert {"SmashedData", "ClientHalf"} <= kinds
  assert ("CutGradient" in kinds) == (algorithm != "local_loss_sl")
  assert ({"BodyOutput", "TailGradient"} <= kinds) == algorithm.endswith("_u")
  assert ("ModelWeights" in kinds) == algorithm.startswith("splitfed")
  smashed = [row[6]["activations"] for row in sim if row[4] == "SmashedData"]
  assert any((s < 0).any() for s in smashed)  # the noise codec ran (the client half ends in a ReLU)


@pytest.mark.parametrize("algorithm", NO_MESSAGES)
def test_recording_an_algorithm_without_split_messages_is_refused(setup, algorithm, tmp_path):
  opt = optax.adam(1e-3)
  central = sljax.centralized(setup.model, optimizer=opt)
  config = sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=8)
  algo = sljax.algorithms.REGISTRY[algorithm].factory(central, config)
  data = sljax.data.stack_clients(setup.dataset.x_train[:32], setup.dataset.y_train[:32],
                                  [np.arange(16), np.arange(16, 32)])
  with pytest.raises(ValueError, match=rf"^transcript: {algorithm} {NO_MESSAGES[algorithm]}"):
    sljax.simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=1, transcript=tmp_path / "t.sljt")
  assert not (tmp_path / "t.sljt").exists()
