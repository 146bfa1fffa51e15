"""Population-scale simulation: a round over the participants gathered from host stores equals the
masked round over the whole population, for every algorithm; stores round-trip; prefetch and
resume change nothing; bad inputs get clear errors."""

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

import sljax
from sljax import codecs, population as P, simulation
from sljax.algorithms import ScheduleConfig

N, M, FEATURES, CLASSES = 10, 3, 6, 3


def _population_data(n=N, seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(int(k), FEATURES)).astype(np.float32) for k in rng.integers(1, 9, size=n)]
  ys = [np.argmax(x[:, :CLASSES], 1).astype(np.int32) for x in xs]
  return xs, ys


XS, YS = _population_data()
STORE = P.ClientStore.from_clients(XS, YS)
FULL = sljax.data.stack_clients(XS, YS)


def _vanilla(optimizer=optax.adam(0.05), **kw):
  return sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=CLASSES), 1), client_optimizer=optimizer,
                       server_optimizer=optimizer, **kw)


def _u_shaped():
  return sljax.u_shaped(sljax.cut(sljax.models.mlp(hidden=(8, 8), num_classes=CLASSES), 1, 2),
                        client_optimizer=optax.adam(0.05), server_optimizer=optax.adam(0.05))


TOP_K = dict(uplink=codecs.top_k(fraction=0.5), downlink=codecs.top_k(fraction=0.5))
MAKERS = {
    "parallel_sl": lambda cfg: sljax.algorithms.parallel_sl(_vanilla(**TOP_K), cfg),
    "parallel_sl_u": lambda cfg: sljax.algorithms.u_shaped_parallel_sl(_u_shaped(), cfg),
    "local_loss_sl": lambda cfg: sljax.algorithms.local_loss_sl(_vanilla(uplink=TOP_K["uplink"]), cfg,
                                                                aux_head=sljax.algorithms.linear_head(CLASSES)),
    "splitfed_v1": lambda cfg: sljax.algorithms.splitfed(_vanilla(**TOP_K), cfg, version=1),
    "splitfed_v2": lambda cfg: sljax.algorithms.splitfed(_vanilla(**TOP_K), cfg, version=2),
    "sequential_sl": lambda cfg: sljax.algorithms.sequential_sl(_vanilla(**TOP_K), cfg),
    "sequential_sl_u": lambda cfg: sljax.algorithms.sequential_sl_u(_u_shaped(), cfg),
    "fedavg": lambda cfg: sljax.algorithms.fedavg(
        sljax.centralized(sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=CLASSES), 1), optimizer=optax.adam(0.05)),
        cfg),
}
CONFIG = ScheduleConfig(num_clients=M, batch_size=4, local_steps=2, drop_rate=0.3)


def _per_client(population, state):
  """{leaf index: (N, ...) array} of every client's per-client leaves, from the host store."""
  split = population._split_of(state.sim)
  out, stored = {}, iter(range(len(state.store)))
  for i, keep in enumerate(split.per_client):
    if keep:
      j = next(stored)
      out[i] = np.where(state.seen.reshape(-1, *(1,) * state.initial[j].ndim), state.store[j], state.initial[j][None])
  return out


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_round_on_the_gathered_participants_equals_the_masked_round_on_the_population(name):
  make = MAKERS[name]
  population = P.Population(make(CONFIG), STORE)
  masked = make(population.reference_config())
  assert masked.config.participation == M / N
  state = population.init(jax.random.key(1))
  reference = masked.init(jax.random.key(1), FULL)
  round_ = jax.jit(masked.round)
  drops = 0
  for _ in range(2):
    state, metrics = population.round(state)
    reference, expected = round_(reference, FULL)
    ids = metrics["participants"]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(expected["participating"])), ids)
    np.testing.assert_array_equal(np.asarray(expected["completed_steps"])[ids], metrics["completed_steps"])
    np.testing.assert_array_equal(expected["bytes_up_per_client"][ids], metrics["bytes_up_per_client"])
    assert int(expected["bytes_down"]) == int(metrics["bytes_down"])
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=1e-5)
    drops += int((np.asarray(metrics["completed_steps"]) < CONFIG.local_steps).sum())
  population.close()
  assert drops > 0  # the drops were exercised
  # every client's state: per-client leaves from the store, the rest from the state on M clients
  reference_leaves = jax.tree.leaves(reference)
  stored = _per_client(population, state)
  for i, (leaf, ref) in enumerate(zip(jax.tree.leaves(state.sim), reference_leaves)):
    if i in stored:
      np.testing.assert_allclose(stored[i], np.asarray(ref), rtol=1e-5, atol=1e-6, err_msg=f"leaf {i}")
    elif np.ndim(ref) and np.shape(ref)[0] == N and np.ndim(leaf) and np.shape(leaf)[0] == M:
      np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref)[:M], rtol=1e-5, atol=1e-6, err_msg=f"leaf {i}")
    else:
      np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-5, atol=1e-6, err_msg=f"leaf {i}")


def test_averaging_algorithms_with_a_stateless_optimizer_keep_nothing_per_client():
  population = P.Population(sljax.algorithms.splitfed(_vanilla(optax.sgd(0.1)), CONFIG, version=2), STORE)
  assert population.init(jax.random.key(0)).store == ()
  population.close()


