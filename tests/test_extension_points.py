"""Defense hooks in the legs: a client-side loss term (NoPeek-style) and a server-side transform of
the cut gradient (label protection), each held to a hand-written reference."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import models, protocol

BATCH = 16
ALPHA = 0.3


def _data(n=BATCH * 4, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, 24)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int32)


def _batches(x, y, steps):
  n = x.shape[0] // BATCH
  return [(jnp.asarray(x[(i % n) * BATCH:(i % n + 1) * BATCH]), jnp.asarray(y[(i % n) * BATCH:(i % n + 1) * BATCH]))
          for i in range(steps)]


def _penalty(x, h):
  del x
  return ALPHA * jnp.mean(h**2)


def _model(u):
  return sljax.cut(models.mlp(hidden=(16, 16)), *((1, 2) if u else (1,)))


def _parts(state, u):
  c = state.client.params
  return (c["head"], state.server.params, c["tail"]) if u else (c, state.server.params)


@pytest.mark.parametrize("u", [False, True], ids=["vanilla", "u_shaped"])
def test_client_loss_equals_centralized_with_the_term(u):
  """Split training with a client term follows jax.grad of (task loss + term) on the composed model."""
  x, y = _data()
  model = _model(u)
  opt = optax.adam(1e-2)
  sl = (sljax.u_shaped if u else sljax.vanilla)(model, client_optimizer=opt, server_optimizer=opt,
                                                client_loss=_penalty)
  state = sl.init(jax.random.key(0), x[:BATCH])
  model_states = (state.client.model_state["head"], state.server.model_state, state.client.model_state["tail"]) \
      if u else (state.client.model_state, state.server.model_state)

  def objective(params, batch, key):  # the composed model, written out part by part
    xb, yb = batch
    keys = jax.random.split(key, len(params))
    h, _ = model.parts[0].apply(params[0], model_states[0], xb, key=keys[0], train=True)
    out = h
    for part, p, s, k in zip(model.parts[1:], params[1:], model_states[1:], keys[1:]):
      out, _ = part.apply(p, s, out, key=k, train=True)
    task = protocol.softmax_cross_entropy(out, yb)
    return task + ALPHA * jnp.mean(h**2), (task, ALPHA * jnp.mean(h**2))

  @jax.jit
  def reference_step(params, opt_state, batch, key):
    (_, (task, term)), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, task, term

  params = _parts(state, u)
  opt_state = opt.init(params)
  step = jax.jit(sl.step)
  for i, batch in enumerate(_batches(x, y, 12)):
    key = jax.random.key(10 + i)
    state, metrics = step(state, batch, key)
    params, opt_state, task, term = reference_step(params, opt_state, batch, key)
    np.testing.assert_allclose(metrics["loss"], task, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["client_loss"], term, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(_parts(state, u), params, atol=1e-5, rtol=1e-5)
  # and the term mattered: without it the run ends elsewhere
  plain = (sljax.u_shaped if u else sljax.vanilla)(model, client_optimizer=opt, server_optimizer=opt)
  p_state = plain.init(jax.random.key(0), x[:BATCH])
  for i, batch in enumerate(_batches(x, y, 12)):
    p_state, _ = jax.jit(plain.step)(p_state, batch, jax.random.key(10 + i))
  assert not all(np.allclose(a, b, atol=1e-4)
                 for a, b in zip(jax.tree.leaves(_parts(p_state, u)[0]), jax.tree.leaves(_parts(state, u)[0])))


def test_client_loss_three_jitted_calls_equal_the_fused_step():
  """The deployment path: each leg jitted on its own, the pending values crossing `jit`."""
  x, y = _data()
  opt = optax.adam(1e-2)
  sl = sljax.vanilla(_model(False), client_optimizer=opt, server_optimizer=opt, client_loss=_penalty)
  state = sl.init(jax.random.key(0), x[:BATCH])
  batch = _batches(x, y, 1)[0]
  key = jax.random.key(4)
  k_c, k_s = jax.random.split(key)
  up, pending = jax.jit(sl.client_forward)(state.client, *batch, k_c)
  server, down, metrics = jax.jit(sl.server_step)(state.server, sljax.from_bytes(sljax.messages.spec_of(up),
                                                                                  sljax.to_bytes(up)), k_s)
  client = jax.jit(sl.client_backward)(state.client, pending, down)
  fused, fused_metrics = jax.jit(sl.step)(state, batch, key)
  chex.assert_trees_all_close((client, server), (fused.client, fused.server), atol=1e-6, rtol=1e-6)
  assert "client_loss" not in metrics  # the server never sees the term
  np.testing.assert_allclose(pending.metrics["client_loss"], fused_metrics["client_loss"], rtol=1e-6)
  # the term's gradient is in the client's update: the plain pullback alone gives another one
  plain = sljax.vanilla(_model(False), client_optimizer=opt, server_optimizer=opt)
  _, plain_pending = plain.client_forward(state.client, *batch, k_c)
  assert not np.allclose(plain.client_backward(state.client, plain_pending, down).params[0]["Dense_0"]["kernel"],
                         client.params[0]["Dense_0"]["kernel"])


@pytest.mark.parametrize("u", [False, True], ids=["vanilla", "u_shaped"])
def test_zero_client_loss_equals_the_plain_run_bitwise(u):
  x, y = _data()
  opt = optax.adam(1e-2)
  factory = sljax.u_shaped if u else sljax.vanilla
  plain = factory(_model(u), client_optimizer=opt, server_optimizer=opt)
  zero = factory(_model(u), client_optimizer=opt, server_optimizer=opt, client_loss=lambda x, h: 0.0 * jnp.mean(h**2))
  a = b = plain.init(jax.random.key(0), x[:BATCH])
  for i, batch in enumerate(_batches(x, y, 4)):
    a, _ = jax.jit(plain.step)(a, batch, jax.random.key(i))
    b, metrics = jax.jit(zero.step)(b, batch, jax.random.key(i))
  chex.assert_trees_all_equal(a, b)
  assert float(metrics["client_loss"]) == 0.0


def test_client_loss_with_a_key():
  """A three-argument term gets fold_in(client key, CLIENT_LOSS_STREAM)."""
  x, y = _data()
  model = _model(False)

  def noisy(x, h, key):
    del x
    return jnp.mean(h * jax.random.normal(key, h.shape, h.dtype))

  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1), client_loss=noisy)
  state = sl.init(jax.random.key(0), x[:BATCH])
  xb, yb = _batches(x, y, 1)[0]
  key = jax.random.key(7)
  _, metrics = sl.step(state, (xb, yb), key)
  k_c = jax.random.split(key)[0]
  h, _ = model.client.apply(state.client.params, state.client.model_state, xb, key=k_c, train=True)
  expected = noisy(xb, h, jax.random.fold_in(k_c, protocol.CLIENT_LOSS_STREAM))
  np.testing.assert_allclose(metrics["client_loss"], expected, rtol=1e-6)


def _noise_and_labels(g, labels, key):
  """Noise scaled per row by whether the label is odd: uses both the labels and the key."""
  return g * (labels % 2).astype(g.dtype)[:, None] + 0.5 * jax.random.normal(key, g.shape, g.dtype)


def test_cut_gradient_transform_is_what_the_client_receives():
  x, y = _data()
  opt = optax.sgd(0.1)
  plain = sljax.vanilla(_model(False), client_optimizer=opt, server_optimizer=opt)
  noisy = sljax.vanilla(_model(False), client_optimizer=opt, server_optimizer=opt,
                        cut_gradient_transform=_noise_and_labels)
  state = plain.init(jax.random.key(0), x[:BATCH])
  batch = _batches(x, y, 1)[0]
  key = jax.random.key(3)
  k_c, k_s = jax.random.split(key)
  up, pending = plain.client_forward(state.client, *batch, k_c)
  plain_server, plain_down, _ = plain.server_step(state.server, up, k_s)
  server, down, _ = noisy.server_step(state.server, up, k_s)
  expected = _noise_and_labels(plain_down.grad, batch[1], jax.random.fold_in(k_s, protocol.CUT_GRADIENT_STREAM))
  np.testing.assert_array_equal(down.grad, expected)
  assert not np.allclose(down.grad, plain_down.grad)
  chex.assert_trees_all_equal(server, plain_server)  # the server trains on its loss, untouched
  # in the fused step the client half takes exactly the transformed gradient
  fused, _ = noisy.step(state, batch, key)
  chex.assert_trees_all_close(fused.client, plain.client_backward(state.client, pending, sljax.CutGradient(expected)),
                              atol=1e-7)


def test_zero_cut_gradient_freezes_the_client_while_the_server_trains():
  x, y = _data()
  opt = optax.sgd(0.1)
  plain = sljax.vanilla(_model(False), client_optimizer=opt, server_optimizer=opt)
  frozen = sljax.vanilla(_model(False), client_optimizer=opt, server_optimizer=opt,
                         cut_gradient_transform=lambda g, labels, key: g * 0.0)
  start = a = b = plain.init(jax.random.key(0), x[:BATCH])
  for i, batch in enumerate(_batches(x, y, 3)):
    a, _ = jax.jit(plain.step)(a, batch, jax.random.key(i))
    b, _ = jax.jit(frozen.step)(b, batch, jax.random.key(i))
  chex.assert_trees_all_equal(b.client.params, start.client.params)
  assert not np.allclose(b.server.params[0]["Dense_0"]["kernel"], start.server.params[0]["Dense_0"]["kernel"])
  assert not np.allclose(a.client.params[0]["Dense_0"]["kernel"], start.client.params[0]["Dense_0"]["kernel"])


def test_hooks_take_callables_only():
  model, opt = _model(False), optax.sgd(0.1)
  with pytest.raises(TypeError, match=r"client_loss: expected a callable \(x, smashed\[, key\]\) -> scalar or None, "
                                      r"got float"):
    sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, client_loss=0.1)
  with pytest.raises(TypeError, match=r"cut_gradient_transform: expected a callable \(grad, labels, key\) -> grad "
                                      r"or None, got str"):
    sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, cut_gradient_transform="max_norm")
  with pytest.raises(TypeError, match="client_loss: expected a callable"):
    sljax.u_shaped(_model(True), client_optimizer=opt, server_optimizer=opt, client_loss=[])


def test_hooks_check_what_they_return():
  x, y = _data()
  model, opt = _model(False), optax.sgd(0.1)
  batch = _batches(x, y, 1)[0]
  per_row = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt,
                          client_loss=lambda x, h: jnp.mean(h**2, axis=-1))
  state = per_row.init(jax.random.key(0), x[:BATCH])
  with pytest.raises(ValueError, match=r"client_loss: expected a float scalar, got shape \(16,\) float32"):
    per_row.step(state, batch, jax.random.key(1))
  pooled = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt,
                         cut_gradient_transform=lambda g, labels, key: g.mean(0))
  with pytest.raises(ValueError, match=r"cut_gradient_transform: expected a gradient like its input \(\(16, 16\), "
                                       r"dtype\('float32'\)\), got \(\(16,\), dtype\('float32'\)\)"):
    pooled.step(state, batch, jax.random.key(1))


def test_docstring_examples_run():
  for fn in (sljax.vanilla, sljax.u_shaped):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs = {"jax": jax, "jnp": jnp, "cut": sljax.cut, "vanilla": sljax.vanilla, "u_shaped": sljax.u_shaped}
    for test in doctest.DocTestFinder().find(fn, globs=globs):
      runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, fn.__name__
