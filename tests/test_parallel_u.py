"""Parallel split learning with U-shaped legs (`u_shaped_parallel_sl`): against `u_shaped(...).step`,
a hand-written loop over clients, drops, the bytes that reach the server, recompilation, the clock."""

import doctest
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import algorithms as A
from sljax import codecs
from sljax import data as D
from sljax import messages as msgs
from sljax import network as N
from sljax import protocol
from sljax.algorithms import parallel_u

B = 8
OPT = optax.adam(1e-2)


def _data(num_clients, *, n=96, features=12, seed=0, uneven=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  y = np.argmax(x[:, :10], axis=1).astype(np.int32)  # learnable labels
  parts = (D.quantity_skew(y, num_clients=num_clients, alpha=0.5, seed=seed) if uneven
           else D.iid(y, num_clients=num_clients, seed=seed))
  return D.stack_clients(x, y, parts)


def _sl(*, dropout=0.0, **kw):
  """head 12 -> 16, body 16 -> 16, tail 16 -> 10; dropout in the head and the body."""
  model = sljax.cut(sljax.models.mlp(hidden=(16, 16), dropout=dropout), 1, 2)
  return sljax.u_shaped(model, client_optimizer=OPT, server_optimizer=OPT, **kw)


def _algo(sl, num_clients, **kw):
  return A.u_shaped_parallel_sl(sl, A.ScheduleConfig(num_clients=num_clients, batch_size=B, **kw))


def _client(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def _batches(state, data, data_step):
  x, y, _ = D.client_batches(data, data_step, batch_size=B, key=jax.random.wrap_key_data(state.key))
  return x, y


@pytest.mark.parametrize("with_codecs", [False, True], ids=["plain", "codecs"])
def test_one_client_equals_u_shaped_steps(with_codecs):
  """K=1: every step is `sl.step` with the schedule's key, dropout and codec randomness included."""
  kw = {"uplink": codecs.top_k(fraction=0.5, error_feedback=True), "downlink": codecs.quantize(bits=8)} \
      if with_codecs else {}
  sl, steps = _sl(dropout=0.2, **kw), 2
  algo, data = _algo(sl, 1, local_steps=steps), _data(1)
  state = algo.init(jax.random.key(0), data)
  ref = protocol.SplitState(_client(state.clients, 0), state.server.replace(
      codec_state=_client(state.server.codec_state, 0)), state.round)
  round_fn, step = jax.jit(algo.round), jax.jit(sl.step)
  for r in range(3):
    for s in range(steps):
      x, y = _batches(state, data, r * steps + s)
      ref, _ = step(ref, (x[0], y[0]), algo.schedule.client_keys(state.key, r, s)[0])
    state, _ = round_fn(state, data)
  server = state.server.replace(codec_state=_client(state.server.codec_state, 0))
  chex.assert_trees_all_close((_client(state.clients, 0), server), (ref.client, ref.server), atol=1e-6, rtol=1e-6)

  def loss_on_all(state):  # predict: head, body and tail in eval mode, on all of the client's data
    return float(optax.softmax_cross_entropy_with_integer_labels(algo.predict(state, data.x[0]), data.y[0]).mean())

  assert loss_on_all(state) < loss_on_all(algo.init(jax.random.key(0), data))


def _hand_written_step(sl, clients, server, x, y, keys, body_key, active):
  """The same math by hand, client by client: heads; the body once on every client's rows; tails
  and their losses; one update of the body from the mean loss of the active clients; each client's
  cut gradient as the gradient of its own loss; heads and tails updated where active."""
  k = len(clients)
  heads, ups = [], []
  for i in range(k):
    up, head = sl.client_forward(clients[i], x[i], jax.random.split(keys[i], 3)[0])
    ups.append(up)
    heads.append(head)
  h = jnp.concatenate([up.activations for up in ups])

  def body(params, h):
    return sl.model.server.apply(params, server.model_state, h, key=body_key, train=True)

  out, pullback, model_state = jax.vjp(body, server.params, h, has_aux=True)
  tails, g_out = [], []
  for i in range(k):
    tail_grad, tail, _ = sl.client_tail_step(clients[i], heads[i], msgs.BodyOutput(out[i * B:(i + 1) * B]), y[i],
                                             jax.random.split(keys[i], 3)[2])
    tails.append(tail)
    g_out.append(tail_grad.grad)
  rows = jnp.repeat(active.astype(jnp.float32), B)[:, None]
  g_params, _ = pullback(jnp.concatenate(g_out) * rows / active.sum())
  server = protocol.apply_update(server, g_params, OPT, model_state)
  new_clients = []
  for i in range(k):
    mine = jnp.repeat(jnp.arange(k) == i, B)[:, None]
    _, g_h = pullback(jnp.where(mine, jnp.concatenate(g_out), 0.0))
    updated = sl.client_backward(clients[i], tails[i], msgs.CutGradient(g_h[i * B:(i + 1) * B]))
    new_clients.append(jax.tree.map(lambda n, o: jnp.where(active[i], n, o), updated, clients[i]))
  return new_clients, server


def test_k_clients_equal_a_hand_written_loop_over_clients():
  k, steps = 3, 2
  sl = _sl(dropout=0.2)
  algo, data = _algo(sl, k, local_steps=steps), _data(k)
  state = algo.init(jax.random.key(1), data)
  clients = [_client(state.clients, i) for i in range(k)]
  server = state.server
  hand_step = jax.jit(functools.partial(_hand_written_step, sl))
  no_drops = jnp.zeros((steps, k), bool)
  # client 2 drops in the second step of round 0; client 0 sits round 1 out
  inputs = [A.RoundInputs(jnp.ones((k,), bool), no_drops.at[1, 2].set(True)),
            A.RoundInputs(jnp.ones((k,), bool).at[0].set(False), no_drops)]
  round_fn = jax.jit(algo.round)
  for r in range(2):
    active = np.asarray(inputs[r].active())
    for s in range(steps):
      x, y = _batches(state, data, r * steps + s)
      keys = algo.schedule.client_keys(state.key, r, s)
      clients, server = hand_step(clients, server, x, y, keys, algo.schedule.server_keys(state.key, r, s)[0],
                                  jnp.asarray(active[s]))
    state, _ = round_fn(state, data, inputs[r])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *clients)
  chex.assert_trees_all_close((state.clients.params, state.server.params), (stacked.params, server.params),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close((state.clients.opt_state, state.server.opt_state), (stacked.opt_state, server.opt_state),
                              atol=1e-5, rtol=1e-5)
  # the clients trained on their own data: they are no longer tied
  assert not np.allclose(state.clients.params["head"][0]["Dense_0"]["kernel"][0],
                         state.clients.params["head"][0]["Dense_0"]["kernel"][1])


def test_a_dropped_client_step_is_discarded_exactly():
  """Client 1 dropping in the first step == client 1 sitting the round out, but for its smashed data's bytes."""
  k, steps = 3, 2
  ef = codecs.top_k(fraction=0.5, error_feedback=True)  # codec states that a dropped step must not touch
  sl = _sl(uplink=ef, downlink=ef)
  algo, data = _algo(sl, k, local_steps=steps), _data(k)
  state = algo.init(jax.random.key(3), data)
  everyone, no_drops = jnp.ones((k,), bool), jnp.zeros((steps, k), bool)
  round_fn = jax.jit(algo.round)
  after_drop, m_drop = round_fn(state, data, A.RoundInputs(everyone, no_drops.at[0, 1].set(True)))
  after_absent, m_absent = round_fn(state, data, A.RoundInputs(everyone.at[1].set(False), no_drops))
  full, _ = round_fn(state, data, A.RoundInputs(everyone, no_drops))
  chex.assert_trees_all_close(after_drop, after_absent, atol=0, rtol=0)
  chex.assert_trees_all_close(_client(after_drop.clients, 1), _client(state.clients, 1), atol=0, rtol=0)
  chex.assert_trees_all_close(_client(after_drop.server.codec_state, 1), _client(state.server.codec_state, 1),
                              atol=0, rtol=0)
  assert not np.allclose(after_drop.server.params[0]["Dense_0"]["kernel"], full.server.params[0]["Dense_0"]["kernel"])
  assert not np.allclose(after_drop.clients.params["head"][0]["Dense_0"]["kernel"][0],
                         state.clients.params["head"][0]["Dense_0"]["kernel"][0])
  # the dropped client sent its smashed data once, and nothing else crossed its link
  up, down = m_drop["bytes_up_per_client"], m_drop["bytes_down_per_client"]
  assert int(up[1]) > 0 and int(down[1]) == 0 and int(m_absent["bytes_up_per_client"][1]) == 0
  assert int(up[0]) > steps * int(up[1]) and int(m_drop["completed_steps"][1]) == 0


def test_the_server_never_receives_labels():
  """The uplink of a step, as a network client would send it: SmashedData and TailGradient bytes.

  The labels' bytes do not occur in them (they do in vanilla SmashedData, as a check of the check),
  and the round's reported uplink bytes are exactly these messages'."""
  k = 2
  sl = _sl()
  algo, data = _algo(sl, k), _data(k)
  state = algo.init(jax.random.key(0), data)
  x, y = _batches(state, data, 0)
  keys = algo.schedule.client_keys(state.key, 0, 0)
  legs = algo.schedule.server_step
  ups = jax.vmap(lambda c, x, key: sl.client_forward(c, x, parallel_u.u_step_keys(key)[0])[0])(state.clients, x, keys)
  bodies, _ = legs.forward(state.server, ups, state.key, 0, 0)

  def tail(c, x, y, key, body):
    k_head, _, k_tail = parallel_u.u_step_keys(key)
    return sl.client_tail_step(c, sl.client_forward(c, x, k_head)[1], body, y, k_tail)[0]

  tail_grads = jax.vmap(tail)(state.clients, x, y, keys, bodies)
  _, metrics = jax.jit(algo.round)(state, data)
  for i in range(k):
    labels = np.asarray(y[i]).tobytes()
    smashed, tail_grad = _client(ups, i), _client(tail_grads, i)
    assert isinstance(smashed, msgs.SmashedData) and smashed.labels is None
    assert isinstance(tail_grad, msgs.TailGradient)
    wire = [sljax.to_bytes(smashed), sljax.to_bytes(tail_grad)]
    assert all(labels not in data for data in wire)
    assert labels in sljax.to_bytes(msgs.SmashedData(smashed.activations, y[i]))
    assert int(metrics["bytes_up_per_client"][i]) == sum(map(len, wire))


def test_no_recompilation_over_rounds():
  data = _data(4, uneven=True)
  algo = _algo(_sl(), 4, participation=0.5, drop_rate=0.2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, data):
    return algo.round(state, data)

  state = algo.init(jax.random.key(0), data)
  participations = set()
  for _ in range(4):
    state, metrics = round_fn(state, data)
    participations.add(tuple(np.asarray(metrics["participating"]).tolist()))
  assert len(participations) > 1


def test_bad_arguments_name_the_argument():
  vanilla = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=OPT, server_optimizer=OPT)
  with pytest.raises(TypeError, match=r"sl: expected the U-shaped protocol sljax.u_shaped\(model, ...\), got Vanilla"):
    A.u_shaped_parallel_sl(vanilla, A.ScheduleConfig(num_clients=2, batch_size=B))
  with pytest.raises(TypeError, match="config: expected a sljax.algorithms.ScheduleConfig, got dict"):
    A.u_shaped_parallel_sl(_sl(), {"num_clients": 2, "batch_size": B})


def test_the_clock_times_the_u_shaped_legs():
  """By hand: clients A and B of tests/test_network.py, with a tail, a body output and a tail gradient."""
  costs = N.StepCosts(batch_size=4, client_forward_flops=100.0, client_backward_flops=200.0, server_step_flops=1000.0,
                      server_update_flops=0.0, local_loss_step_flops=0.0, model_step_flops=0.0, smashed_bytes=1000,
                      cut_gradient_bytes=500, client_weights_bytes=0, model_weights_bytes=0,
                      server_forward_flops=400.0, tail_step_flops=100.0, body_output_bytes=1000,
                      tail_gradient_bytes=500)
  a = N.DeviceProfile(flops_per_s=100.0, uplink_bps=8000.0, downlink_bps=8000.0, latency_s=0.1)
  b = N.DeviceProfile(flops_per_s=50.0, uplink_bps=4000.0, downlink_bps=8000.0, latency_s=0.1)
  server = N.DeviceProfile(flops_per_s=1000.0, uplink_bps=1e12, downlink_bps=1e12, latency_s=0.0)
  t = N.round_time("parallel_sl_u", costs, clients=[a, b], server=server)
  # Smashed data arrives at 1 + 1.1 = 2.1 (A) and 2 + 2.1 = 4.1 (B); the body's forward on both
  # batches 4.1 -> 4.9. Body output down 1 + 0.1, tail 1 s (A) and 2 s (B), tail gradient up
  # 0.5 + 0.1 (A) and 1 + 0.1 (B): arrivals 7.6 and 9.1. Backward and update 9.1 -> 10.3; cut
  # gradient down 0.5 + 0.1, head backward: A done 12.9, B done 14.9.
  np.testing.assert_allclose(t.wall_s, 14.9, rtol=1e-12)
  np.testing.assert_allclose(t.client_compute_s, (4, 8), rtol=1e-12)
  np.testing.assert_allclose(t.client_comm_s, (1 + 0.5 + 1 + 0.5, 2 + 1 + 1 + 0.5), rtol=1e-12)
  np.testing.assert_allclose(t.client_idle_s, (14.9 - 4 - 3, 14.9 - 8 - 4.5), rtol=1e-9)
  np.testing.assert_allclose(t.server_busy_s, 2.0, rtol=1e-12)


def test_step_costs_of_a_u_shaped_model_give_the_algorithms_bytes():
  """`step_costs` on the three-part model times `u_shaped`'s legs; its bytes are the round's, codecs included."""
  sl_opt, k = optax.sgd(0.1), 2
  uplink = codecs.cast(dtype=jnp.bfloat16)
  model = sljax.cut(sljax.models.mlp(hidden=(16, 16)), 1, 2)
  costs = N.step_costs(model, example_x=jnp.zeros((1, 12)), batch_size=B, optimizer=sl_opt, uplink=uplink)
  assert 0 < costs.server_forward_flops < costs.server_step_flops and costs.tail_step_flops > 0
  assert costs.smashed_bytes < B * 16 * 4 and costs.body_output_bytes > B * 16 * 4  # bfloat16 up, float32 down
  sl = sljax.u_shaped(model, client_optimizer=sl_opt, server_optimizer=sl_opt, uplink=uplink)
  algo = A.u_shaped_parallel_sl(sl, A.ScheduleConfig(num_clients=k, batch_size=B, local_steps=2))
  data = _data(k)
  _, metrics = jax.jit(algo.round)(algo.init(jax.random.key(0), data), data)
  timing = N.round_time(algo, costs, clients=[N.PHONE_LTE] * k, server=N.GPU_SERVER, local_steps=2)
  np.testing.assert_array_equal(timing.bytes_up_per_client, metrics["bytes_up_per_client"])
  np.testing.assert_array_equal(timing.bytes_down_per_client, metrics["bytes_down_per_client"])


def test_docstring_example_runs():
  runner = doctest.DocTestRunner()
  globs = {"jax": jax, "u_shaped_parallel_sl": A.u_shaped_parallel_sl, "ScheduleConfig": A.ScheduleConfig}
  for test in doctest.DocTestFinder().find(A.u_shaped_parallel_sl, globs=globs):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 0
