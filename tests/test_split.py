"""Model adapters: NNX constructors honour the init key; params read and written by layer name."""

import functools

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

BATCH = 16


def _data(shape, n=BATCH * 4, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int32)


class _NNXBlock(nnx.Module):
  def __init__(self, din, dout, *, rngs):
    self.linear = nnx.Linear(din, dout, rngs=rngs)
    self.bn = nnx.BatchNorm(dout, rngs=rngs)
    self.dropout = nnx.Dropout(0.25, rngs=rngs)

  def __call__(self, x):
    return self.dropout(jax.nn.relu(self.bn(self.linear(x))))


# --- NNX modules from constructors ----------------------------------------------------------


def test_nnx_constructor_takes_its_parameters_from_the_init_key():
  stage = sljax.nnx_stage(functools.partial(_NNXBlock, 12, 16))
  x = jnp.ones((2, 12))
  a, a_state = stage.init(jax.random.key(0), x)
  b, _ = stage.init(jax.random.key(1), x)
  again, _ = stage.init(jax.random.key(0), x)
  assert not np.allclose(a["linear"]["kernel"], b["linear"]["kernel"])
  chex.assert_trees_all_equal(a, again)
  assert jax.tree.map(jnp.shape, a_state) == {"bn": {"mean": (16,), "var": (16,)}}


def test_nnx_built_module_keeps_its_own_parameters():
  module = nnx.Linear(12, 4, rngs=nnx.Rngs(3))
  stage = sljax.nnx_stage(module)
  a, _ = stage.init(jax.random.key(0), jnp.ones((2, 12)))
  b, _ = stage.init(jax.random.key(1), jnp.ones((2, 12)))
  np.testing.assert_array_equal(a["kernel"], module.kernel[...])
  chex.assert_trees_all_equal(a, b)


def test_nnx_constructor_init_key_reaches_the_protocols():
  model = sljax.split_model(sljax.nnx_stage(lambda rngs: nnx.Linear(12, 16, rngs=rngs)),
                            sljax.nnx_stage(lambda rngs: nnx.Linear(16, 10, rngs=rngs)))
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  x = jnp.ones((2, 12))
  a, b = sl.init(jax.random.key(0), x), sl.init(jax.random.key(1), x)
  assert not np.allclose(a.client.params["kernel"], b.client.params["kernel"])
  assert not np.allclose(a.server.params["kernel"], b.server.params["kernel"])


def test_nnx_constructor_halves_equal_centralized():
  x, y = _data((12,))
  model = sljax.split_model(sljax.nnx_stage(lambda rngs: _NNXBlock(12, 16, rngs=rngs)),
                            sljax.nnx_stage(lambda rngs: nnx.Linear(16, 10, rngs=rngs)))
  opt = optax.sgd(0.1)
  sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
  central = sljax.centralized(model, optimizer=opt)
  s_state, c_state = sl.init(jax.random.key(0), x[:2]), central.init(jax.random.key(0), x[:2])
  chex.assert_trees_all_equal((s_state.client.params, s_state.server.params), c_state.params)
  s_step, c_step = jax.jit(sl.step), jax.jit(central.step)
  for i in range(6):
    batch = jnp.asarray(x[i * 8:(i + 1) * 8]), jnp.asarray(y[i * 8:(i + 1) * 8])
    s_state, s_metrics = s_step(s_state, batch, jax.random.key(100 + i))
    c_state, c_metrics = c_step(c_state, batch, jax.random.key(100 + i))
    np.testing.assert_allclose(s_metrics["loss"], c_metrics["loss"], atol=1e-6)
  chex.assert_trees_all_close((s_state.client.params, s_state.server.params), c_state.params, atol=1e-6)
  chex.assert_trees_all_close((s_state.client.model_state, s_state.server.model_state), c_state.model_state,
                              atol=1e-6)
  assert not np.allclose(s_state.client.model_state["bn"]["mean"], 0.0)  # batch statistics moved
  # dropout draws from the step key: two keys, two different smashed batches
  out_a, _ = sl.client_forward(s_state.client, *batch, jax.random.key(1))
  out_b, _ = sl.client_forward(s_state.client, *batch, jax.random.key(2))
  assert not np.allclose(out_a.activations, out_b.activations)


# --- layers by name -------------------------------------------------------------------------


def test_layer_names_follow_the_stack_across_cuts():
  layers = models.mlp(hidden=(16, 16))
  assert sljax.cut(layers, 1).client.layer_names == ("hidden_0",)
  assert sljax.cut(layers, 1).server.layer_names == ("hidden_1", "output")
  assert sljax.cut(layers, 2).server.layer_names == ("output",)
  assert sljax.cut(layers, 1, 2).layer_names == ("hidden_0", "hidden_1", "output")
  unnamed = [nn.Dense(8), jax.nn.relu, nn.Dense(10)]
  assert sljax.cut(unnamed, 1).server.layer_names == ("layer_1", "layer_2")
  assert sljax.cut(unnamed, 2).client.layer_names == ("layer_0", "layer_1")
  assert sljax.cut(models.cnn(), 2).server.layer_names == ("hidden", "output")


