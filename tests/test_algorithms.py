"""Multi-client algorithms against their references; executors, sharding, drops, resume."""

import dataclasses
import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import algorithms as A
from sljax import data as D
from sljax import execution, simulation

B = 8
OPT = optax.adam(1e-2)


def _data(num_clients, *, n=96, features=12, seed=0, uneven=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  y = np.argmax(x[:, :10], axis=1).astype(np.int32)  # learnable labels
  if uneven:
    parts = D.quantity_skew(y, num_clients=num_clients, alpha=0.5, seed=seed)
  else:
    parts = D.iid(y, num_clients=num_clients, seed=seed)
  return D.stack_clients(x, y, parts)


def _model():
  return sljax.cut(sljax.models.mlp(hidden=(16, 16)), 1)


def _sl(model=None, **codecs):
  """The vanilla protocol the split algorithms take: `_model()` (or `model`), OPT on both halves."""
  return sljax.vanilla(_model() if model is None else model, client_optimizer=OPT, server_optimizer=OPT, **codecs)


def _central():
  return sljax.centralized(_model(), optimizer=OPT)


def _config(num_clients, **kw):
  return A.ScheduleConfig(num_clients=num_clients, batch_size=B, **kw)


def _vanilla_reference(data, key, steps):
  """Vanilla split learning on client 0's batches, in the algorithms' data order."""
  k_model, k_run = jax.random.split(key)
  sl = sljax.vanilla(_model(), client_optimizer=OPT, server_optimizer=OPT)
  state = sl.init(k_model, data.x[0, :1])
  step = jax.jit(sl.step)
  for s in range(steps):
    x, y, _ = D.client_batches(data, s, batch_size=B, key=jax.random.wrap_key_data(jax.random.key_data(k_run)))
    state, _ = step(state, (x[0], y[0]), jax.random.key(s))
  return state


def _rounds(algo, data, rounds, key=jax.random.key(0), **kw):
  state = algo.init(key, data)
  round_fn = jax.jit(algo.round)
  history = []
  for _ in range(rounds):
    state, m = round_fn(state, data, **kw)
    history.append(m)
  return state, history


def _first(tree):
  return jax.tree.map(lambda a: a[0], tree)


ONE_CLIENT = {
    "parallel": lambda: A.parallel_sl(_sl(), _config(1)),
    "splitfed_v1": lambda: A.splitfed(_sl(), _config(1), version=1),
    "splitfed_v2": lambda: A.splitfed(_sl(), _config(1), version=2),
    "sequential": lambda: A.sequential_sl(_sl(), _config(1)),
    "centralized": lambda: A.centralized_baseline(_central(), _config(1)),
}


@pytest.mark.parametrize("name", list(ONE_CLIENT))
def test_one_client_equals_vanilla_split_learning(name):
  data = _data(1)
  ref = _vanilla_reference(data, jax.random.key(0), steps=6)
  algo = ONE_CLIENT[name]()
  state, _ = _rounds(algo, data, rounds=6)
  if name == "centralized":
    params = state.server.params
  elif name == "sequential":
    params = (state.clients.params, state.server.params)
  elif name == "splitfed_v1":
    params = (_first(state.clients.params), _first(state.server.params))
  else:
    params = (_first(state.clients.params), state.server.params)
  chex.assert_trees_all_close(params, (ref.client.params, ref.server.params), atol=1e-5, rtol=1e-5)

  def loss_on_all(state):  # on all of the client's data: a single batch's loss depends on the batch drawn
    logits = algo.predict(state, data.x[0])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, data.y[0]).mean())

  assert loss_on_all(state) < loss_on_all(algo.init(jax.random.key(0), data))


