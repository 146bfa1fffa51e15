"""Bad input gets an error naming the argument, the expected and the actual shape."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import sljax
from sljax import models


@pytest.fixture(scope="module")
def setup():
  model = sljax.cut(models.mlp(hidden=(32,)), 1)
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), jnp.ones((2, 64)))
  return sl, state


@pytest.mark.parametrize(
    "x, y, match",
    [
        (jnp.ones((16, 63)), jnp.zeros(16, jnp.int32), r"x: expected shape \(B, 64\) float32, got \(16, 63\) float32"),
        (jnp.ones((16, 8, 8)), jnp.zeros(16, jnp.int32), r"x: expected shape \(B, 64\) float32, got \(16, 8, 8\) float32"),
        (jnp.ones((16, 64), jnp.int32), jnp.zeros(16, jnp.int32), r"x: expected shape \(B, 64\) float32, got \(16, 64\) int32"),
        (jnp.ones((16, 64)), jnp.zeros(15, jnp.int32), r"labels: expected shape \(16,\) integer class labels, got \(15,\) int32"),
        (jnp.ones((16, 64)), jnp.zeros(16), r"labels: expected shape \(16,\) integer class labels, got \(16,\) float32"),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_batch(setup, x, y, match, jit):
  sl, state = setup
  step = jax.jit(sl.step) if jit else sl.step
  with pytest.raises(ValueError, match=match):
    step(state, (x, y), jax.random.key(0))


def test_bad_batch_at_predict(setup):
  sl, state = setup
  with pytest.raises(ValueError, match=r"x: expected shape \(B, 64\) float32, got \(4, 65\) float32"):
    sl.predict(state, jnp.ones((4, 65)))


def test_server_rejects_smashed_data_of_the_wrong_shape(setup):
  sl, state = setup
  bad = sljax.SmashedData(jnp.ones((4, 31)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"message.activations: expected shape \(B, 32\) float32, got \(4, 31\) float32"):
    sl.server_step(state.server, bad, jax.random.key(0))


@pytest.mark.parametrize(
    "k, k2, match",
    [
        (0, None, r"k: cut index must be in \[1, 2\] for a stack of 3 layers, got 0"),
        (3, None, r"k: cut index must be in \[1, 2\] for a stack of 3 layers, got 3"),
        (1, 1, r"k2: second cut index must be in \[2, 2\] for k=1 and 3 layers, got 1"),
        (1, 3, r"k2: second cut index must be in \[2, 2\] for k=1 and 3 layers, got 3"),
    ],
)
def test_cut_index_out_of_range(k, k2, match):
  with pytest.raises(ValueError, match=match):
    sljax.cut(models.mlp(hidden=(8, 8)), k, k2)


def test_mismatched_halves():
  model = sljax.split_model(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(16, 10, rngs=nnx.Rngs(1)))
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"mismatched halves: the client part outputs shape \(2, 32\) float32, "
                                       r"which the server part cannot take"):
    sl.init(jax.random.key(0), jnp.ones((2, 64)))


def test_wrong_input_at_init():
  model = sljax.split_model(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 10, rngs=nnx.Rngs(1)))
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"x: the client half cannot take input of shape \(2, 60\) float32"):
    sl.init(jax.random.key(0), jnp.ones((2, 60)))


def test_protocol_and_model_shape_must_agree():
  with pytest.raises(ValueError, match="model: vanilla split learning takes a two-part model"):
    sljax.vanilla(sljax.cut(models.mlp(hidden=(8, 8)), 1, 2), client_optimizer=optax.sgd(1), server_optimizer=optax.sgd(1))
  with pytest.raises(ValueError, match="model: U-shaped split learning takes a three-part model"):
    sljax.u_shaped(sljax.cut(models.mlp(hidden=(8, 8)), 1), client_optimizer=optax.sgd(1), server_optimizer=optax.sgd(1))


def test_not_a_part():
  with pytest.raises(TypeError, match="part: expected a Stage, a flax.linen.Module, a flax.nnx.Module or a function, got int"):
    sljax.split_model(3, jax.nn.relu)


def _trainers(model, **kwargs):
  opt = optax.sgd(0.1)
  factory = sljax.u_shaped if model.is_u_shaped else sljax.vanilla
  return {"split": factory(model, client_optimizer=opt, server_optimizer=opt, **kwargs),
          "centralized": sljax.centralized(model, optimizer=opt, **kwargs)}


@pytest.mark.parametrize("trainer", ["split", "centralized"])
@pytest.mark.parametrize(
    "layers, cuts, x, match",
    [
        (lambda: models.mlp(hidden=(8,)), (1,), jnp.ones((2, 8, 8)),
         r"^x: the client half expects shape \(B, features\), got \(2, 8, 8\) float32"),
        (lambda: models.mlp(hidden=(8, 8)), (1, 2), jnp.ones((2, 8, 8)),
         r"^x: the client half expects shape \(B, features\), got \(2, 8, 8\) float32"),
        (lambda: models.mlp(hidden=(8,)), (1,), jnp.ones((64,)),
         r"^x: the client half expects shape \(B, features\), got \(64,\) float32"),
        (lambda: models.cnn(channels=(4,), hidden=8), (1,), jnp.ones((2, 64)),
         r"^x: the client half expects shape \(B, height, width, channels\), got \(2, 64\) float32"),
        (lambda: models.cnn(channels=(4,), hidden=8), (1,), jnp.ones((2, 8, 8)),
         r"^x: the client half expects shape \(B, height, width, channels\), got \(2, 8, 8\) float32"),
        (lambda: models.cnn1d(channels=(4,), hidden=8), (1,), jnp.ones((2, 40)),
         r"^x: the client half expects shape \(B, length, channels\), got \(2, 40\) float32"),
    ],
    ids=["mlp_images", "mlp_images_u_shaped", "mlp_unbatched", "cnn_flat", "cnn_no_channel_axis", "cnn1d_flat"],
)
def test_wrong_input_rank_fails_at_init(layers, cuts, x, match, trainer):
  t = _trainers(sljax.cut(layers(), *cuts))[trainer]
  with pytest.raises(ValueError, match=match):
    t.init(jax.random.key(0), x)


def test_halves_of_different_ranks():
  conv, mlp = models.cnn(channels=(4,))[:1], models.mlp(hidden=(8,))
  model = sljax.split_model(sljax.sequential(*conv), sljax.sequential(*mlp))
  with pytest.raises(ValueError, match=r"^mismatched halves: the client part outputs shape \(2, 4, 4, 4\) float32, "
                                       r"but the server part expects shape \(B, features\)"):
    _trainers(model)["split"].init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))


@pytest.mark.parametrize("trainer", ["split", "centralized"])
def test_outputs_the_loss_cannot_take_fail_at_init(trainer):
  """A Linen Dense takes any rank: images through an MLP give (B, 8, classes) logits, caught at init."""
  import flax.linen as nn

  t = _trainers(sljax.cut([nn.Dense(16), jax.nn.relu, nn.Dense(10)], 2))[trainer]
  with pytest.raises(ValueError, match=r"^x: the model maps input of shape \(2, 8, 8\) float32 to outputs of shape "
                                       r"\(2, 8, 10\) float32, which the loss cannot take with labels of shape \(2,\) "
                                       r"int32 \(the default loss expects outputs of shape \(2, num_classes\)\): "):
    t.init(jax.random.key(0), jnp.ones((2, 8, 8)))


@pytest.mark.parametrize("trainer", ["split", "centralized"])
def test_loss_must_be_a_scalar(trainer):
  t = _trainers(sljax.cut(models.mlp(hidden=(8,)), 1), loss=optax.softmax_cross_entropy_with_integer_labels)[trainer]
  with pytest.raises(ValueError, match=r"^loss: expected a scalar, got \(2,\) float32 for outputs of shape \(2, 10\) "
                                       r"float32 and labels of shape \(2,\) int32"):
    t.init(jax.random.key(0), jnp.ones((2, 64)))


def test_unbatched_scalar_input_at_init():
  with pytest.raises(ValueError, match=r"^x: expected a batch of examples with a leading batch axis, got \(\) float32"):
    _trainers(sljax.cut(models.mlp(hidden=(8,)), 1))["split"].init(jax.random.key(0), jnp.ones(()))


def test_nnx_stage_needs_a_module_or_constructor():
  with pytest.raises(TypeError, match=r"^module: expected a flax.nnx.Module or a constructor taking rngs, got int"):
    sljax.nnx_stage(3)
  with pytest.raises(TypeError, match=r"^module: expected a constructor that returns a flax.nnx.Module, "
                                      r"got one returning \(3,\) float32"):
    sljax.nnx_stage(lambda rngs: jnp.ones(3))