def test_read_and_write_a_layer_by_name_changes_the_output():
  model = sljax.cut(models.mlp(hidden=(16, 16)), 1)
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  x, _ = _data((64,), n=4)
  state = sl.init(jax.random.key(0), x)
  output = model.server.get_layer(state.server.params, "output")
  assert output is state.server.params[1]
  assert model.client.get_layer(state.client.params, "hidden_0") is state.client.params[0]

  # the output layer made to ignore its input: every row of the prediction is its bias
  bias = jnp.arange(10, dtype=jnp.float32)
  params = model.server.set_layer(state.server.params, "output", {"kernel": jnp.zeros_like(output["kernel"]),
                                                                  "bias": bias})
  assert params[0] is state.server.params[0] and state.server.params[1] is output  # nothing else, nothing mutated
  logits, _ = sl.predict(state.replace(server=state.server.replace(params=params)), x)
  np.testing.assert_array_equal(logits, jnp.broadcast_to(bias, (4, 10)))
  # and it trains from there: the optimizer state fits the new params
  state = state.replace(server=state.server.replace(params=params))
  jax.jit(sl.step)(state, (x, jnp.zeros(4, jnp.int32)), jax.random.key(1))


def test_layers_by_name_in_u_shaped_and_centralized_params():
  model = sljax.cut(models.mlp(hidden=(16, 16)), 1, 2)
  opt = optax.sgd(0.1)
  x = jnp.ones((2, 64))
  split_state = sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt).init(jax.random.key(0), x)
  central_state = sljax.centralized(model, optimizer=opt).init(jax.random.key(0), x)
  whole = model.compose()
  assert whole.layer_names == ("client", "server", "tail")
  # the tail of the U-shaped client, and the same layer found inside the composed model
  tail = model.tail.get_layer(split_state.client.params["tail"], "output")
  chex.assert_trees_all_equal(tail, whole.get_layer(central_state.params, "output"))
  chex.assert_trees_all_equal(split_state.server.params, whole.get_layer(central_state.params, "server"))
  with pytest.raises(ValueError, match=r"params: expected a tuple with one entry per layer of \('hidden_0',\), "
                                       r"got a dict with keys \['head', 'tail'\]"):
    model.client.get_layer(split_state.client.params, "hidden_0")


def test_nested_layers_by_name():
  layers = models.cnn(channels=(4,), hidden=8)
  model = sljax.cut(layers, 1)
  params, _ = model.server.init(jax.random.key(0), jnp.ones((2, 4, 4, 4)))
  assert model.server.get_layer(params, "hidden") is params[0]
  assert model.server.get_layer(params, "dense") is params[0][1]  # inside `hidden`: (flatten, dense)
  dense = model.server.get_layer(params, "dense")
  new = jax.tree.map(lambda a: a + 1, dense)
  updated = model.server.set_layer(params, "dense", new)
  assert updated[0][1] is new and updated[0][0] is params[0][0] and updated[1] is params[1]


def test_unknown_layer_name_lists_the_known_names():
  model = sljax.cut(models.mlp(hidden=(16, 16)), 1)
  params, _ = model.server.init(jax.random.key(0), jnp.ones((2, 16)))
  with pytest.raises(ValueError, match=r"^name: expected one of \('hidden_1', 'output'\), got 'outptu'$"):
    model.server.get_layer(params, "outptu")
  with pytest.raises(ValueError, match=r"^name: expected one of \('hidden_1', 'output'\), got 'hidden_0'$"):
    model.server.set_layer(params, "hidden_0", params[0])
  leaf = sljax.linen_stage(nn.Dense(3))
  with pytest.raises(ValueError, match=r"^name: this stage has no named layers \(stacks made by sequential or cut "
                                       r"have\), got 'output'$"):
    leaf.get_layer({}, "output")


def test_set_layer_checks_shapes():
  model = sljax.cut(models.mlp(hidden=(16,)), 1)
  params, _ = model.server.init(jax.random.key(0), jnp.ones((2, 16)))
  bad = {"bias": jnp.zeros(10), "kernel": jnp.zeros((16, 11))}
  with pytest.raises(ValueError, match=r"^value: expected params like those of layer 'output', "
                                       r"\{\['bias'\]: \(10,\) float32, \['kernel'\]: \(16, 10\) float32\}, "
                                       r"got \{\['bias'\]: \(10,\) float32, \['kernel'\]: \(16, 11\) float32\}$"):
    model.server.set_layer(params, "output", bad)


def test_layer_names_must_be_distinct():
  a = sljax.linen_stage(nn.Dense(4), name="a")
  with pytest.raises(ValueError,
                     match=r"^layers: expected distinct layer names, got \('a', 'a'\) \('a' more than once\)$"):
    sljax.cut([a, a], 1)
  with pytest.raises(ValueError, match=r"^layers: expected distinct layer names, got \('a', 'layer_1', 'a'\)"):
    sljax.sequential(a, jax.nn.relu, a)