def test_the_store_round_trips_through_disk_and_gathers_what_stack_clients_stacks(tmp_path):
  STORE.save(tmp_path / "store")
  opened = P.ClientStore.open(tmp_path / "store")
  assert isinstance(opened.x, np.memmap)
  ids = np.array([1, 4, 9])
  data = opened.gather(ids, rows=FULL.x.shape[1])
  np.testing.assert_array_equal(data.x, np.asarray(FULL.x)[ids])
  np.testing.assert_array_equal(data.y, np.asarray(FULL.y)[ids])
  np.testing.assert_array_equal(data.count, np.asarray(FULL.count)[ids])
  np.testing.assert_array_equal(data.ids, ids)
  parts = [np.arange(3), np.arange(3, 7)]
  x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
  by_parts = P.ClientStore.from_partition(x, np.arange(7) % 3, parts)
  assert by_parts.counts.tolist() == [3, 4]


def test_prefetching_changes_nothing_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
  make = MAKERS["parallel_sl"]
  runs = {}
  for prefetch in (True, False):
    population = P.Population(make(CONFIG), STORE, prefetch=prefetch)
    runs[prefetch] = simulation.run(population, population.init(jax.random.key(2)), None, rounds=4)
    population.close()
  for a, b in zip(jax.tree.leaves(runs[True][0]), jax.tree.leaves(runs[False][0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert runs[True][1] == runs[False][1]

  population = P.Population(make(CONFIG), STORE)
  simulation.run(population, population.init(jax.random.key(2)), None, rounds=2, checkpoint_dir=tmp_path / "ck",
                 checkpoint_every=2)
  population.close()
  population = P.Population(make(CONFIG), STORE)  # a new process would start here
  resumed, records = simulation.run(population, population.init(jax.random.key(2)), None, rounds=4,
                                    checkpoint_dir=tmp_path / "ck")
  population.close()
  assert [r["round"] for r in records] == [3, 4]
  uncounted = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_cumulative")} for r in rs]  # noqa: E731
  assert uncounted(records) == uncounted(runs[True][1][2:])  # (no metrics file to continue the byte totals from)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(runs[True][0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_participants_are_a_pure_uniform_draw_of_distinct_clients():
  from sljax.algorithms._common import participants

  key = jax.random.key(0)
  draw = jax.jit(jax.vmap(lambda r: participants(jax.random.fold_in(key, r), 20, 5)))  # one program, 400 draws
  draws = np.asarray(draw(jnp.arange(400)))
  assert all(len(set(d)) == 5 and list(d) == sorted(d) for d in draws)
  np.testing.assert_array_equal(participants(key, 20, 5), participants(key, 20, 5))
  frequency = np.bincount(draws.ravel(), minlength=20) / len(draws)
  assert np.all(np.abs(frequency - 5 / 20) < 0.08)  # each client in a quarter of the rounds


def test_bad_populations_get_clear_errors():
  with pytest.raises(ValueError, match=r"store: expected a population of at least config.num_clients=3 clients"):
    P.Population(MAKERS["parallel_sl"](CONFIG), P.ClientStore.from_clients(XS[:2], YS[:2]))
  with pytest.raises(ValueError,
                     match=r"every client to hold at least one sample, got 1 empty client\(s\), e.g. client 1"):
    P.ClientStore(np.zeros((2, 3), np.float32), np.zeros(2, np.int32), np.array([0, 2, 2]))
  with pytest.raises(ValueError, match=r"expected one built for the round's participants"):
    P.Population(MAKERS["parallel_sl"](ScheduleConfig(num_clients=3, batch_size=4, participation=0.5)), STORE)
  with pytest.raises(ValueError, match=r"heterogeneous_parallel_sl cannot run over a population"):
    P.Population(sljax.algorithms.heterogeneous_parallel_sl(_vanilla(), CONFIG, cuts=(1, 1, 1)), STORE)
  state = P.Population(MAKERS["parallel_sl"](CONFIG), STORE).init(jax.random.key(0))
  wrong = P.Population(MAKERS["parallel_sl"](CONFIG), P.ClientStore.from_clients([x[:, :4] for x in XS], YS))
  with pytest.raises(ValueError,
                     match=r"store: expected features of the model's input \(B, 6\) float32, got \(B, 4\) float32"):
    wrong.round(state)
  wrong.close()


def test_a_population_sharded_over_devices_equals_one_on_a_single_device():
  config = ScheduleConfig(num_clients=4, batch_size=4, local_steps=2, drop_rate=0.3)
  mesh = sljax.execution.client_mesh(jax.devices()[:4])
  finals = []
  for placement in (None, mesh):
    population = P.Population(MAKERS["parallel_sl"](config), STORE, mesh=placement, prefetch=False)
    state = population.init(jax.random.key(3))
    for _ in range(2):
      state, metrics = population.round(state)
    population.close()
    if placement is not None:  # the participants' halves are spread over the 4 devices
      assert len(jax.tree.leaves(state.sim.clients)[0].sharding.device_set) == 4
    finals.append((state, float(metrics["loss"])))
  np.testing.assert_allclose(finals[0][1], finals[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(finals[0][0]), jax.tree.leaves(finals[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"mesh: expected a mesh whose 4 devices divide the 3 participants"):
    P.Population(MAKERS["parallel_sl"](CONFIG), STORE, mesh=mesh)
