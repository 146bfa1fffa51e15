"""Tests for sljax.codecs: round trips, wire bytes, unbiasedness, error feedback, jit and vmap."""

import doctest
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from sljax import codecs, messages

B, D = 4, 16


def _normal(seed, shape=(B, D)):
  return jax.random.normal(jax.random.key(seed), shape)


def _round_trip(codec, tree, key=None):
  """decode(encode(tree)) under one jit; returns (decoded, payload)."""
  key = jax.random.key(0) if key is None else key

  @jax.jit
  def run(tree, key):
    payload, _ = codec.encode(tree, codec.init(tree), key)
    return codec.decode(payload), payload

  return run(tree, key)


# ---------------------------------------------------------------------------------------------
# Round trips.


def test_identity_is_exact_and_cast_is_within_dtype_precision():
  x = _normal(0)
  labels = jnp.arange(B, dtype=jnp.int32)
  tree = {"acts": x, "labels": labels}

  decoded, payload = _round_trip(codecs.identity(), tree)
  chex.assert_trees_all_equal(decoded, tree)
  chex.assert_trees_all_equal(payload, tree)

  for dtype, eps in ((jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)):
    decoded, payload = _round_trip(codecs.cast(dtype=dtype), tree)
    assert decoded["acts"].dtype == jnp.float32
    np.testing.assert_allclose(decoded["acts"], x, rtol=eps, atol=0)
    # Integer leaves, such as labels, cross untouched.
    chex.assert_trees_all_equal(decoded["labels"], labels)
    wire_dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(payload)}
    assert wire_dtypes == {np.dtype(dtype), np.dtype(np.int32)}


def test_pack_bits_layout_and_round_trip():
  # The documented layout: low bits first, the last byte of a row zero-padded.
  levels = jnp.array([[1, 2, 3, 0, 1]], jnp.uint8)
  np.testing.assert_array_equal(codecs._pack_bits(levels, 2), [[1 | 2 << 2 | 3 << 4, 1]])

  dim = 13  # not a multiple of 8 // bits for bits < 8, so rows are padded

  @jax.jit
  def round_trips(key):
    results = []
    for bits in codecs._QUANTIZE_BITS:
      levels = jax.random.randint(key, (3, dim), 0, 2**bits).astype(jnp.uint8)
      packed = codecs._pack_bits(levels, bits)
      results.append((packed, levels, codecs._unpack_bits(packed, bits, dim)))
    return results

  results = round_trips(jax.random.key(0))
  for bits, (packed, levels, unpacked) in zip(codecs._QUANTIZE_BITS, results):
    assert packed.shape == (3, math.ceil(dim * bits / 8)) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpacked, levels)


def test_quantize_per_tensor_shares_one_level_width():
  x = _normal(1, (B, 3, 5)) * jnp.arange(1, B + 1)[:, None, None]  # rows of different ranges
  for stochastic in (True, False):
    decoded, payload = _round_trip(codecs.quantize(bits=4, stochastic=stochastic, per="tensor"), x)
    (leaf,) = payload.leaves
    assert leaf.minimum.shape == (1, 1) and leaf.scale.shape == (1, 1)
    level = (float(x.max()) - float(x.min())) / 15
    bound = level if stochastic else level / 2
    assert np.abs(np.asarray(decoded) - np.asarray(x)).max() <= bound * (1 + 1e-5) + 1e-6
  constant = jnp.full((B, 6), 0.3)
  np.testing.assert_array_equal(_round_trip(codecs.quantize(bits=2, per="tensor"), constant)[0], constant)
  # per row is finer on rows of different ranges
  per_row, _ = _round_trip(codecs.quantize(bits=4, stochastic=False), x)
  assert np.abs(np.asarray(per_row) - x).mean() < np.abs(np.asarray(_round_trip(
      codecs.quantize(bits=4, stochastic=False, per="tensor"), x)[0]) - x).mean()


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("bits", codecs._QUANTIZE_BITS)
def test_quantize_error_is_below_one_level(bits, stochastic):
  x = _normal(1, (B, 3, 5)).at[0].set(0.7)  # row 0 is constant and must be sent exactly
  decoded, payload = _round_trip(codecs.quantize(bits=bits, stochastic=stochastic), x)
  assert decoded.shape == x.shape and decoded.dtype == x.dtype
  (leaf,) = payload.leaves
  assert leaf.packed.shape == (B, math.ceil(15 * bits / 8)) and leaf.packed.dtype == jnp.uint8

  rows = np.asarray(x).reshape(B, -1)
  level = (rows.max(1, keepdims=True) - rows.min(1, keepdims=True)) / (2**bits - 1)
  bound = level if stochastic else level / 2
  error = np.abs(np.asarray(decoded).reshape(B, -1) - rows)
  assert np.all(error <= bound * (1 + 1e-5) + 1e-6)
  np.testing.assert_array_equal(decoded[0], x[0])
  if bits == 1:  # every value decodes to its row's minimum or maximum
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    decoded_rows = np.asarray(decoded).reshape(B, -1)
    assert np.all(np.isclose(decoded_rows, lo) | np.isclose(decoded_rows, hi))
  if bits == 8 and not stochastic:
    assert error.max() <= 0.5 * level.max() * (1 + 1e-5) and error.max() < 0.02


