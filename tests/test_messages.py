"""Messages round-trip through bytes; the byte counts are exact; nothing private crosses the cut."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import sljax
from sljax import messages, models

RNG = np.random.default_rng(0)
ACTS = RNG.normal(size=(8, 16)).astype(np.float32)
LABELS = RNG.integers(0, 10, size=8).astype(np.int32)

ALL_MESSAGES = [
    sljax.SmashedData(ACTS, LABELS),
    sljax.SmashedData(ACTS),
    sljax.CutGradient(ACTS),
    sljax.BodyOutput(ACTS.astype(jnp.bfloat16)),
    sljax.TailGradient(ACTS[:, :3]),
    sljax.Prediction(ACTS[:, :10]),
]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_is_exact_and_size_is_exact(message):
  data = sljax.to_bytes(message)
  back = sljax.from_bytes(messages.spec_of(message), data)
  assert type(back) is type(message)
  for a, b in zip(jax.tree.leaves(message), jax.tree.leaves(back)):
    assert np.asarray(a).dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), b)
  assert sljax.wire_size(message) == len(data)
  assert sljax.wire_size(messages.spec_of(message)) == len(data)


def test_wire_size_works_under_jit():
  sizes = []

  @jax.jit
  def f(x):
    sizes.append(sljax.wire_size(sljax.CutGradient(x)))
    return x

  f(jnp.asarray(ACTS))
  assert sizes == [len(sljax.to_bytes(sljax.CutGradient(ACTS)))]


def test_version_and_kind_travel_on_the_wire():
  envelope = serialization.msgpack_restore(sljax.to_bytes(sljax.CutGradient(ACTS)))
  assert envelope["sljax"] == messages.PROTOCOL_VERSION
  assert envelope["kind"] == "CutGradient"


def _envelope(**override):
  env = {"sljax": messages.PROTOCOL_VERSION, "kind": "CutGradient", "body": {"grad": ACTS}}
  env.update(override)
  return serialization.msgpack_serialize(env)


@pytest.mark.parametrize(
    "data, match",
    [
        (sljax.to_bytes(sljax.CutGradient(ACTS))[:-7], "malformed or truncated"),
        (b"\x00\x01garbage", "malformed"),
        (_envelope(sljax=99), "protocol version 99 is not supported; expected 1"),
        (_envelope(kind="SmashedData"), "expected kind CutGradient, got 'SmashedData'"),
        (_envelope(body={"grad": ACTS[:, :5]}), r"field grad: expected shape \(8, 16\) float32, got \(8, 5\) float32"),
        (_envelope(body={"grad": ACTS.astype(np.float64)}), r"expected shape \(8, 16\) float32, got \(8, 16\) float64"),
        (_envelope(body={"other": ACTS}), r"expected fields \['grad'\]"),
    ],
)
def test_bad_bytes_raise_message_error(data, match):
  with pytest.raises(sljax.MessageError, match=match):
    sljax.from_bytes(messages.spec_of(sljax.CutGradient(ACTS)), data)


def test_oversized_message_is_rejected_before_decoding():
  data = sljax.to_bytes(sljax.CutGradient(ACTS))
  with pytest.raises(sljax.MessageError, match=f"{len(data)} bytes exceeds the maximum of 100 bytes"):
    sljax.from_bytes(messages.spec_of(sljax.CutGradient(ACTS)), data, max_bytes=100)


def test_labels_where_none_expected_are_rejected():
  data = sljax.to_bytes(sljax.SmashedData(ACTS, LABELS))
  with pytest.raises(sljax.MessageError, match="field labels: expected no data"):
    sljax.from_bytes(messages.spec_of(sljax.SmashedData(ACTS)), data)


def _first_uplink(u):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 64)).astype(np.float32)
  y = rng.integers(0, 10, size=8).astype(np.int32)
  model = sljax.cut(models.mlp(hidden=(32, 32)), *((1, 2) if u else (1,)))
  factory = sljax.u_shaped if u else sljax.vanilla
  sl = factory(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), x)
  if u:
    up, _ = sl.client_forward(state.client, jnp.asarray(x), jax.random.key(1))
  else:
    up, _ = sl.client_forward(state.client, jnp.asarray(x), jnp.asarray(y), jax.random.key(1))
  return x, y, sljax.to_bytes(up)


def test_vanilla_uplink_carries_labels_but_never_inputs():
  x, y, wire = _first_uplink(u=False)
  assert y.tobytes() in wire  # the check below would catch labels if they were there
  assert x.tobytes() not in wire
  assert x[0].tobytes() not in wire


def test_u_shaped_uplink_carries_neither_labels_nor_inputs():
  x, y, wire = _first_uplink(u=True)
  assert y.tobytes() not in wire
  assert x[0].tobytes() not in wire
  assert serialization.msgpack_restore(wire)["body"]["labels"] is None


def test_nnx_module_messages_round_trip():
  layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  model = sljax.split_model(layer, nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  x = jnp.ones((2, 4))
  state = sl.init(jax.random.key(0), x)
  up, _ = sl.client_forward(state.client, x, jnp.zeros((2,), jnp.int32), jax.random.key(1))
  back = sljax.from_bytes(messages.spec_of(up), sljax.to_bytes(up))
  np.testing.assert_array_equal(back.activations, up.activations)
