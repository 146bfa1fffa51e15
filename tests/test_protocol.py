"""Split training against centralized training, the fused step against the three-call path."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sljax
from sljax import models

STEPS = 50
BATCH = 16


def _data(shape, n=BATCH * 8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  y = rng.integers(0, 10, size=n).astype(np.int32)
  return x, y


def _batches(x, y, steps=STEPS):
  n = x.shape[0] // BATCH
  for i in range(steps):
    j = i % n
    yield jnp.asarray(x[j * BATCH : (j + 1) * BATCH]), jnp.asarray(y[j * BATCH : (j + 1) * BATCH])


def _run(trainer, state, x, y, steps=STEPS):
  step = jax.jit(trainer.step)
  losses = []
  for i, batch in enumerate(_batches(x, y, steps)):
    state, metrics = step(state, batch, jax.random.key(100 + i))
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


def _split_params(state, u):
  c = state.client.params
  return (c["head"], state.server.params, c["tail"]) if u else (c, state.server.params)


CASES = {
    "mlp": (lambda: models.mlp(hidden=(32, 32)), (64,), (1,), (1, 2)),
    "cnn": (lambda: models.cnn(channels=(4, 8), hidden=16), (8, 8, 1), (1,), (1, 3)),
    "mlp_dropout_batchnorm": (lambda: models.mlp(hidden=(32, 32), dropout=0.3, batch_norm=True), (64,), (1,), (1, 2)),
}


@pytest.mark.parametrize("u", [False, True], ids=["vanilla", "u_shaped"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_equals_centralized(case, u):
  make_layers, shape, k_vanilla, k_u = CASES[case]
  x, y = _data(shape)
  model = sljax.cut(make_layers(), *(k_u if u else k_vanilla))
  opt = optax.adam(1e-2)
  factory = sljax.u_shaped if u else sljax.vanilla
  split_trainer = factory(model, client_optimizer=opt, server_optimizer=opt)
  central = sljax.centralized(model, optimizer=opt)
  s_state, s_losses = _run(split_trainer, split_trainer.init(jax.random.key(0), x[:2]), x, y)
  c_state, c_losses = _run(central, central.init(jax.random.key(0), x[:2]), x, y)
  assert s_losses[-1] < s_losses[0]  # it trains
  np.testing.assert_allclose(s_losses, c_losses, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(_split_params(s_state, u), c_state.params, atol=1e-5, rtol=1e-5)
  s_model_state = (s_state.client.model_state["head"], s_state.server.model_state, s_state.client.model_state["tail"]) \
      if u else (s_state.client.model_state, s_state.server.model_state)
  chex.assert_trees_all_close(s_model_state, c_state.model_state, atol=1e-5, rtol=1e-5)


def test_split_differs_when_keys_differ():
  """The equivalence test can fail: a different dropout key gives a different run."""
  make_layers, shape, k, _ = CASES["mlp_dropout_batchnorm"]
  x, y = _data(shape)
  model = sljax.cut(make_layers(), *k)
  sl = sljax.vanilla(model, client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2))
  state = sl.init(jax.random.key(0), x[:2])
  batch = next(_batches(x, y))
  step = jax.jit(sl.step)
  a, _ = step(state, batch, jax.random.key(1))
  b, _ = step(state, batch, jax.random.key(2))
  assert not np.allclose(a.client.params[0]["Dense_0"]["kernel"], b.client.params[0]["Dense_0"]["kernel"])


class _NNXBlock(nnx.Module):
  def __init__(self, din, dout, *, rngs):
    self.linear = nnx.Linear(din, dout, rngs=rngs)
    self.bn = nnx.BatchNorm(dout, rngs=rngs)
    self.dropout = nnx.Dropout(0.25, rngs=rngs)

  def __call__(self, x):
    return self.dropout(jax.nn.relu(self.bn(self.linear(x))))


def test_nnx_halves_with_dropout_and_batch_stats_equal_centralized():
  x, y = _data((12,))
  model = sljax.split_model(_NNXBlock(12, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 10, rngs=nnx.Rngs(1)))
  opt = optax.sgd(0.1)
  sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
  central = sljax.centralized(model, optimizer=opt)
  s_state, s_losses = _run(sl, sl.init(jax.random.key(0), x[:2]), x, y, steps=10)
  c_state, c_losses = _run(central, central.init(jax.random.key(0), x[:2]), x, y, steps=10)
  np.testing.assert_allclose(s_losses, c_losses, atol=1e-6)
  chex.assert_trees_all_close((s_state.client.params, s_state.server.params), c_state.params, atol=1e-6)
  # batch statistics moved, and dropout made training differ from evaluation
  assert not np.allclose(s_state.client.model_state["bn"]["mean"], 0.0)
  batch = next(_batches(x, y))
  out_a, _ = sl.client_forward(s_state.client, *batch, jax.random.key(1))
  out_b, _ = sl.client_forward(s_state.client, *batch, jax.random.key(2))
  assert not np.allclose(out_a.activations, out_b.activations)


def test_linen_and_function_halves():
  x, y = _data((10,))

  def server_init(key, h):
    return {"w": jax.random.normal(key, (h.shape[-1], 10)) * 0.1}

  server = sljax.function_stage(lambda p, h: h @ p["w"], server_init)
  model = sljax.split_model(nn.Dense(8), server)
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  central = sljax.centralized(model, optimizer=optax.sgd(0.1))
  s_state, s_losses = _run(sl, sl.init(jax.random.key(3), x[:2]), x, y, steps=5)
  c_state, c_losses = _run(central, central.init(jax.random.key(3), x[:2]), x, y, steps=5)
  np.testing.assert_allclose(s_losses, c_losses, atol=1e-6)
  assert s_state.server.params["w"].shape == (8, 10)


def _three_call_vanilla(sl, state, batch, key):
  k_c, k_s = jax.random.split(key)
  up, pending = sl.client_forward(state.client, *batch, k_c)
  server, down, metrics = sl.server_step(state.server, up, k_s)
  client = sl.client_backward(state.client, pending, down)
  return state.advanced(client, server), metrics, up, down


def _three_call_u(sl, state, batch, key):
  x, y = batch
  k_h, k_b, k_t = jax.random.split(key, 3)
  up1, hp = sl.client_forward(state.client, x, k_h)
  down1, sp = sl.server_forward(state.server, up1, k_b)
  up2, tp, metrics = sl.client_tail_step(state.client, hp, down1, y, k_t)
  server, down2 = sl.server_backward(state.server, sp, up2)
  client = sl.client_backward(state.client, tp, down2)
  return state.advanced(client, server), metrics, (up1, up2), (down1, down2)


class FusedStepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fused_equals_three_calls_vanilla(self):
    x, y = _data((64,))
    sl = sljax.vanilla(sljax.cut(models.mlp(hidden=(32, 32), dropout=0.2), 1),
                       client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2))
    state = sl.init(jax.random.key(0), x[:2])
    batch = next(_batches(x, y))
    fused, fused_metrics = self.variant(sl.step)(state, batch, jax.random.key(5))
    legs, metrics, up, down = self.variant(_three_call_vanilla, static_argnums=0)(sl, state, batch, jax.random.key(5))
    # the same operations; under jit XLA may reassociate sums, hence the 1e-6 allowance
    chex.assert_trees_all_close(fused, legs, atol=1e-6, rtol=1e-6)
    assert float(fused_metrics["loss"]) == float(metrics["loss"])
    assert int(fused_metrics["bytes_up"]) == len(sljax.to_bytes(up))
    assert int(fused_metrics["bytes_down"]) == len(sljax.to_bytes(down))

  @chex.variants(with_jit=True, without_jit=True)
  def test_fused_equals_three_calls_u_shaped(self):
    x, y = _data((64,))
    sl = sljax.u_shaped(sljax.cut(models.mlp(hidden=(32, 32)), 1, 2),
                        client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2))
    state = sl.init(jax.random.key(0), x[:2])
    batch = next(_batches(x, y))
    fused, fused_metrics = self.variant(sl.step)(state, batch, jax.random.key(5))
    legs, metrics, ups, downs = self.variant(_three_call_u, static_argnums=0)(sl, state, batch, jax.random.key(5))
    chex.assert_trees_all_close(fused, legs, atol=1e-6, rtol=1e-6)
    assert float(fused_metrics["loss"]) == float(metrics["loss"])
    assert int(fused_metrics["bytes_up"]) == sum(len(sljax.to_bytes(m)) for m in ups)
    assert int(fused_metrics["bytes_down"]) == sum(len(sljax.to_bytes(m)) for m in downs)


def test_no_retracing_across_steps():
  x, y = _data((64,))
  sl = sljax.vanilla(sljax.cut(models.mlp(hidden=(16,)), 1),
                     client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, batch, key):
    return sl.step(state, batch, key)

  state = sl.init(jax.random.key(0), x[:2])
  for i, batch in enumerate(_batches(x, y, steps=6)):
    state, _ = step(state, batch, jax.random.key(i))
  assert int(state.step) == 6


@pytest.mark.parametrize("u", [False, True], ids=["vanilla", "u_shaped"])
def test_predict_is_collaborative_inference(u):
  x, y = _data((64,))
  model = sljax.cut(models.mlp(hidden=(32, 32)), *((1, 2) if u else (1,)))
  sl = (sljax.u_shaped if u else sljax.vanilla)(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  central = sljax.centralized(model, optimizer=optax.sgd(0.1))
  out, traffic = sl.predict(sl.init(jax.random.key(0), x[:2]), jnp.asarray(x[:BATCH]))
  ref, _ = central.predict(central.init(jax.random.key(0), x[:2]), jnp.asarray(x[:BATCH]))
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # no labels go up at inference: the uplink is exactly the activations message
  assert traffic["bytes_up"] == sljax.wire_size(sljax.SmashedData(jnp.zeros((BATCH, 32))))


def test_fit_and_evaluate_learn_digits():
  ds = sljax.data.load_digits(seed=0, image=False)
  model = sljax.cut(models.mlp(hidden=(64,)), 1)
  sl = sljax.vanilla(model, client_optimizer=optax.adam(3e-3), server_optimizer=optax.adam(3e-3))
  state = sl.init(jax.random.key(0), ds.x_train[:1])
  state, history = sljax.fit(sl, state, ds.x_train, ds.y_train, key=jax.random.key(1), epochs=5, batch_size=32)
  assert len(history) == 5 and history[-1]["loss"] < history[0]["loss"]
  steps = len(ds.x_train) // 32
  up = sljax.wire_size(sljax.SmashedData(jnp.zeros((32, 64)), jnp.zeros((32,), jnp.int32)))
  assert history[0]["bytes_up"] == steps * up
  result = sljax.evaluate(sl, state, ds.x_test, ds.y_test)
  assert result["accuracy"] > 0.9


def test_codecs_on_the_cut():
  from sljax import codecs

  x, y = _data((64,))
  model = sljax.cut(models.mlp(hidden=(32, 32)), 1)
  opt = optax.adam(1e-2)
  plain = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
  same = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, uplink=codecs.identity(),
                       downlink=codecs.identity())
  q8 = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, uplink=codecs.quantize(bits=8),
                     downlink=codecs.quantize(bits=8))
  ef = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt,
                     uplink=codecs.top_k(fraction=0.25, error_feedback=True))
  p_state, p_losses = _run(plain, plain.init(jax.random.key(0), x[:BATCH]), x, y, steps=20)
  s_state, s_losses = _run(same, same.init(jax.random.key(0), x[:BATCH]), x, y, steps=20)
  chex.assert_trees_all_close((p_state.client.params, p_state.server.params),
                              (s_state.client.params, s_state.server.params), atol=0, rtol=0)
  q_state, q_losses = _run(q8, q8.init(jax.random.key(0), x[:BATCH]), x, y, steps=20)
  assert q_losses[-1] < q_losses[0] and not np.allclose(q_losses, p_losses)
  batch = next(_batches(x, y))
  _, plain_metrics = plain.step(p_state, batch, jax.random.key(0))
  _, q_metrics = q8.step(q_state, batch, jax.random.key(0))
  # 32 float32 values per row become 32 bytes plus 8 bytes of row statistics
  assert plain_metrics["bytes_up"] / q_metrics["bytes_up"] > 2.5
  up, _ = q8.client_forward(q_state.client, *batch, jax.random.key(1))
  back = sljax.from_bytes(sljax.messages.spec_of(up), sljax.to_bytes(up))
  np.testing.assert_array_equal(back.activations.leaves[0].packed, up.activations.leaves[0].packed)
  # the error-feedback residual lives in the client's state and moves with each step
  e_state = ef.init(jax.random.key(0), x[:BATCH])
  e_next, _ = jax.jit(ef.step)(e_state, batch, jax.random.key(1))
  assert float(jnp.abs(e_next.client.codec_state.residual).sum()) > 0
  assert float(jnp.abs(e_state.client.codec_state.residual).sum()) == 0


def test_inference_goes_through_the_uplink_codec():
  from sljax import codecs

  x, _ = _data((64,))
  model = sljax.cut(models.mlp(hidden=(32, 32)), 1)
  opt = optax.sgd(0.1)
  plain = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
  sparse = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, uplink=codecs.top_k(k=4))
  state = plain.init(jax.random.key(0), x[:BATCH])
  xb = jnp.asarray(x[:BATCH])
  out_plain, traffic_plain = plain.predict(state, xb)
  out_sparse, traffic_sparse = sparse.predict(state, xb)  # same params: only the codec differs
  h, _ = model.client.apply(state.client.params, state.client.model_state, xb, key=None, train=False)
  kept = jnp.where(jnp.abs(h) >= jnp.sort(jnp.abs(h), axis=-1)[:, -4:-3], h, 0.0)
  expected, _ = model.server.apply(state.server.params, state.server.model_state, kept, key=None, train=False)
  np.testing.assert_allclose(out_sparse, expected, atol=1e-5)
  assert not np.allclose(out_sparse, out_plain)
  assert traffic_sparse["bytes_up"] < traffic_plain["bytes_up"]


def test_codecs_on_both_u_shaped_links():
  """U-shaped: `uplink` encodes the smashed data and the tail gradient, `downlink` the body's output
  and the cut gradient, each message with its own codec state; the three-call legs equal `step`."""
  from sljax import codecs

  x, y = _data((64,))
  model = sljax.cut(models.mlp(hidden=(32, 32)), 1, 2)
  opt = optax.adam(1e-2)
  plain = sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt)
  same = sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt, uplink=codecs.identity(),
                        downlink=codecs.identity())
  q8 = sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt, uplink=codecs.quantize(bits=8),
                      downlink=codecs.quantize(bits=8))
  p_state, p_losses = _run(plain, plain.init(jax.random.key(0), x[:BATCH]), x, y, steps=20)
  s_state, _ = _run(same, same.init(jax.random.key(0), x[:BATCH]), x, y, steps=20)
  chex.assert_trees_all_close((p_state.client.params, p_state.server.params),
                              (s_state.client.params, s_state.server.params), atol=0, rtol=0)
  q_state, q_losses = _run(q8, q8.init(jax.random.key(0), x[:BATCH]), x, y, steps=20)
  assert q_losses[-1] < q_losses[0] - 0.3 and not np.allclose(q_losses, p_losses)
  np.testing.assert_allclose(q_losses[-1], p_losses[-1], rtol=0.3)
  batch = next(_batches(x, y))
  _, plain_metrics = plain.step(p_state, batch, jax.random.key(0))
  _, q_metrics = q8.step(q_state, batch, jax.random.key(0))
  assert plain_metrics["bytes_up"] / q_metrics["bytes_up"] > 2.5
  assert plain_metrics["bytes_down"] / q_metrics["bytes_down"] > 2.5
  # The legs called one by one, messages through bytes, equal the fused step with the codecs.
  key = jax.random.key(3)
  k_head, k_body, k_tail = jax.random.split(key, 3)
  through = lambda m: sljax.from_bytes(sljax.messages.spec_of(m), sljax.to_bytes(m))  # noqa: E731
  up1, head = q8.client_forward(q_state.client, batch[0], k_head)
  down1, pending = q8.server_forward(q_state.server, through(up1), k_body)
  up2, tail, _ = q8.client_tail_step(q_state.client, head, through(down1), batch[1], k_tail)
  server, down2 = q8.server_backward(q_state.server, pending, through(up2))
  client = q8.client_backward(q_state.client, tail, through(down2))
  fused, _ = q8.step(q_state, batch, key)
  chex.assert_trees_all_close((client, server), (fused.client, fused.server), atol=1e-6)
  assert set(client.codec_state) == {"smashed", "tail_grad"} and set(server.codec_state) == {"body", "cut_grad"}
  out_q, traffic = q8.predict(q_state, jnp.asarray(x[:BATCH]))
  out_p, _ = plain.predict(q_state, jnp.asarray(x[:BATCH]))  # same params: only the codecs differ
  assert not np.allclose(out_q, out_p) and np.allclose(out_q, out_p, atol=0.1)
  assert traffic["bytes_up"] < plain_metrics["bytes_up"]


@pytest.mark.parametrize("u", [False, True], ids=["vanilla", "u_shaped"])
def test_predict_is_its_inference_legs(u):
  """`predict` is `client_infer`, `server_infer` (and U-shaped `client_tail_infer`), with messages
  that survive bytes; each codec from a fresh state with the key fold_in(key, CODEC_STREAM[+1])."""
  from sljax import codecs

  x, _ = _data((64,))
  model = sljax.cut(models.mlp(hidden=(32, 32)), *((1, 2) if u else (1,)))
  q8 = codecs.quantize(bits=8)  # stochastic rounding: the codec keys matter
  sl = (sljax.u_shaped if u else sljax.vanilla)(model, client_optimizer=optax.sgd(0.1),
                                                server_optimizer=optax.sgd(0.1), uplink=q8, downlink=q8)
  state = sl.init(jax.random.key(0), x[:BATCH])
  xb, key = jnp.asarray(x[:BATCH]), jax.random.key(9)
  through = lambda m: sljax.from_bytes(sljax.messages.spec_of(m), sljax.to_bytes(m))  # noqa: E731
  c, s = state.client, state.server
  head = (c.params["head"], c.model_state["head"]) if u else (c.params, c.model_state)
  h, _ = model.client.apply(*head, xb, key=None, train=False)
  up = q8.encode(h, q8.init(h), jax.random.fold_in(key, sljax.protocol.CODEC_STREAM))[0]
  out, _ = model.server.apply(s.params, s.model_state, q8.decode(up), key=None, train=False)
  if u:
    body = q8.encode(out, q8.init(out), jax.random.fold_in(key, sljax.protocol.CODEC_STREAM + 1))[0]
    out, _ = model.tail.apply(c.params["tail"], c.model_state["tail"], q8.decode(body), key=None, train=False)
  for k in (key, None):
    predicted, traffic = sl.predict(state, xb, k)
    answer = sl.server_infer(s, through(sl.client_infer(c, xb, k)), *((k,) if u else ()))
    legs = sl.client_tail_infer(c, through(answer)) if u else answer.logits
    np.testing.assert_array_equal(predicted, legs)
    if k is key:
      np.testing.assert_array_equal(predicted, out)
  assert traffic["bytes_up"] == len(sljax.to_bytes(sl.client_infer(c, xb)))
  assert traffic["bytes_down"] == len(sljax.to_bytes(answer))
  with pytest.raises(ValueError, match=r"message.activations: expected shape \(B, 32\) float32, got \(16, 31\)"):
    sl.server_infer(s, sljax.SmashedData(q8.encode(h[:, :31], q8.init(h[:, :31]), key)[0]))