def test_parallel_sl_with_tied_clients_equals_centralized_on_the_pooled_batch():
  k = 4
  data = _data(k)
  par = A.parallel_sl(_sl(), _config(k, local_steps=2), sync_clients=True)
  cen = A.centralized_baseline(_central(), _config(k, local_steps=2))
  p_state, p_hist = _rounds(par, data, rounds=4)
  c_state, c_hist = _rounds(cen, data, rounds=4)
  for i in range(k):
    client_i = jax.tree.map(lambda a: a[i], p_state.clients.params)
    chex.assert_trees_all_close((client_i, p_state.server.params), c_state.server.params, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose([float(m["loss"]) for m in p_hist], [float(m["loss"]) for m in c_hist], atol=1e-5)


def test_parallel_sl_without_sync_lets_clients_diverge():
  """The test above can fail: without synchronisation, tied clients drift apart."""
  data = _data(4)
  par = A.parallel_sl(_sl(), _config(4))
  state, _ = _rounds(par, data, rounds=2)
  w = state.clients.params[0]["Dense_0"]["kernel"]
  assert not np.allclose(w[0], w[1])


EXECUTORS = [execution.vmap(), execution.chunked_vmap(2), execution.lax_map(), execution.loop()]


@pytest.mark.parametrize("algo_name", ["parallel", "splitfed_v1", "splitfed_v2"])
def test_executors_agree(algo_name):
  data = _data(4, uneven=True)
  results = []
  # the un-jitted loop runs op by op: check it once, on the algorithm that uses the executor most
  for ex in EXECUTORS if algo_name == "parallel" else EXECUTORS[:3]:
    if algo_name == "parallel":
      algo = A.parallel_sl(_sl(), _config(4, executor=ex, local_steps=2))
    else:
      algo = A.splitfed(_sl(), _config(4, executor=ex, local_steps=2), version=int(algo_name[-1]))
    state = algo.init(jax.random.key(1), data)
    round_fn = jax.jit(algo.round) if ex.jit else algo.round
    state, metrics = round_fn(state, data)
    results.append((state, metrics["loss"]))
  for other in results[1:]:
    chex.assert_trees_all_close(results[0], other, atol=1e-5, rtol=1e-5)


def test_loop_executor_names_the_failing_client():
  def fn(x):
    if float(x[0]) == 2.0:
      raise ValueError("bad value")
    return x

  with pytest.raises(execution.ClientError, match="client 2: ValueError: bad value"):
    execution.loop()(fn, jnp.arange(4.0)[:, None])


def test_sharded_over_four_devices_equals_single_device():
  assert jax.device_count() >= 4, "tests/conftest.py asks XLA for 4 CPU devices"
  data = _data(8)
  for algo in [A.parallel_sl(_sl(), _config(8)), A.splitfed(_sl(), _config(8), version=1)]:
    state = algo.init(jax.random.key(2), data)
    single, _ = simulation.run(algo, state, data, rounds=2, donate=False)  # state is sharded below
    mesh = execution.client_mesh(jax.devices()[:4])
    s_state, s_data = simulation.shard(algo, state, data, mesh)
    sharded, _ = simulation.run(algo, s_state, s_data, rounds=2)
    assert len(sharded.clients.params[0]["Dense_0"]["kernel"].sharding.device_set) == 4
    chex.assert_trees_all_close(jax.device_get(sharded), jax.device_get(single), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("version", [None, 1, 2])
def test_a_dropped_client_step_is_discarded_exactly(version):
  """Dropping client 1 mid-step == client 1 sitting the round out, except for its uplink bytes."""
  k = 3
  data = _data(k)
  if version is None:
    algo = A.parallel_sl(_sl(), _config(k))
  else:
    algo = A.splitfed(_sl(), _config(k), version=version)
  state = algo.init(jax.random.key(3), data)
  everyone = jnp.ones((k,), bool)
  no_drops = jnp.zeros((1, k), bool)
  dropped = A.RoundInputs(everyone, no_drops.at[0, 1].set(True))
  absent = A.RoundInputs(everyone.at[1].set(False), no_drops)
  round_fn = jax.jit(algo.round)
  after_drop, m_drop = round_fn(state, data, dropped)
  after_absent, m_absent = round_fn(state, data, absent)
  full, _ = round_fn(state, data, A.RoundInputs(everyone, no_drops))
  if version is None:  # no averaging: client 1 is untouched
    chex.assert_trees_all_close(_first(jax.tree.map(lambda a: a[1:2], after_drop.clients)), _first(
        jax.tree.map(lambda a: a[1:2], state.clients)))
  chex.assert_trees_all_close(after_drop, after_absent, atol=0, rtol=0)
  assert not np.allclose(after_drop.server.params[1]["kernel"], full.server.params[1]["kernel"])
  assert int(m_drop["bytes_up_per_client"][1]) > 0 and int(m_absent["bytes_up_per_client"][1]) == 0
  if version is None:  # the dropped client never got its cut gradient
    assert int(m_drop["bytes_down_per_client"][1]) == 0 < int(m_drop["bytes_down_per_client"][0])


def test_no_recompilation_after_the_first_round_with_uneven_clients():
  data = _data(4, uneven=True)
  assert len(set(np.asarray(data.count).tolist())) > 1
  algo = A.parallel_sl(_sl(), _config(4, participation=0.5, drop_rate=0.2))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_fn(state, data):
    return algo.round(state, data)

  state = algo.init(jax.random.key(0), data)
  participations = set()
  for _ in range(5):
    state, metrics = round_fn(state, data)
    participations.add(tuple(np.asarray(metrics["participating"]).tolist()))
    assert int(np.sum(metrics["participating"])) == 2
  assert len(participations) > 1  # the sampled clients change from round to round


def test_resume_is_bit_identical_and_metrics_reproduce(tmp_path):
  data = _data(4, uneven=True)
  algo = A.splitfed(_sl(), _config(4, participation=0.75, drop_rate=0.1, local_steps=2), version=2)
  state = algo.init(jax.random.key(4), data)
  full, full_history = simulation.run(algo, state, data, rounds=6, donate=False)
  again, again_history = simulation.run(algo, state, data, rounds=6, donate=False)
  assert full_history == again_history  # same seed, same everything
  ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
  simulation.run(algo, state, data, rounds=3, checkpoint_dir=ckpt, checkpoint_every=3, metrics_path=metrics,
                 donate=False)
  # resumed with the state donated from round to round (the default): still bit-identical
  resumed, resumed_history = simulation.run(algo, state, data, rounds=6, checkpoint_dir=ckpt, metrics_path=metrics)
  assert [r["round"] for r in resumed_history] == [4, 5, 6]
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert resumed_history == full_history[3:]
  lines = metrics.read_text().splitlines()
  assert len(lines) == 6 and '"bytes_up_per_client"' in lines[0]


def test_local_loss_and_fedavg_train_and_account_bytes():
  data = _data(4)
  ll = A.local_loss_sl(_sl(), _config(4, local_steps=2), aux_head=A.linear_head(10))
  state, hist = _rounds(ll, data, rounds=8)
  assert float(hist[-1]["loss"]) < float(hist[0]["loss"])
  initial = ll.init(jax.random.key(0), data)
  # the auxiliary head is part of the client's loss, so it learns too
  assert not np.allclose(state.clients.params["aux"][1]["kernel"],
                         initial.clients.params["aux"][1]["kernel"])
  assert int(hist[0]["bytes_down"]) == 0  # nothing comes back
  up = sljax.wire_size(sljax.SmashedData(jnp.zeros((B, 16)), jnp.zeros((B,), jnp.int32)))
  assert int(hist[0]["bytes_up"]) == 4 * 2 * up
  fa = A.fedavg(_central(), _config(4, local_steps=2))
  state, hist = _rounds(fa, data, rounds=4)
  for i in range(1, 4):  # averaged and broadcast: every client holds the same model
    chex.assert_trees_all_close(_first(state.clients.params), jax.tree.map(lambda a: a[i], state.clients.params))
  assert int(hist[0]["bytes_up"]) == 4 * sljax.wire_size(sljax.messages.ModelWeights(_first(state.clients.params)))


def test_bad_client_data():
  algo = A.parallel_sl(_sl(), _config(4))
  state = algo.init(jax.random.key(0), _data(4))
  with pytest.raises(ValueError, match=r"data.x \(per client\): expected shape \(B, 12\) float32, got \(\d+, 13\) float32"):
    algo.round(state, _data(4, features=13))
  with pytest.raises(ValueError, match="data: expected 4 clients"):
    algo.round(state, _data(3))
  with pytest.raises(ValueError, match=r"participation: expected a fraction in \(0, 1\], got 0"):
    A.parallel_sl(_sl(), _config(4, participation=0))
  with pytest.raises(ValueError, match="version: expected 1 or 2, got 3"):
    A.splitfed(_sl(), _config(4), version=3)


def test_schedule_config_checks_itself_and_algorithms_check_their_protocol():
  config = _config(np.int64(4), local_steps=2)
  assert config == _config(4, local_steps=2) and hash(config) == hash(_config(4, local_steps=2))
  assert type(config.num_clients) is int and config.participation == 1.0 and config.executor.name == "vmap"
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.num_clients = 5
  with pytest.raises(ValueError, match="num_clients: expected a positive int, got 0"):
    _config(0)
  with pytest.raises(ValueError, match="batch_size: expected a positive int, got 8.0"):
    A.ScheduleConfig(num_clients=2, batch_size=8.0)
  with pytest.raises(ValueError, match="local_steps: expected a positive int, got True"):
    _config(2, local_steps=True)
  with pytest.raises(ValueError, match=r"drop_rate: expected a fraction in \[0, 1\], got 1.5"):
    _config(2, drop_rate=1.5)
  with pytest.raises(ValueError, match=r"participation: expected a fraction in \(0, 1\], got '1'"):
    _config(2, participation="1")
  with pytest.raises(TypeError, match="executor: expected a sljax.execution.Executor .*, got function"):
    _config(2, executor=jax.vmap)
  with pytest.raises(TypeError, match=r"sl: parallel_sl expected a Vanilla protocol \(from sljax.vanilla\(model, "
                                      r"...\)\), got Centralized"):
    A.parallel_sl(_central(), config)
  with pytest.raises(TypeError, match="central: fedavg expected a Centralized protocol .*, got Vanilla"):
    A.fedavg(_sl(), config)
  with pytest.raises(TypeError, match="config: expected a sljax.algorithms.ScheduleConfig, got dict"):
    A.sequential_sl(_sl(), {"num_clients": 4, "batch_size": B})
  # a defense hook that the algorithm's own steps would not apply is refused, not ignored
  noisy = _sl()._replace(cut_gradient_transform=lambda g, labels, key: g)
  with pytest.raises(ValueError, match="sl.cut_gradient_transform: parallel_sl does not apply it"):
    A.parallel_sl(noisy, config)
  with pytest.raises(ValueError, match="sl.client_loss: local_loss_sl does not apply it"):
    A.local_loss_sl(_sl()._replace(client_loss=lambda x, h: 0.0), config, aux_head=A.linear_head(10))
  with pytest.raises(ValueError, match=r"cuts: expected one cut per client \(config.num_clients=4\), got 2 cuts"):
    A.heterogeneous_parallel_sl(_sl(), config, cuts=[1, 1])
  # the registry builds these algorithms from a protocol and a config alone
  for name in ("sequential_sl", "parallel_sl", "splitfed_v1", "splitfed_v2", "fedavg", "centralized"):
    protocol = _central() if name in ("fedavg", "centralized") else _sl()
    entry = A.REGISTRY[name]
    assert entry.factory(protocol, config, **entry.options).name == name


def test_docstring_examples_run():
  for fn in (A.ScheduleConfig, A.parallel_sl, A.splitfed, A.sequential_sl, A.local_loss_sl, A.fedavg,
             A.centralized_baseline, A.heterogeneous_parallel_sl):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs = {"jax": jax, "jnp": jnp, **{name: getattr(A, name) for name in A.__all__}}
    for test in doctest.DocTestFinder().find(fn, globs=globs):
      runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, fn.__name__


def test_a_round_past_two_to_the_31_bytes_reports_them_exactly():
  """1100 clients of sequential SL, each relaying a 2.1 MB client half: 2.3e9 bytes up in one round,
  exact as int64 (counted as int32 inside the jitted round, they wrapped), in the metrics and in
  `simulation.run`'s records."""
  k = 1100
  rng = np.random.default_rng(0)
  x = rng.normal(size=(k, 1024)).astype(np.float32)
  y = (np.arange(k) % 10).astype(np.int32)
  data = D.stack_clients(x, y, D.iid(y, num_clients=k, seed=0))  # one row per client
  sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(512,)), 1), client_optimizer=optax.sgd(0.1),
                     server_optimizer=optax.sgd(0.1))
  algo = A.sequential_sl(sl, A.ScheduleConfig(num_clients=k, batch_size=1))
  state = algo.init(jax.random.key(0), data)
  relay = sljax.wire_size(sljax.messages.ModelWeights(state.clients.params))  # 1024 x 512 float32 weights
  smashed = sljax.wire_size(sljax.SmashedData(jnp.zeros((1, 512)), jnp.zeros((1,), jnp.int32)))
  cut_gradient = sljax.wire_size(sljax.messages.CutGradient(jnp.zeros((1, 512))))
  _, metrics = jax.jit(algo.round)(state, data)
  assert metrics["bytes_up"] == k * (smashed + relay) > 2**31
  assert metrics["bytes_down"] == k * (cut_gradient + relay) > 2**31
  assert metrics["bytes_up"].dtype == metrics["bytes_up_per_client"].dtype == np.int64
  assert metrics["bytes_up_per_client"].tolist() == [smashed + relay] * k
  _, records = simulation.run(algo, state, data, rounds=1, donate=False)
  assert records[0]["bytes_up"] == records[0]["bytes_up_cumulative"] == k * (smashed + relay)
  # the bytes are the host's: read inside a trace, they say so
  small = A.parallel_sl(_sl(), _config(4))
  with pytest.raises(TypeError, match="bytes_up: expected concrete message counts, got a traced one"):
    jax.jit(lambda s, d: small.round(s, d)[1]["bytes_up"])(small.init(jax.random.key(0), _data(4)), _data(4))


