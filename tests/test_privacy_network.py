"""Defenses run identically over the network: a run of parallel SL with Gaussian noise on the uplink, recorded by
the server (`recorder=`), gives the same transcript over gRPC as in process, holds the noisy smashed data the clients
sent, and ends where the simulation ends."""

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
CLIP, NOISE = 1.0, 0.5


@pytest.fixture(scope="module")
def setup():
  plain = demo.digits_setup(model="mlp", hidden=(16,), lr=1e-3)
  opt = optax.adam(1e-3)
  sl = sljax.vanilla(plain.model, client_optimizer=opt, server_optimizer=opt,
                     uplink=defenses.gaussian_noise(clip_norm=CLIP, noise_multiplier=NOISE))
  return plain._replace(sl=sl)


def _run(setup, path, *, grpc):
  rec = transcript.Recorder(path, meta={"algorithm": "parallel_sl", "defense": "gaussian_noise"})
  server = T.ConcurrentServer(setup.model, setup.sl, algorithm="parallel_sl", schedule=SCHEDULE,
                              input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                              tokens={t: k for k, t in TOKENS.items()}, recorder=rec, lease_seconds=60.0)
  running = T.serve(server.handle, address="127.0.0.1:0") if grpc else None
  links = {k: (T.GrpcTransport(f"127.0.0.1:{running.port}", token=t) if grpc else
               T.InProcessTransport(server.handle, token=t)) for k, t in TOKENS.items()}

  def work(k):
    x, y = client_data(setup, k, SCHEDULE.num_clients)
    return T.run(T.connect(links[k], setup.model, setup.sl, client=k, x=x, y=y))

  try:
    results = run_in_threads(work, links, timeout=180)
  finally:
    if grpc:
      for link in links.values():
        link.close()
      running.stop()
    server.close()
  return transcript.load(path), results


def _records(t):
  return sorted((r.round, r.step, r.client, r.direction, r.payload) for r in t.records if r.direction in ("up", "down"))


def test_a_defended_run_records_the_same_over_grpc_as_in_process_and_ends_as_the_simulation(setup, tmp_path):
  in_process, _ = _run(setup, tmp_path / "in_process.sljt", grpc=False)
  over_grpc, results = _run(setup, tmp_path / "grpc.sljt", grpc=True)
  assert _records(over_grpc) == _records(in_process)  # byte for byte, the noise included
  steps = over_grpc.exchanges()
  assert len(steps) == SCHEDULE.rounds * SCHEDULE.local_steps * SCHEDULE.num_clients
  smashed = np.concatenate([np.asarray(e.smashed).reshape(len(e.smashed), -1) for e in steps])
  # the client half ends in a ReLU: what left the clients went through the noise codec (clipped to norm 1, then
  # N(0, 0.5^2) per coordinate: negative entries, and row norms near sqrt(1 + 16 * 0.25) = 2.2)
  assert (smashed < 0).mean() > 0.3
  assert 1.5 < np.median(np.linalg.norm(smashed, axis=1)) < 3.0
  # and the run is the simulation's run, defense and all (not bitwise: XLA fuses the round differently)
  algo = sched.algorithm("parallel_sl", setup.sl, SCHEDULE, sljax.ArraySpec.of(setup.dataset.x_train))
  parts = sljax.data.iid(setup.dataset.y_train, num_clients=SCHEDULE.num_clients, seed=0)
  data = sljax.data.stack_clients(setup.dataset.x_train, setup.dataset.y_train, parts)
  state, _ = sljax.simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=SCHEDULE.rounds)
  for k, result in results.items():
    chex.assert_trees_all_close(result.half.params, jax.tree.map(lambda a, k=k: a[k], state.clients.params),
                                atol=1e-5, rtol=0)
