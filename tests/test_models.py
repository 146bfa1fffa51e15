"""The models worth cutting (ResNet-style CNN, ViT, 1-D DS-CNN): split training equals centralized
training on real offline data, cut points are named, and a wrong-rank input fails at init."""

import doctest
import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import models

BATCH = 16
STEPS = 4
central_opt = optax.adam(1e-2)


def KEY(seed):  # noqa: N802 -- a constant-like helper
  """Keys of the "rbg" implementation: a model's init compiles about 3x faster than with threefry."""
  return jax.random.key(seed, impl="rbg")


@functools.cache
def _digits():
  ds = sljax.data.load_digits()
  return ds.x_train[:BATCH], ds.y_train[:BATCH]


@functools.cache
def _mnist1d():
  ds = sljax.data.make_mnist1d(num_samples=100)
  return ds.x_train[:BATCH], ds.y_train[:BATCH]


# (layers, data, cut): tiny widths, one cut each inside the stack, where the smashed data is a feature map.
CASES = {
    "resnet": (lambda: models.resnet(channels=(4, 8)), _digits, 2),
    "vit": (lambda: models.vit(patch=4, dim=8, depth=1, heads=2, mlp_dim=16, dropout=0.1), _digits, 2),
    "ds_cnn1d": (lambda: models.ds_cnn1d(stem=4, channels=(8, 8), strides=(2, 1), kernel=3), _mnist1d, 3),
}


# The tests check math, not speed: compiled with XLA's backend optimizations off, which halves the compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _init_and_train_both(sl, central, x, y):
  """Init, then STEPS steps of split and of centralized training from the same start on one batch:
  one compiled program.

  The centralized state is the split state's parts side by side (`centralized.init` splits the
  key as the split protocols do; tests/test_protocol.py checks that).
  """

  def run(x, y):
    state = sl.init(KEY(0), x)
    params = (state.client.params, state.server.params)
    c_state = sljax.PartyState(params, (state.client.model_state, state.server.model_state),
                               central_opt.init(params), state.client.input_spec)

    def one_step(carry, key):
      s, c = carry
      s, s_metrics = sl.step(s, (x, y), key)
      c, c_metrics = central.step(c, (x, y), key)
      return (s, c), (s_metrics["loss"], c_metrics["loss"])

    return jax.lax.scan(one_step, (state, c_state), jax.random.split(KEY(1), STEPS))

  x, y = jnp.asarray(x), jnp.asarray(y)
  (s_state, c_state), (s_losses, c_losses) = jax.jit(run).lower(x, y).compile(_FAST_COMPILE)(x, y)
  return s_state, c_state, np.asarray(s_losses), np.asarray(c_losses)


@pytest.mark.parametrize("case", list(CASES))
def test_split_equals_centralized(case):
  make_layers, data, k = CASES[case]
  x, y = data()
  model = sljax.cut(make_layers(), k)
  sl = sljax.vanilla(model, client_optimizer=central_opt, server_optimizer=central_opt)
  central = sljax.centralized(model, optimizer=central_opt)
  s_state, c_state, s_losses, c_losses = _init_and_train_both(sl, central, x, y)
  assert np.all(np.isfinite(s_losses)) and s_losses[-1] < s_losses[0]  # it trains
  np.testing.assert_allclose(s_losses, c_losses, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close((s_state.client.params, s_state.server.params), c_state.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close((s_state.client.model_state, s_state.server.model_state), c_state.model_state,
                              atol=1e-5, rtol=1e-5)


def test_vit_pools():
  """The class token, or the mean over the tokens (no class token then): shapes only, traced, not compiled."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  for pool, tokens in (("cls", 5), ("mean", 4)):
    layers = models.vit(patch=4, dim=8, depth=1, heads=2, mlp_dim=8, pool=pool)
    stack = sljax.sequential(*layers)
    params, model_state = jax.eval_shape(stack.init, KEY(0), x)
    assert params[0]["positions"].shape == (1, tokens, 8)
    assert ("cls" in params[0]) == (pool == "cls")
    out = jax.eval_shape(lambda p, s, x: stack.apply(p, s, x, key=None, train=False)[0], params, model_state, x)
    assert out.shape == (2, 10)


def test_cut_points_name_every_cut():
  assert models.cut_points(models.resnet(channels=(4, 8))) == [
      (1, "stem"), (2, "block_0"), (3, "block_1"), (4, "pool")]
  assert [n for _, n in models.cut_points(models.vit(dim=8, depth=2, heads=2))] == [
      "embed", "block_0", "block_1", "pool"]
  assert [n for _, n in models.cut_points(models.ds_cnn1d(channels=(8,), strides=(1,)))] == ["stem", "ds_0", "pool"]
  # The name is the last layer on the client at that cut; unnamed layers are named as `cut` names them.
  for k, name in models.cut_points(models.vit(dim=8, depth=2, heads=2)):
    assert sljax.cut(models.vit(dim=8, depth=2, heads=2), k).client.layer_names[-1] == name
  assert models.cut_points([jax.nn.relu, jax.nn.relu]) == [(1, "layer_0")]
  with pytest.raises(ValueError, match=r"^layers: expected at least 2 layers to cut, got 1$"):
    models.cut_points(models.mlp(hidden=())[:1])


@pytest.mark.parametrize("layers, x, expected", [
    (models.resnet(channels=(4,)), jnp.ones((2, 64)), r"\(B, height, width, channels\), got \(2, 64\) float32"),
    (models.vit(dim=8, depth=1, heads=2), jnp.ones((2, 8, 8)),
     r"\(B, height, width, channels\), got \(2, 8, 8\) float32"),
    (models.vit(patch=3, dim=8, depth=1, heads=2), jnp.ones((2, 8, 8, 1)),
     r"\(B, height, width, channels\) with height and width multiples of the patch size 3, got \(2, 8, 8, 1\)"),
    (models.ds_cnn1d(channels=(4,), strides=(1,)), jnp.ones((2, 40)),
     r"\(B, length, channels\), got \(2, 40\) float32"),
], ids=["resnet", "vit", "vit_patch", "ds_cnn1d"])
def test_wrong_input_fails_at_init(layers, x, expected):
  with pytest.raises(sljax.InputShapeError, match="^expected shape " + expected):
    sljax.sequential(*layers).init(jax.random.key(0), x)
  sl = sljax.vanilla(sljax.cut(layers, 1), client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="^x: the client half expects shape " + expected):
    sl.init(jax.random.key(0), x)


def test_factories_check_their_arguments():
  with pytest.raises(ValueError, match=r"^heads: expected a divisor of dim=10, got 4$"):
    models.vit(dim=10, heads=4)
  with pytest.raises(ValueError, match=r"^pool: expected one of \('cls', 'mean'\), got 'max'$"):
    models.vit(pool="max")
  with pytest.raises(ValueError, match=r"^strides: expected one stride per block of channels=\(8, 8\), got \(2,\)$"):
    models.ds_cnn1d(channels=(8, 8), strides=(2,))
  with pytest.raises(ValueError, match=r"^channels: expected a non-empty sequence of positive ints, got \(\)$"):
    models.resnet(channels=())


def test_docstring_examples_run():
  for name in ("layers", "resnet", "vit", "sensor"):
    module = importlib.import_module(f"sljax.models.{name}")  # `models.resnet` is the factory, not the module
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.failed == 0 and results.attempted > 0, module.__name__