@pytest.mark.parametrize("with_codecs", [False, True], ids=["plain", "codecs"])
def test_heterogeneous_cuts_with_one_cut_equal_parallel_sl(with_codecs):
  data = _data(4)
  layers = sljax.models.mlp(hidden=(16, 16))
  codecs = dict(uplink=sljax.codecs.random_k(fraction=0.5), downlink=sljax.codecs.quantize(bits=8)) if with_codecs else {}
  het = A.heterogeneous_parallel_sl(_sl(sljax.cut(layers, 2), **codecs), _config(4, local_steps=2), cuts=[1, 1, 1, 1])
  par = A.parallel_sl(_sl(sljax.cut(layers, 1), **codecs), _config(4, local_steps=2))
  h_state = het.init(jax.random.key(5), data)
  p_state = par.init(jax.random.key(5), data)
  body = h_state.server.params["body"]
  p_state = p_state.replace(clients=h_state.clients[0],
                            server=p_state.server.replace(params=body, opt_state=OPT.init(body)))
  for _ in range(3):
    h_state, h_metrics = jax.jit(het.round)(h_state, data)
    p_state, p_metrics = jax.jit(par.round)(p_state, data)
  chex.assert_trees_all_close(h_state.clients[0].params, p_state.clients.params, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(h_state.server.params["body"], p_state.server.params, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(h_metrics["bytes_up_per_client"], p_metrics["bytes_up_per_client"])
  np.testing.assert_array_equal(h_metrics["bytes_down_per_client"], p_metrics["bytes_down_per_client"])
  if with_codecs:  # the codecs did act: fewer bytes than plain float32 messages
    plain = sljax.wire_size(sljax.messages.CutGradient(jnp.zeros((B, 16))))
    assert int(h_metrics["bytes_down_per_client"][0]) < 2 * (2 * plain) / 3  # 2 steps per round


def test_heterogeneous_cuts_train_with_a_shared_body():
  data = _data(4)
  layers = sljax.models.mlp(hidden=(16, 24))
  het = A.heterogeneous_parallel_sl(_sl(sljax.cut(layers, 1)), _config(4, local_steps=2), cuts=[2, 1, 2, 1])
  state = het.init(jax.random.key(0), data)
  shallow, deep = state.clients
  assert len(shallow.params) == 1 and len(deep.params) == 2  # client 1 and 3 hold one layer, 0 and 2 two
  # the server bridges the shallow group's 16-wide cut to the body, which starts at layer 2
  assert state.server.params["bridges"][0][0]["Dense_0"]["kernel"].shape == (16, 24)
  assert state.server.params["bridges"][1] == ()
  first_loss = None
  for _ in range(6):
    state, metrics = jax.jit(het.round)(state, data)
    first_loss = first_loss or float(metrics["loss"])
  assert float(metrics["loss"]) < first_loss
  labels = jnp.zeros((B,), jnp.int32)
  up = [sljax.wire_size(sljax.SmashedData(jnp.zeros((B, w)), labels)) for w in (24, 16, 24, 16)]
  assert np.asarray(metrics["bytes_up_per_client"]).tolist() == [2 * u for u in up]
  out = het.predict(state, jnp.asarray(data.x[1, :5]), client=1)
  assert out.shape == (5, 10)
  with pytest.raises(ValueError, match=r"cuts\[1\]: cut index must be in \[1, 2\] for a stack of 3 layers, got 3"):
    A.heterogeneous_parallel_sl(_sl(sljax.cut(layers, 1)), _config(2), cuts=[1, 3])


def test_parallel_sl_with_the_server_in_client_chunks_equals_the_whole_step():
  """`server_chunk`: clients C at a time through client, server and back, one summed server update
  per step: the same round (uneven clients, a non-participant, a drop, codecs), without retracing."""
  data = _data(8, uneven=True)
  everyone = A.RoundInputs(jnp.ones((8,), bool), jnp.zeros((3, 8), bool))
  inputs = A.RoundInputs(jnp.array([1, 1, 0, 1, 1, 1, 1, 1], bool), jnp.zeros((3, 8), bool).at[1, 3].set(True))
  codecs = dict(uplink=sljax.codecs.random_k(fraction=0.5), downlink=sljax.codecs.quantize(bits=8))
  results = {}
  for chunk in (None, 2, 8):
    algo = A.parallel_sl(_sl(**codecs), _config(8, local_steps=3), server_chunk=chunk)
    state = algo.init(jax.random.key(2), data)
    jitted = jax.jit(algo.round, donate_argnums=0)
    history = []
    for r in range(3):
      state, metrics = jitted(state, data, inputs if r == 1 else everyone)
      history.append(metrics)
    assert jitted._cache_size() == 1  # one compilation for every round
    results[chunk] = (jax.device_get(state), jax.device_get(history))
  reference_state, reference_history = results[None]
  for chunk in (2, 8):
    state, history = results[chunk]
    chex.assert_trees_all_close(state, reference_state, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(history, reference_history, atol=2e-5, rtol=1e-5)
  assert int(reference_history[1]["completed_steps"][3]) == 1 and int(reference_history[1]["completed_steps"][2]) == 0
  with pytest.raises(ValueError, match=r"server_chunk: expected a positive int that divides num_clients=8, got 3"):
    A.parallel_sl(_sl(), _config(8), server_chunk=3)
  with pytest.raises(ValueError, match="server_chunk: not available with sync_clients=True"):
    A.parallel_sl(_sl(), _config(8), server_chunk=2, sync_clients=True)
  with pytest.raises(ValueError, match=r"server_step: not available with server_chunk \(the chunked step is parallel "
                                       r"SL's own server\)"):
    A.parallel_sl(_sl(), _config(8), server_chunk=2, server_step=lambda *a, **k: None)
