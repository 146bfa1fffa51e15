"""The simulated network clock: hand-computed rounds, stragglers, FLOPs from XLA, exact bytes."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import algorithms as A
from sljax import data as D
from sljax import network as N

# Round numbers, so every leg is a few seconds and each expected value below can be checked by hand.
COSTS = N.StepCosts(
    batch_size=4,
    client_forward_flops=100.0,
    client_backward_flops=200.0,
    server_step_flops=1000.0,
    server_update_flops=0.0,
    local_loss_step_flops=400.0,
    model_step_flops=600.0,
    smashed_bytes=1000,
    cut_gradient_bytes=500,
    client_weights_bytes=2000,
    model_weights_bytes=4000,
)
# Client A: forward 1 s, backward 2 s, smashed data up 1 s + 0.1 s latency, cut gradient down 0.5 + 0.1,
#   client half up or down 2 + 0.1, whole model up or down 4 + 0.1, local-loss step 4 s, FedAvg step 6 s.
# Client B: forward 2 s, backward 4 s, up 2 + 0.1, down 0.5 + 0.1, client half up 4 + 0.1 and down 2 + 0.1,
#   whole model up 8 + 0.1 and down 4 + 0.1, local-loss step 8 s, FedAvg step 12 s.
# Server: 1 s per client batch; its links are never the bottleneck and add no latency.
CLIENT_A = N.DeviceProfile(flops_per_s=100.0, uplink_bps=8000.0, downlink_bps=8000.0, latency_s=0.1)
CLIENT_B = N.DeviceProfile(flops_per_s=50.0, uplink_bps=4000.0, downlink_bps=8000.0, latency_s=0.1)
SERVER = N.DeviceProfile(flops_per_s=1000.0, uplink_bps=1e12, downlink_bps=1e12, latency_s=0.0)

# algorithm: (wall, compute (A, B), transmission (A, B), idle (A, B), server busy), one local step.
HAND_COMPUTED = {
    # A's turn: 2.1 + 1 + 1.1 + 1 + 0.6 + 2 + 2.1 = 9.9; B's: 2.1 + 2 + 2.1 + 1 + 0.6 + 4 + 4.1 = 15.9.
    "sequential_sl": (25.8, (3, 6), (5.5, 8.5), (17.3, 11.3), 2.0),
    # Arrivals 2.1 and 4.1; one server step on both batches 4.1 -> 6.1; A done 8.7, B done 10.7.
    "parallel_sl": (10.7, (3, 6), (1.5, 2.5), (6.2, 2.2), 2.0),
    # These costs have no tail, body output nor tail gradient: parallel SL with an empty round trip (0.2 s of
    # latency) between the body's forward (free) and its backward, 4.3 -> 6.3; A done 8.9, B done 10.9.
    "parallel_sl_u": (10.9, (3, 6), (1.5, 2.5), (6.4, 2.4), 2.0),
    # A served 2.1 -> 3.1, done 5.7, weights up by 7.8; B served 4.1 -> 5.1, done 9.7, weights up by 13.8;
    # average down by 15.9.
    "splitfed_v1": (15.9, (3, 6), (5.5, 8.5), (7.4, 1.4), 2.0),
    # Order 0, 1: the same as v1 here (A arrives first anyway).
    "splitfed_v2": (15.9, (3, 6), (5.5, 8.5), (7.4, 1.4), 2.0),
    # A sends after 4 s (arrives 5.1), B after 8 s (arrives 10.1); server 10.1 -> 12.1. Clients end at 5 and 10.
    "local_loss_sl": (12.1, (4, 8), (1, 2), (7.1, 2.1), 2.0),
    # Models arrive at 6 + 4.1 = 10.1 and 12 + 8.1 = 20.1; the average reaches both at 24.2.
    "fedavg": (24.2, (6, 12), (8, 12), (10.2, 0.2), 0.0),
}


@pytest.mark.parametrize("algorithm", N.ALGORITHMS)
def test_hand_computed_round(algorithm):
  wall, compute, comm, idle, server_busy = HAND_COMPUTED[algorithm]
  t = N.round_time(algorithm, COSTS, clients=[CLIENT_A, CLIENT_B], server=SERVER)
  assert t.algorithm == algorithm
  np.testing.assert_allclose(t.wall_s, wall, rtol=1e-12)
  np.testing.assert_allclose(t.client_compute_s, compute, rtol=1e-12)
  np.testing.assert_allclose(t.client_comm_s, comm, rtol=1e-12)
  np.testing.assert_allclose(t.client_idle_s, idle, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(t.server_busy_s, server_busy, rtol=1e-12)
  np.testing.assert_allclose(t.server_idle_s, wall - server_busy, rtol=1e-12)
  assert t.examples == 2 * COSTS.batch_size


def test_hand_computed_two_steps_parallel():
  # Step 1 as above: A done 8.7, B done 10.7. Step 2: arrivals 8.7 + 2.1 = 10.8 and 10.7 + 4.1 = 14.8;
  # server 14.8 -> 16.8; A done 19.4, B done 21.4.
  t = N.round_time("parallel_sl", COSTS, clients=[CLIENT_A, CLIENT_B], server=SERVER, local_steps=2)
  np.testing.assert_allclose(t.wall_s, 21.4, rtol=1e-12)
  np.testing.assert_allclose(t.client_idle_s, (21.4 - 6 - 3, 21.4 - 12 - 5), rtol=1e-9)
  np.testing.assert_allclose(t.server_busy_s, 4.0, rtol=1e-12)


def test_splitfed_v2_serves_in_the_drawn_order():
  slow_server = dataclasses.replace(SERVER, flops_per_s=100.0)  # 10 s per client batch
  clients = [CLIENT_A, CLIENT_B]
  # Order 0, 1: A 2.1 -> 12.1, done 14.7, weights up by 16.8; B 12.1 -> 22.1, done 26.7, weights up by 30.8.
  in_order = N.round_time("splitfed_v2", COSTS, clients=clients, server=slow_server, order=[0, 1])
  np.testing.assert_allclose(in_order.wall_s, 30.8 + 2.1, rtol=1e-12)
  # Order 1, 0: the server waits for B: 4.1 -> 14.1, done 18.7, weights up by 22.8; A 14.1 -> 24.1,
  # done 26.7, weights up by 28.8.
  reversed_order = N.round_time("splitfed_v2", COSTS, clients=clients, server=slow_server, order=[1, 0])
  np.testing.assert_allclose(reversed_order.wall_s, 28.8 + 2.1, rtol=1e-12)
  # v1 serves first come, first served: A first, as v2 in order 0, 1.
  v1 = N.round_time("splitfed_v1", COSTS, clients=clients, server=slow_server)
  np.testing.assert_allclose(v1.wall_s, in_order.wall_s, rtol=1e-12)


@pytest.mark.parametrize("algorithm", N.ALGORITHMS)
def test_every_second_is_accounted_for(algorithm):
  rng = np.random.default_rng(0)
  k = 5
  clients = N.DeviceProfile(flops_per_s=10 ** rng.uniform(1, 3, k), uplink_bps=10 ** rng.uniform(3, 5, k),
                            downlink_bps=10 ** rng.uniform(3, 5, k), latency_s=rng.uniform(0, 0.5, k),
                            delay_s=rng.uniform(0, 1, k))
  participating = np.array([True, False, True, True, True])
  t = N.round_time(algorithm, COSTS, clients=clients, server=SERVER, local_steps=3, participating=participating,
                   order=[3, 1, 4, 0, 2])
  p = participating
  np.testing.assert_allclose((t.client_compute_s + t.client_comm_s + t.client_idle_s)[p], t.wall_s, rtol=1e-12)
  assert (t.client_idle_s >= 0).all() and t.server_idle_s >= 0
  assert t.client_compute_s[1] == t.client_comm_s[1] == t.client_idle_s[1] == 0
  assert t.bytes_up_per_client[1] == t.bytes_down_per_client[1] == 0
  assert t.examples == 4 * 3 * COSTS.batch_size


@pytest.mark.parametrize("local_steps", [1, 3])
def test_a_straggler_delays_the_barrier_by_its_delay(local_steps):
  k, delay = 4, 0.75
  even = [CLIENT_A] * k
  straggling = [CLIENT_A, CLIENT_A, CLIENT_A.straggling(delay_s=delay), CLIENT_A]
  kw = {"server": SERVER, "local_steps": local_steps}

  def walls(algorithm):
    return (N.round_time(algorithm, COSTS, clients=even, **kw),
            N.round_time(algorithm, COSTS, clients=straggling, **kw))

  # Parallel SL: the per-step barrier waits for the straggler, so every step is `delay` longer...
  before, after = walls("parallel_sl")
  np.testing.assert_allclose(after.wall_s - before.wall_s, local_steps * delay, rtol=1e-9)
  # ...and everyone else waits for it: their idle time grows by the same amount; the straggler's does not.
  np.testing.assert_allclose(after.client_idle_s - before.client_idle_s, [local_steps * delay, local_steps * delay,
                                                                          0, local_steps * delay], atol=1e-9)
  # Sequential SL: the straggler's turn is longer, and so is the round.
  before, after = walls("sequential_sl")
  np.testing.assert_allclose(after.wall_s - before.wall_s, local_steps * delay, rtol=1e-9)
  # A slowdown of the compute works the same way: FedAvg waits for the slowest local training.
  slow = [CLIENT_A, CLIENT_A.straggling(slowdown=3.0), CLIENT_A, CLIENT_A]
  before = N.round_time("fedavg", COSTS, clients=even, **kw)
  after = N.round_time("fedavg", COSTS, clients=slow, **kw)
  np.testing.assert_allclose(after.wall_s - before.wall_s, local_steps * 2 * COSTS.model_step_flops / 100.0, rtol=1e-9)


def test_non_participants_do_not_hold_up_the_round():
  hopeless = N.DeviceProfile(flops_per_s=1e-3, uplink_bps=1e-3, downlink_bps=1e-3, latency_s=1e6)
  for algorithm in N.ALGORITHMS:
    alone = N.round_time(algorithm, COSTS, clients=[CLIENT_A], server=SERVER)
    with_absent = N.round_time(algorithm, COSTS, clients=[CLIENT_A, hopeless], server=SERVER,
                               participating=np.array([True, False]))
    np.testing.assert_allclose(with_absent.wall_s, alone.wall_s, rtol=1e-12, err_msg=algorithm)


def test_a_stacked_fleet_equals_a_list():
  fleet = N.stack([CLIENT_A, CLIENT_B, CLIENT_A])
  assert fleet.flops_per_s.shape == (3,)
  partly_stacked = N.DeviceProfile(flops_per_s=np.array([100.0, 50.0, 100.0]), uplink_bps=8000.0,
                                   downlink_bps=8000.0, latency_s=0.1)
  for algorithm in N.ALGORITHMS:
    a = N.round_time(algorithm, COSTS, clients=[CLIENT_A, CLIENT_B, CLIENT_A], server=SERVER, local_steps=2)
    b = N.round_time(algorithm, COSTS, clients=fleet, server=SERVER, local_steps=2)
    assert a.wall_s == b.wall_s and (a.client_idle_s == b.client_idle_s).all()
    N.round_time(algorithm, COSTS, clients=partly_stacked, server=SERVER)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"uplink_bps": -1.0}, r"uplink_bps: expected a positive number of bits per second, got -1.0"),
        ({"downlink_bps": 0.0}, r"downlink_bps: expected a positive"),
        ({"flops_per_s": 0.0}, r"flops_per_s: expected a positive number of FLOP/s, got 0.0"),
        ({"latency_s": float("nan")}, r"latency_s: expected a non-negative finite"),
        ({"latency_s": float("inf")}, r"latency_s: expected a non-negative finite"),
        ({"delay_s": -0.5}, r"delay_s: expected a non-negative"),
        ({"flops_per_s": "fast"}, r"flops_per_s: expected a number of FLOP/s, got 'fast'"),
        ({"uplink_bps": np.array([1e6, 1e6, -3.0])}, r"uplink_bps: .* got -3.0 \(client 2\)"),
    ],
)
def test_bad_profiles_name_the_field(fields, message):
  good = {"flops_per_s": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6, "latency_s": 0.01}
  with pytest.raises(ValueError, match=message):
    N.DeviceProfile(**{**good, **fields})


def test_bad_round_arguments_name_the_argument():
  clients = [CLIENT_A, CLIENT_B]
  with pytest.raises(ValueError, match="slowdown: expected a factor >= 1, got 0.5"):
    CLIENT_A.straggling(slowdown=0.5)
  with pytest.raises(ValueError, match="algorithm: expected an Algorithm or one of .*'parallel_sl'.*got 'paralel'"):
    N.round_time("paralel", COSTS, clients=clients, server=SERVER)
  with pytest.raises(ValueError, match="local_steps: expected a positive integer, got 0"):
    N.round_time("fedavg", COSTS, clients=clients, server=SERVER, local_steps=0)
  with pytest.raises(ValueError, match=r"participating: expected \(2,\) booleans, got \(3,\) bool"):
    N.round_time("fedavg", COSTS, clients=clients, server=SERVER, participating=np.ones(3, bool))
  with pytest.raises(ValueError, match="participating: expected at least one"):
    N.round_time("fedavg", COSTS, clients=clients, server=SERVER, participating=np.zeros(2, bool))
  with pytest.raises(ValueError, match=r"order: expected a permutation of the 2 clients, got \[0, 0\]"):
    N.round_time("splitfed_v2", COSTS, clients=clients, server=SERVER, order=[0, 0])
  with pytest.raises(ValueError, match=r"clients: .*write \[profile\] \* K"):
    N.round_time("fedavg", COSTS, clients=CLIENT_A, server=SERVER)
  with pytest.raises(TypeError, match=r"clients\[1\]: expected a DeviceProfile, got str"):
    N.round_time("fedavg", COSTS, clients=[CLIENT_A, "phone"], server=SERVER)
  with pytest.raises(ValueError, match="server: expected one DeviceProfile with scalar fields"):
    N.round_time("fedavg", COSTS, clients=clients, server=N.stack(clients))


# --- FLOPs and bytes of the real step functions -------------------------------------------------------

FEATURES = 12


def _model():
  return sljax.cut(sljax.models.mlp(hidden=(16, 16)), 1)


@pytest.fixture(scope="module")
def costs_8_16():
  # SGD: half the compile time of Adam, and its update still costs flops that do not grow with the batch.
  x, opt = jnp.zeros((1, FEATURES)), optax.sgd(0.1)
  return (N.step_costs(_model(), example_x=x, batch_size=8, optimizer=opt),
          N.step_costs(_model(), example_x=x, batch_size=16, optimizer=opt))


def test_flops_scale_with_the_batch(costs_8_16):
  c8, c16 = costs_8_16
  for field in ("client_forward_flops", "client_backward_flops", "server_step_flops", "local_loss_step_flops",
                "model_step_flops"):
    assert getattr(c8, field) > 0, field
    ratio = getattr(c16, field) / getattr(c8, field)
    # At most twice: the optimizer update does not grow with the batch (on this tiny model it is a
    # good part of the backward pass).
    assert 1.3 < ratio <= 2.0, (field, ratio)
  # The forward pass is all per-example work: exactly twice the flops.
  assert c16.client_forward_flops == 2 * c8.client_forward_flops
  # The server's update does not depend on the batch, so one step on two batches costs what one
  # step on a batch twice as large does.
  assert 0 < c8.server_update_flops == c16.server_update_flops
  np.testing.assert_allclose(c8.server_flops(2), c16.server_step_flops, rtol=1e-6)
  # Local-loss SL's client step also runs the auxiliary head (16 -> 10 dense), forward and backward.
  assert c8.local_loss_step_flops - c8.client_forward_flops - c8.client_backward_flops > 2 * 8 * 16 * 10
  # The whole model's step does the work of the three legs (up to a few scalar ops).
  np.testing.assert_allclose(c8.model_step_flops,
                             c8.client_forward_flops + c8.client_backward_flops + c8.server_step_flops, rtol=0.02)


def test_step_costs_rejects_bad_arguments():
  with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
    N.step_costs(_model(), example_x=jnp.zeros((1, FEATURES)), batch_size=0)
  with pytest.raises(ValueError, match="example_x: expected an array with a leading batch axis"):
    N.step_costs(_model(), example_x=3.0, batch_size=8)


def test_bytes_equal_the_algorithms_metrics(costs_8_16):
  """The clock's bytes per client per round are the bytes the algorithms report, exactly, codecs included.

  SplitFed has every kind of message of the split algorithms (smashed data, cut gradients, client
  halves); the other split algorithms send subsets of these, and FedAvg sends `ModelWeights` of
  the whole model, sized by the same `wire_size`. The uplink is cast to bfloat16, the downlink is not.
  """
  plain, _ = costs_8_16
  uplink = sljax.codecs.cast(dtype=jnp.bfloat16)
  opt = optax.sgd(0.1)
  costs = N.step_costs(_model(), example_x=jnp.zeros((1, FEATURES)), batch_size=8, optimizer=opt, uplink=uplink)
  # 8 x 16 activations of 4 bytes become 2 bytes each; the labels and the cut gradient do not change.
  assert 8 * 16 * 2 - 32 < plain.smashed_bytes - costs.smashed_bytes <= 8 * 16 * 2
  assert costs.cut_gradient_bytes == plain.cut_gradient_bytes
  k, steps = 2, 2
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, FEATURES)).astype(np.float32)
  y = (np.arange(48) % 10).astype(np.int32)
  data = D.stack_clients(x, y, D.iid(y, num_clients=k, seed=0))
  algo = A.splitfed(sljax.vanilla(_model(), client_optimizer=opt, server_optimizer=opt, uplink=uplink),
                    A.ScheduleConfig(num_clients=k, batch_size=costs.batch_size, local_steps=steps), version=1)
  participating = np.array([True, False])
  inputs = A.RoundInputs(participating, np.zeros((steps, k), bool))
  _, metrics = jax.jit(algo.round)(algo.init(jax.random.key(0), data), data, inputs)
  timing = N.round_time(algo.name, costs, clients=[N.PHONE_LTE] * k, server=N.GPU_SERVER, local_steps=steps,
                        participating=participating)
  np.testing.assert_array_equal(timing.bytes_up_per_client, metrics["bytes_up_per_client"])
  np.testing.assert_array_equal(timing.bytes_down_per_client, metrics["bytes_down_per_client"])
  assert timing.bytes_up_per_client[0] == steps * costs.smashed_bytes + costs.client_weights_bytes > 0
  # the algorithm itself carries its timeline: the same round as by name
  by_object = N.round_time(algo, costs, clients=[N.PHONE_LTE] * k, server=N.GPU_SERVER, local_steps=steps,
                           participating=participating)
  assert by_object.summary() == timing.summary()


def test_the_clock_reads_the_algorithms_registry():
  """Every algorithm with a timeline in the registry is on the clock, and only those."""
  assert set(N.ALGORITHMS) == {name for name, entry in A.REGISTRY.items() if entry.timeline is not None}
  with pytest.raises(ValueError, match="centralized has no timeline"):
    algo = A.centralized_baseline(sljax.centralized(_model(), optimizer=optax.sgd(0.1)),
                                  A.ScheduleConfig(num_clients=2, batch_size=8))
    N.round_time(algo, COSTS, clients=[CLIENT_A, CLIENT_B], server=SERVER)


def test_compare_gives_one_row_per_algorithm(costs_8_16):
  costs, _ = costs_8_16
  rows = N.compare(costs, clients=[N.PHONE_LTE] * 3, server=N.GPU_SERVER, local_steps=2)
  assert [r["algorithm"] for r in rows] == list(N.ALGORITHMS)
  for r in rows:
    assert r["wall_s"] > 0 and 0 <= r["server_idle_fraction"] <= 1 and 0 <= r["mean_client_idle_fraction"] <= 1
  # On LTE the network, not the GPU, sets the pace: the server idles almost all the time.
  assert all(r["server_idle_fraction"] > 0.99 for r in rows)


def test_docstring_examples_run():
  results = doctest.testmod(N)
  assert results.attempted > 0 and results.failed == 0