def test_top_k_keeps_exactly_the_k_largest_magnitudes():
  k = 5
  x = _normal(2)
  decoded, payload = _round_trip(codecs.top_k(k=k), x)
  (leaf,) = payload.leaves
  assert leaf.values.shape == (B, k) and leaf.indices.dtype == jnp.uint8
  assert leaf.index_bits == 4 and leaf.indices.shape == (B, math.ceil(k * 4 / 8))  # rows of 16: 4 bits each

  x_np = np.asarray(x)
  expected = np.zeros_like(x_np)
  largest = np.argsort(-np.abs(x_np), axis=1)[:, :k]
  np.put_along_axis(expected, largest, np.take_along_axis(x_np, largest, 1), axis=1)
  np.testing.assert_array_equal(decoded, expected)


def test_random_k_sends_k_distinct_coordinates_rescaled():
  k = 4
  x = _normal(3) + 10.0  # no zeros, so the nonzeros of the output are the kept coordinates
  decoded, payload = _round_trip(codecs.random_k(k=k), x)
  (leaf,) = payload.leaves
  kept = np.asarray(decoded) != 0
  np.testing.assert_array_equal(kept.sum(1), k)
  np.testing.assert_array_equal(np.sort(np.asarray(leaf.positions()), 1),
                                np.sort(np.nonzero(kept)[1].reshape(B, k), 1))
  np.testing.assert_allclose(np.asarray(decoded)[kept], np.asarray(x)[kept] * D / k, rtol=1e-6)


def test_clip_bounds_the_norm_of_each_example_across_leaves():
  tree = {"a": _normal(4, (B, 3)), "b": _normal(5, (B, 2, 2)), "labels": jnp.zeros(B, jnp.int32)}
  tree["a"] = tree["a"].at[0].multiply(1e-3)
  tree["b"] = tree["b"].at[0].multiply(1e-3)  # example 0 is inside the bound
  decoded, _ = _round_trip(codecs.clip(max_norm=1.0), tree)

  def norms(t):
    return np.sqrt(sum(np.sum(np.asarray(leaf).reshape(B, -1) ** 2, 1)
                       for leaf in (t["a"], t["b"])))

  assert norms(tree)[1:].min() > 1.0
  np.testing.assert_allclose(norms(decoded)[1:], 1.0, rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[0], decoded),
                              jax.tree.map(lambda leaf: leaf[0], tree))


def test_chain_is_the_manual_composition():
  parts = (codecs.clip(max_norm=2.0), codecs.random_k(k=6, unbiased=False),
           codecs.quantize(bits=4), codecs.cast(dtype=jnp.float16))
  chained = codecs.chain(*parts)
  x = _normal(6)
  key = jax.random.key(7)

  @jax.jit
  def by_hand(x, key):
    tree, payloads = x, []
    for codec, part_key in zip(parts, jax.random.split(key, len(parts))):
      tree, _ = codec.encode(tree, codec.init(tree), part_key)
      payloads.append(tree)
    for codec in reversed(parts):
      tree = codec.decode(tree)
    return tree, payloads[-1]

  decoded, payload = _round_trip(chained, x, key)
  expected_decoded, expected_payload = by_hand(x, key)
  chex.assert_trees_all_equal(payload, expected_payload)
  chex.assert_trees_all_equal(decoded, expected_decoded)
  assert decoded.shape == x.shape and decoded.dtype == x.dtype


# ---------------------------------------------------------------------------------------------
# Bytes on the wire.


def test_payload_bytes_and_compression_ratios():
  batch, dim = 8, 256
  x = _normal(8, (batch, dim))
  raw = batch * dim * 4
  cases = {  # codec -> exact wire bytes
      "quantize8": (codecs.quantize(bits=8), batch * (dim + 8)),
      "quantize4": (codecs.quantize(bits=4), batch * (dim // 2 + 8)),
      "quantize1": (codecs.quantize(bits=1), batch * (dim // 8 + 8)),
      "quantize8 per tensor": (codecs.quantize(bits=8, per="tensor"), batch * dim + 8),
      "quantize4+f16 stats": (
          codecs.chain(codecs.quantize(bits=4), codecs.cast(dtype=jnp.float16)),
          batch * (dim // 2 + 4),
      ),
      "top_k10%": (codecs.top_k(fraction=0.1), batch * 26 * (4 + 1)),  # uint8 indices
      "top_k10%+bf16": (
          codecs.chain(codecs.top_k(fraction=0.1), codecs.cast(dtype=jnp.bfloat16)),
          batch * 26 * (2 + 1),
      ),
      "cast_bf16": (codecs.cast(dtype=jnp.bfloat16), raw // 2),
  }
  ratios = {}
  for name, (codec, expected) in cases.items():
    state = codec.init(x)
    payload, _ = codec.encode(x, state, jax.random.key(0))
    nbytes = codecs.payload_nbytes(payload)
    assert nbytes == expected, name
    assert nbytes == sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(payload)), name
    # The same count at trace time, from shapes alone.
    abstract, _ = jax.eval_shape(codec.encode, x, state, jax.random.key(0))
    assert codecs.payload_nbytes(abstract) == nbytes, name
    # msgpack adds only a small header per array to the raw bytes.
    wire = serialization.to_bytes(payload)
    num_leaves = len(jax.tree.leaves(payload))
    assert nbytes < len(wire) <= nbytes + 48 * num_leaves + 32, (name, len(wire), nbytes)
    ratios[name] = raw / nbytes
  assert 3.8 < ratios["quantize8"] <= 4 and 7.5 < ratios["quantize4"] <= 8
  assert 3.98 < ratios["quantize8 per tensor"] < 4  # 8 bytes of statistics per message
  assert 7.5 < ratios["top_k10%"] < 8.0 and ratios["cast_bf16"] == 2


def test_positions_are_bit_packed_at_ceil_log2_of_the_row_length():
  codec = codecs.top_k(k=3)
  for dim, bits in ((3, 2), (4, 2), (5, 3), (256, 8), (257, 9), (512, 9), (65536, 16), (65537, 17)):
    x = jax.ShapeDtypeStruct((2, dim), jnp.float32)
    payload, _ = jax.eval_shape(codec.encode, x, codec.init(x), jax.random.key(0))
    leaf = payload.leaves[0]
    assert leaf.index_bits == bits and leaf.indices.shape == (2, math.ceil(3 * bits / 8)), dim
    assert leaf.indices.dtype == jnp.uint8
  # Round trip of positions at an odd width, including the largest position.
  x = jnp.zeros((2, 300)).at[0, 299].set(5.0).at[1, 0].set(-4.0).at[1, 257].set(3.0)
  decoded, payload = _round_trip(codecs.top_k(k=3), x)
  np.testing.assert_array_equal(decoded, x)
  assert payload.leaves[0].index_bits == 9


@pytest.mark.parametrize("codec", [
    codecs.quantize(bits=2),
    codecs.chain(codecs.clip(max_norm=3.0), codecs.top_k(k=3, error_feedback=True),
                 codecs.cast(dtype=jnp.bfloat16)),
], ids=["quantize", "chain"])
def test_payload_round_trips_through_bytes_with_an_abstract_template(codec):
  tree = {"acts": _normal(9, (B, 2, 4)), "labels": jnp.arange(B)}
  state = codec.init(tree)
  key = jax.random.key(1)
  payload, _ = codec.encode(tree, state, key)
  # The receiver knows shapes, not values: its template comes from eval_shape.
  template, _ = jax.eval_shape(codec.encode, tree, state, key)
  received = serialization.from_bytes(template, serialization.to_bytes(payload))
  chex.assert_trees_all_equal(received, payload)
  chex.assert_trees_all_equal(codec.decode(received), codec.decode(payload))
  # The same payload as the activations of an uplink message, through sljax's own wire format.
  message = messages.SmashedData(activations=payload)
  data = messages.to_bytes(message)
  assert len(data) == messages.wire_size(message)
  received = messages.from_bytes(messages.SmashedData(activations=template), data)
  chex.assert_trees_all_equal(received.activations, payload)


# ---------------------------------------------------------------------------------------------
# Unbiasedness, checked statistically over many keys.


def _bias_z_scores(codec, x, num_keys=4000):
  """|mean over keys of decode(encode(x, key)) - x| in standard errors, per coordinate."""
  state = codec.init(x)
  keys = jax.random.split(jax.random.key(42), num_keys)
  # lax.map rather than vmap: the same samples, and the un-batched PRNG compiles twice as fast.
  samples = jax.jit(lambda keys: jax.lax.map(
      lambda key: codec.decode(codec.encode(x, state, key)[0]), keys))(keys)
  samples = np.asarray(samples, np.float64)
  standard_error = samples.std(0) / np.sqrt(num_keys)
  # The atol covers coordinates sent exactly (row extremes), whose standard error is 0.
  return np.abs(samples.mean(0) - np.asarray(x, np.float64)) / (standard_error + 1e-5)


@pytest.mark.parametrize("codec", [
    codecs.quantize(bits=2),
    codecs.quantize(bits=1),
    codecs.quantize(bits=2, per="tensor"),
    codecs.random_k(k=4),
    codecs.chain(codecs.random_k(k=8), codecs.quantize(bits=4)),
], ids=["quantize2", "quantize1", "quantize2_per_tensor", "random_k", "random_k+quantize"])
def test_unbiased_codecs_are_unbiased(codec):
  assert _bias_z_scores(codec, _normal(10)).max() < 5


@pytest.mark.parametrize("codec", [
    codecs.quantize(bits=2, stochastic=False),
    codecs.top_k(k=4),
    codecs.random_k(k=4, unbiased=False),
    codecs.clip(max_norm=1.0),
], ids=["quantize_nearest", "top_k", "random_k_unscaled", "clip"])
def test_biased_codecs_fail_the_same_check(codec):
  # The check above is only meaningful if it catches a biased codec.
  assert _bias_z_scores(codec, _normal(10)).max() > 50


# ---------------------------------------------------------------------------------------------
# Error feedback.


@pytest.mark.parametrize("codec", [
    codecs.top_k(k=3, error_feedback=True),
    codecs.random_k(fraction=0.25, error_feedback=True, unbiased=False),
], ids=["top_k", "random_k"])
def test_error_feedback_loses_nothing(codec):
  x = _normal(11)
  num_steps = 8

  @jax.jit
  def run(state, keys):
    def step(state, key):
      payload, state = codec.encode(x, state, key)
      return state, codec.decode(payload)

    state, decoded = jax.lax.scan(step, state, keys)
    return decoded.sum(0), state.residual

  sent, residual = run(codec.init(x), jax.random.split(jax.random.key(0), num_steps))
  assert np.abs(residual).max() > 0.1  # something is still pending, so the check has teeth
  np.testing.assert_allclose(sent + residual, num_steps * x, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# jit and vmap.


NUM_CLIENTS = 3


def _two_rounds(codec, tree, state, key):
  """Two encodes threading the state, then a decode: one client's uplink over two rounds."""
  first_key, second_key = jax.random.split(key)
  payload, state = codec.encode(tree, state, first_key)
  payload, state = codec.encode(tree, state, second_key)
  return payload, state, codec.decode(payload)


@pytest.fixture(scope="module")
def clients():
  """A codec using every kind of state and randomness, per-client inputs and looped outputs."""
  codec = codecs.chain(
      codecs.clip(max_norm=2.0),
      codecs.random_k(k=5, error_feedback=True, unbiased=False),
      codecs.quantize(bits=4),
      codecs.cast(dtype=jnp.float16),
  )
  trees = [{"acts": _normal(seed, (B, 3, 4)), "labels": jnp.arange(B, dtype=jnp.int32) + seed}
           for seed in range(NUM_CLIENTS)]
  keys = jax.random.split(jax.random.key(5), NUM_CLIENTS)
  run = jax.jit(lambda tree, state, key: _two_rounds(codec, tree, state, key))
  looped = [run(tree, codec.init(tree), key) for tree, key in zip(trees, keys)]
  return codec, trees, keys, looped


def test_jit_equals_no_jit(clients):
  codec, trees, keys, looped = clients
  # Codecs jit their encode and decode; disable_jit runs everything op by op.
  with jax.disable_jit():
    eager = _two_rounds(codec, trees[0], codec.init(trees[0]), keys[0])
  chex.assert_trees_all_close(looped[0], eager, atol=1e-6)


def test_vmap_over_clients_equals_loop(clients):
  codec, trees, keys, looped = clients
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
  run = jax.jit(jax.vmap(lambda tree, state, key: _two_rounds(codec, tree, state, key)))
  vmapped = run(stacked, jax.vmap(codec.init)(stacked), keys)
  for client, expected in enumerate(looped):
    chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[client], vmapped), expected,
                                atol=1e-6)
  payload_C, payload = vmapped[0], looped[0][0]
  assert codecs.payload_nbytes(payload_C) == NUM_CLIENTS * codecs.payload_nbytes(payload)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("bits", [3, 0, 16, 4.0])
def test_quantize_rejects_bits(bits):
  with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 4, 8\); got"):
    codecs.quantize(bits=bits)
  with pytest.raises(ValueError, match=r"quantize: per must be 'row' or 'tensor'; got 'column'"):
    codecs.quantize(bits=8, per="column")


def test_sparsifiers_reject_bad_k_and_fraction():
  x = jnp.zeros((B, D))
  for factory in (codecs.top_k, codecs.random_k):
    with pytest.raises(ValueError, match=r"k must be at most the row length 16 .* got k=17"):
      factory(k=17).encode(x, codecs.EmptyState(), jax.random.key(0))
    for fraction in (0.0, -0.5, 1.5, float("nan")):
      with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]; got fraction="):
        factory(fraction=fraction)
    with pytest.raises(ValueError, match=r"k must be a positive int; got k=0"):
      factory(k=0)
    with pytest.raises(ValueError, match=r"exactly one of `k` or `fraction`"):
      factory(k=2, fraction=0.5)
    with pytest.raises(ValueError, match=r"exactly one of `k` or `fraction`"):
      factory()
  with pytest.raises(ValueError, match=r"k must be at most the row length 16"):
    codecs.top_k(k=17, error_feedback=True).init(x)
  with pytest.raises(ValueError, match=r"error_feedback=True needs unbiased=False"):
    codecs.random_k(k=2, error_feedback=True)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_clip_rejects_max_norm(max_norm):
  with pytest.raises(ValueError, match=r"max_norm must be > 0; got max_norm="):
    codecs.clip(max_norm=max_norm)


def test_other_bad_input_names_the_argument():
  with pytest.raises(ValueError, match=r"dtype must be a floating dtype .* got int8"):
    codecs.cast(dtype=jnp.int8)
  scalar = jnp.float32(1.0)
  with pytest.raises(ValueError, match=r"leading batch axis .* got a leaf with shape \(\)"):
    codecs.quantize(bits=8).encode(scalar, codecs.EmptyState(), jax.random.key(0))
  codec = codecs.top_k(k=2, error_feedback=True)
  with pytest.raises(ValueError, match=r"`state.residual` must match `tree`"):
    codec.encode(jnp.zeros((B, D)), codec.init(jnp.zeros((B, D + 1))), jax.random.key(0))
  with pytest.raises(ValueError, match=r"`payload` must be the EncodedTree"):
    codecs.quantize(bits=8).decode(jnp.zeros((B, D)))
  with pytest.raises(ValueError, match=r"`state` must be the tuple of 2 inner states"):
    codecs.chain(codecs.identity(), codecs.identity()).encode(
        jnp.zeros((B, D)), codecs.EmptyState(), jax.random.key(0))
  with pytest.raises(TypeError, match=r"every argument must be a Codec; got function"):
    codecs.chain(codecs.identity(), codecs.quantize)


def test_docstring_examples_run():
  results = doctest.testmod(codecs, optionflags=doctest.ELLIPSIS)
  assert results.attempted > 0 and results.failed == 0


# ---------------------------------------------------------------------------------------------
# Gradients through codecs.


SPARSE = {
    "random_k": (codecs.random_k(k=5), None),
    "random_k_unscaled": (codecs.random_k(k=5, unbiased=False), None),
    "top_k": (codecs.top_k(fraction=0.25), None),
    "top_k_ef": (codecs.top_k(k=3, error_feedback=True), None),
    # In a chain, only the sparsifier's selection matters; rounding and casting pass straight.
    "random_k+quantize": (codecs.chain(codecs.random_k(k=6), codecs.quantize(bits=8)),
                          codecs.chain(codecs.random_k(k=6), codecs.identity())),
    "clip+top_k+cast": (codecs.chain(codecs.clip(max_norm=100.0), codecs.top_k(k=4), codecs.cast(dtype=jnp.float16)),
                        codecs.chain(codecs.clip(max_norm=100.0), codecs.top_k(k=4), codecs.identity())),
}


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparsifier_backward_is_the_transpose_of_decode_of_encode(name):
  """With the selection fixed, decode(encode(x)) is linear in x: `cotangent` returns its exact VJP,
  as jax.vjp computes it through the gather and the scatter. In a chain, rounding and casting pass
  the gradient straight: the reference swaps them for identity (same key splitting, same selection)."""
  codec, reference = SPARSE[name]
  reference = reference or codec
  x = {"a": _normal(20, (B, 3, 4)), "b": _normal(21, (B, 6))}
  g = {"a": _normal(22, (B, 3, 4)), "b": _normal(23, (B, 6))}
  key = jax.random.key(7)
  payload, _ = codec.encode(x, codec.init(x), key)
  got = codecs.cotangent(codec, payload, g)
  ref_state = reference.init(x)
  _, vjp = jax.vjp(lambda x: reference.decode(reference.encode(x, ref_state, key)[0]), x)
  (expected,) = vjp(g)
  chex.assert_trees_all_close(got, expected, atol=1e-6)
  # Zero exactly off the coordinates sent.
  sent = jax.tree.map(lambda d: d != 0, codec.decode(payload))
  assert all(bool(jnp.all((a == 0) | m)) for a, m in zip(jax.tree.leaves(got), jax.tree.leaves(sent)))


@pytest.mark.parametrize("codec", [codecs.identity(), codecs.cast(dtype=jnp.float16), codecs.quantize(bits=4),
                                   codecs.clip(max_norm=0.5), codecs.top_k(k=3, straight_through=True),
                                   codecs.random_k(k=3, straight_through=True)],
                         ids=["identity", "cast", "quantize", "clip", "top_k_straight", "random_k_straight"])
def test_other_codecs_pass_gradients_straight_through(codec):
  x = _normal(24)
  payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
  g = _normal(25)
  assert codec.backward is None
  chex.assert_trees_all_equal(codecs.cotangent(codec, payload, g), g)


def test_split_step_through_random_k_is_the_exact_gradient():
  """Vanilla SL with random-k on the uplink = one SGD step on loss(server(decode(encode(client(x))))),
  differentiated end to end with the selection fixed: the client's gradient is exact."""
  import optax

  import sljax
  from sljax import models

  model = sljax.cut(models.mlp(hidden=(16, 16), num_classes=4), 1)
  codec = codecs.random_k(fraction=0.25)
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(0.5), server_optimizer=optax.sgd(0.5), uplink=codec)
  x = _normal(26, (8, 5))
  y = jnp.arange(8, dtype=jnp.int32) % 4
  state = sl.init(jax.random.key(0), x)
  key = jax.random.key(3)
  new, _ = jax.jit(sl.step)(state, (x, y), key)

  k_client, k_server = jax.random.split(key)
  codec_key = jax.random.fold_in(k_client, sljax.protocol.CODEC_STREAM)

  def loss(pc, ps):
    h, _ = model.client.apply(pc, state.client.model_state, x, key=k_client, train=True)
    h_hat = codec.decode(codec.encode(h, state.client.codec_state, codec_key)[0])
    out, _ = model.server.apply(ps, state.server.model_state, h_hat, key=k_server, train=True)
    return sljax.protocol.softmax_cross_entropy(out, y)

  g_c, g_s = jax.grad(loss, argnums=(0, 1))(state.client.params, state.server.params)
  sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.5 * b, p, g)  # noqa: E731
  chex.assert_trees_all_close(new.client.params, sgd(state.client.params, g_c), atol=1e-6)
  chex.assert_trees_all_close(new.server.params, sgd(state.server.params, g_s), atol=1e-6)
  # The straight-through gradient would differ: the check has teeth.
  up, pending = sl.client_forward(state.client, x, y, k_client)
  _, down, _ = sl.server_step(state.server, up, k_server)
  (straight,) = pending.pullback(down.grad)
  assert not np.allclose(jax.tree.leaves(straight)[0], jax.tree.leaves(g_c)[0], atol=1e-4)
