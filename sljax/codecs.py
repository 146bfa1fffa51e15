"""Message codecs: pure, composable transforms on what crosses the cut.

A codec compresses or sanitises a message pytree -- the smashed data on the uplink, the cut
gradient on the downlink -- and is shaped like an optax ``GradientTransformation``::

    state = codec.init(example_tree)
    payload, state = codec.encode(tree, state, key)   # on the sender
    tree_hat = codec.decode(payload)                  # on the receiver

Conventions shared by every codec in this module:

* **Rows.** Each leaf carries a leading batch axis ``B``; a *row* is one example, the leaf
  reshaped to ``(B, -1)``. Per-row statistics (quantization range, top-k selection, norms) keep
  one example's message independent of the rest of the batch, which is what smashed data and
  per-example cut gradients need. Under ``jax.vmap`` over a leading client axis the codec sees
  one client's ``(B, ...)`` leaves, so rows never mix clients either.
* **Floating leaves only.** Codecs transform floating-point leaves and pass every other leaf
  (integer labels in a vanilla-SL uplink, the indices a sparsifier produced) through unchanged.
  This is what makes ``chain(top_k(...), quantize(...))`` quantize the kept values and leave the
  indices alone.
* **The wire.** A payload is a pytree whose array leaves are exactly the bytes that travel; the
  static metadata needed to decode (original shape and dtype, bits, the input tree structure)
  sits in ``pytree_node=False`` fields of ``flax.struct.dataclass`` payload classes, so payloads
  pass through ``jax.jit`` and ``jax.vmap`` and ``flax.serialization.to_bytes`` writes only the
  arrays. :func:`payload_nbytes` counts those bytes, also on abstract values at trace time. The
  receiver rebuilds the static part from shapes alone: ``template = jax.eval_shape(codec.encode,
  tree, state, key)[0]``, then ``flax.serialization.from_bytes(template, data)``.
* **Static shapes.** Every payload shape is a function of the input shapes and the codec's
  hyperparameters, never of the data, so a round compiles once.
* **Gradients through codecs.** In split learning the server differentiates with respect to
  the *decoded* smashed data. The client maps the decoded cut gradient back through its uplink
  codec with :func:`cotangent` before its own pullback: a sparsifier's ``backward`` is the exact
  transpose of its decode-of-encode with the selection held fixed (the gradient masked to the
  coordinates sent, rescaled like them), so the client's gradient is that of the loss it
  actually trained; codecs without a ``backward`` (cast, quantize, clip) pass the gradient
  straight through, the usual estimator for rounding. Nothing differentiates ``encode``.
* **Configuration.** Every codec carries its name and hyperparameters (``Codec.config``, read
  with :func:`describe`), so that two parties can check that they run the same codecs before a
  message crosses: the network handshake compares them.

References: stochastic uniform quantization follows QSGD (Alistarh et al., 2017); top-k with
error feedback follows "Sparsified SGD with memory" (Stich et al., 2018).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "CastLeaf",
    "Codec",
    "EmptyState",
    "EncodedTree",
    "ErrorFeedbackState",
    "QuantizedLeaf",
    "SparseLeaf",
    "cast",
    "chain",
    "clip",
    "cotangent",
    "describe",
    "identity",
    "payload_nbytes",
    "quantize",
    "random_k",
    "top_k",
]

PyTree = Any

_QUANTIZE_BITS = (1, 2, 4, 8)


class Codec(NamedTuple):
  """A pure transform applied to a message on its way across the cut.

  Attributes:
    init: ``init(example_tree) -> state``. ``example_tree`` may hold concrete arrays or
      ``jax.ShapeDtypeStruct`` leaves; only shapes and dtypes are read.
    encode: ``encode(tree, state, key) -> (payload, new_state)``. ``key`` is a PRNG key
      (deterministic codecs ignore it).
    decode: ``decode(payload) -> tree`` with the shapes and dtypes of the encoder's input.
    backward: ``backward(payload, g) -> g_in`` or None: the transpose of the Jacobian of
      ``decode(encode(.))`` at the point that made ``payload``, with every discrete choice
      (selected coordinates, rounding) held fixed, applied to ``g``, a cotangent shaped like the
      decoded tree. None means the identity (straight-through). Use :func:`cotangent`.
    config: the codec's configuration, its name and every hyperparameter, as canonical JSON (keys
      sorted, no spaces); every factory of this module fills it in. Read it with :func:`describe`.
      A codec built by hand sets its own, e.g. ``'{"name":"my_noise","sigma":0.5}'``; None means
      undescribed, which the network handshake refuses (it compares both parties' configurations).
      A string, so that a codec stays hashable.
  """

  init: Callable[[PyTree], PyTree]
  encode: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]
  decode: Callable[[PyTree], PyTree]
  backward: Callable[[PyTree, PyTree], PyTree] | None = None
  config: str | None = None


def _config(name: str, **hyperparameters) -> str:
  """The canonical JSON of a configuration: ``{"name": name, **hyperparameters}``, keys sorted."""
  return json.dumps({"name": name, **hyperparameters}, sort_keys=True, separators=(",", ":"))


def describe(codec: Codec | None) -> dict[str, Any]:
  """The configuration of ``codec``: its name and every hyperparameter, a JSON-able dict.

  Equal configurations give equal descriptions and different ones differ; ``None`` (no codec, as
  ``sljax.vanilla(uplink=None)``) describes like :func:`identity`. A :func:`chain` nests its
  codecs' descriptions in order under ``"codecs"``. The network handshake sends the client's
  uplink and downlink descriptions and the server refuses a mismatch (docs/protocol.md).

  Args:
    codec: a :class:`Codec` or None.

  Returns:
    A fresh dict of str, int, float, bool, None, lists and dicts, e.g.
    ``{"name": "quantize", "bits": 4, "per": "row", "stochastic": True}``.

  Raises:
    ValueError: if ``codec`` carries no ``config`` (built by hand without one, or a chain of such
      a codec), or one that is not a JSON object with a string ``"name"``.

  Example:
    >>> describe(top_k(k=8))
    {'error_feedback': False, 'fraction': None, 'k': 8, 'name': 'top_k', 'straight_through': False}
    >>> describe(None) == describe(identity())
    True
  """
  if codec is None:
    codec = identity()
  if not isinstance(codec, Codec):
    raise TypeError(f"describe: codec must be a Codec or None; got {type(codec).__name__}.")
  if codec.config is None:
    raise ValueError(
        "describe: this Codec carries no config (built by hand, or a chain of such a codec); build it "
        "with a factory of sljax.codecs, or give Codec(..., config='{\"name\": ..., <hyperparameters>}')."
    )
  try:
    description = json.loads(codec.config)
  except (TypeError, ValueError) as err:
    raise ValueError(f"describe: codec.config must be a JSON object; got {codec.config!r}.") from err
  if not isinstance(description, dict) or not isinstance(description.get("name"), str):
    raise ValueError(f"describe: codec.config must be a JSON object with a string 'name'; got {codec.config!r}.")
  return description


def cotangent(codec: Codec, payload: PyTree, g: PyTree) -> PyTree:
  """``codec.backward(payload, g)``, or ``g`` itself for a straight-through codec.

  Maps the gradient with respect to the decoded message to the gradient with respect to what
  was encoded: the sender of ``payload`` calls it before its own pullback.

  Args:
    codec: the codec ``payload`` was encoded with.
    payload: what ``codec.encode`` sent.
    g: the gradient with respect to the decoded message.

  Returns:
    The gradient with respect to the encoded input, a pytree like it.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = top_k(k=1)
    >>> x = jnp.array([[1.0, -3.0, 2.0]])
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> cotangent(codec, payload, jnp.ones((1, 3))).tolist()
    [[0.0, 1.0, 0.0]]
  """
  return g if codec.backward is None else codec.backward(payload, g)


class EmptyState(NamedTuple):
  """The state of a stateless codec."""


class ErrorFeedbackState(NamedTuple):
  """State of a sparsifier with error feedback.

  Attributes:
    residual: what earlier encodes did not send, a pytree like the input; it is added to the
      next input before selection.
  """

  residual: PyTree


@struct.dataclass
class EncodedTree:
  """A leaf-wise codec's payload for a whole message tree.

  Attributes:
    leaves: one entry per leaf of the input tree: that codec's per-leaf payload for floating
      leaves (e.g. :class:`QuantizedLeaf`), the leaf itself for the others.
    treedef: the input's tree structure (static), so that decode rebuilds the tree exactly
      even when codecs of the same kind are chained.
  """

  leaves: tuple[Any, ...]
  treedef: Any = struct.field(pytree_node=False)


@struct.dataclass
class CastLeaf:
  """One leaf cast to a narrower float dtype.

  Attributes:
    data: the leaf in the wire dtype.
    dtype: the leaf's original dtype (static).
  """

  data: jax.Array
  dtype: Any = struct.field(pytree_node=False)


@struct.dataclass
class QuantizedLeaf:
  """One leaf quantized per row to ``bits`` bits and bit-packed.

  Attributes:
    packed: ``(B, ceil(D * bits / 8))`` uint8; value ``j`` of a row sits in byte
      ``j // (8 // bits)`` at bit offset ``bits * (j % (8 // bits))`` (low bits first);
      the last byte of a row is zero-padded.
    minimum: ``(B, 1)`` float32, the row minimum; ``(1, 1)``, the leaf's, when quantized per
      tensor.
    scale: ``(B, 1)`` (or ``(1, 1)``) float32, the width of one quantization level,
      ``(max - min) / (2**bits - 1)``.
    shape: the leaf's original shape ``(B, ...)`` (static).
    dtype: the leaf's original dtype (static).
    bits: bits per value (static).
  """

  packed: jax.Array
  minimum: jax.Array
  scale: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)


@struct.dataclass
class SparseLeaf:
  """One leaf sparsified per row to ``k`` coordinates.

  Attributes:
    values: ``(B, k)`` kept values in the leaf's original dtype.
    indices: ``(B, ceil(k * b / 8))`` uint8: their positions in the flattened row, ``b =
      index_bits`` bits each, bit-packed: bit ``i`` of position ``j`` of a row is bit
      ``(j * b + i) % 8`` (low bits first) of byte ``(j * b + i) // 8``; the last byte of a row is
      zero-padded. :meth:`positions` unpacks them.
    shape: the leaf's original shape ``(B, ...)`` (static).
    dtype: the leaf's original dtype (static).
    rescale: factor applied to ``values`` on decode (static): ``D / k`` for unbiased random-k,
      otherwise 1.
    index_bits: bits per position, ``ceil(log2 D)`` for rows of ``D`` values (at least 1; static).
  """

  values: jax.Array
  indices: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)
  rescale: float = struct.field(pytree_node=False)
  index_bits: int = struct.field(pytree_node=False, default=8)

  def positions(self) -> jax.Array:
    """The ``(B, k)`` int32 positions of the kept values."""
    batch, k = self.values.shape
    bits_BxKxI = _unpack_bits(self.indices, 1, k * self.index_bits).reshape(batch, k, self.index_bits)
    weights_1x1xI = (1 << jnp.arange(self.index_bits, dtype=jnp.int32)).reshape(1, 1, self.index_bits)
    return (bits_BxKxI.astype(jnp.int32) * weights_1x1xI).sum(-1)


def payload_nbytes(payload: PyTree) -> int:
  """Returns the number of bytes ``payload`` puts on the wire.

  The sum of its array leaves' sizes; static metadata costs nothing because both ends derive it
  from shapes. Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct`` alike, so it can
  be computed at trace time or from ``jax.eval_shape``. A payload produced under ``jax.vmap``
  over clients counts all clients together.

  Args:
    payload: any pytree of arrays, typically the first output of ``Codec.encode``.

  Returns:
    The byte count as a Python int.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = quantize(bits=4)
    >>> x = jnp.ones((2, 10))
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> payload_nbytes(payload)  # 2 rows x (5 packed bytes + float32 min + float32 scale)
    26
  """
  total = 0
  for leaf in jax.tree.leaves(payload):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      leaf = np.asarray(leaf)
    total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


# --------------------------------------------------------------------------------------------
# Helpers shared by the leaf-wise codecs.


def _is_float(leaf) -> bool:
  return jnp.issubdtype(leaf.dtype, jnp.floating)


def _row_length(leaf, codec_name: str) -> int:
  if leaf.ndim < 1:
    raise ValueError(
        f"{codec_name}: every floating leaf of `tree` needs a leading batch axis "
        f"(expected ndim >= 1); got a leaf with shape {tuple(leaf.shape)}."
    )
  return math.prod(leaf.shape[1:])


def _rows(leaf, codec_name: str) -> jax.Array:
  row_length = _row_length(leaf, codec_name)  # validates ndim before shape[0] is read
  return leaf.reshape(leaf.shape[0], row_length)


def _encode_float_leaves(tree: PyTree, encode_leaf, key=None) -> EncodedTree:
  """Applies ``encode_leaf(leaf, key)`` to the floating leaves of ``tree``, one key each."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  if key is None or not leaves:
    keys = [None] * len(leaves)
  else:
    keys = list(jax.random.split(key, len(leaves)))
  encoded = tuple(
      encode_leaf(leaf, leaf_key) if _is_float(leaf) else leaf
      for leaf, leaf_key in zip(leaves, keys)
  )
  return EncodedTree(leaves=encoded, treedef=treedef)


def _decode_float_leaves(payload: EncodedTree, leaf_type: type, decode_leaf, codec_name: str):
  if not isinstance(payload, EncodedTree):
    raise ValueError(
        f"{codec_name}.decode: `payload` must be the EncodedTree that {codec_name}.encode "
        f"returned; got {type(payload).__name__}."
    )
  leaves = [decode_leaf(p) if isinstance(p, leaf_type) else p for p in payload.leaves]
  return payload.treedef.unflatten(leaves)


def _zeros_like(tree: PyTree) -> PyTree:
  # jnp.zeros(shape, dtype) rather than zeros_like so that ShapeDtypeStruct leaves work too.
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), tree)


def _init_empty(example_tree: PyTree) -> EmptyState:
  """The ``init`` of every stateless codec."""
  del example_tree
  return EmptyState()


def _jitted_codec(init, encode, decode, backward=None, *, config: str | None) -> Codec:
  """Wraps ``encode``, ``decode`` and ``backward`` in ``jax.jit``.

  Inside a jitted round this changes nothing, since nested jits are inlined; called eagerly, as
  in a notebook, a codec then compiles once per input shape instead of dispatching op by op.
  Argument and shape errors are still raised, at trace time.
  """
  return Codec(init=init, encode=jax.jit(encode), decode=jax.jit(decode),
               backward=None if backward is None else jax.jit(backward), config=config)


def _leafwise_codec(codec_name: str, leaf_type: type, encode_leaf, decode_leaf, *, random: bool, config: str):
  """Builds a stateless codec that encodes each floating leaf on its own."""

  def encode(tree, state, key):
    payload = _encode_float_leaves(tree, encode_leaf, key if random else None)
    return payload, state

  def decode(payload):
    return _decode_float_leaves(payload, leaf_type, decode_leaf, codec_name)

  return _jitted_codec(_init_empty, encode, decode, config=config)


# --------------------------------------------------------------------------------------------
# Codecs.


def identity() -> Codec:
  """Sends the message as it is.

  Unbiased and exact: ``decode(encode(x)) == x``. The payload is the tree itself.

  Returns:
    A stateless :class:`Codec`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = identity()
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> bool((codec.decode(payload) == x).all()), payload_nbytes(payload)
    (True, 24)
  """

  def encode(tree, state, key):
    del key
    return tree, state

  def decode(payload):
    return payload

  return Codec(init=_init_empty, encode=encode, decode=decode, config=_config("identity"))


def cast(*, dtype) -> Codec:
  """Casts floating leaves to a narrower float dtype for the wire.

  Decode casts back to each leaf's original dtype. Round to nearest, so biased, with a
  relative error within the wire dtype's precision (``2**-8`` for bfloat16, ``2**-11`` for
  float16). Applied after :func:`quantize` it narrows the per-row statistics; after
  :func:`top_k` it narrows the kept values and leaves the indices alone.

  Args:
    dtype: the wire dtype, a floating dtype such as ``jnp.bfloat16`` or ``jnp.float16``.

  Returns:
    A stateless :class:`Codec` whose payload is an :class:`EncodedTree` of :class:`CastLeaf`.

  Raises:
    ValueError: if ``dtype`` is not a floating dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = cast(dtype=jnp.bfloat16)
    >>> x = jnp.ones((2, 3))
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> codec.decode(payload).dtype, payload_nbytes(payload)
    (dtype('float32'), 12)
  """
  try:
    wire_dtype = jnp.dtype(dtype)
  except TypeError as err:
    raise ValueError(f"cast: dtype must be a floating dtype; got {dtype!r}.") from err
  if not jnp.issubdtype(wire_dtype, jnp.floating):
    raise ValueError(
        f"cast: dtype must be a floating dtype such as bfloat16 or float16; got {wire_dtype}."
    )

  def encode_leaf(leaf, key):
    del key
    return CastLeaf(data=leaf.astype(wire_dtype), dtype=leaf.dtype)

  def decode_leaf(payload: CastLeaf):
    return payload.data.astype(payload.dtype)

  return _leafwise_codec("cast", CastLeaf, encode_leaf, decode_leaf, random=False,
                         config=_config("cast", dtype=wire_dtype.name))


def _pack_bits(levels_BxD: jax.Array, bits: int) -> jax.Array:
  """Packs ``(B, D)`` uint8 values below ``2**bits`` into ``(B, ceil(D * bits / 8))`` uint8."""
  per_byte = 8 // bits
  batch, dim = levels_BxD.shape
  nbytes = -(-dim // per_byte)
  padded = jnp.pad(levels_BxD, ((0, 0), (0, nbytes * per_byte - dim)))
  fields_BxNxP = padded.reshape(batch, nbytes, per_byte)
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).reshape(1, 1, per_byte)
  # The shifted fields occupy disjoint bits, so their sum is their bitwise or.
  return jnp.sum(fields_BxNxP << shifts, axis=-1, dtype=jnp.uint8)


def _unpack_bits(packed_BxN: jax.Array, bits: int, dim: int) -> jax.Array:
  """Inverts :func:`_pack_bits`, dropping the padding."""
  per_byte = 8 // bits
  batch, nbytes = packed_BxN.shape
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).reshape(1, 1, per_byte)
  mask = jnp.uint8(2**bits - 1)
  fields_BxNxP = (packed_BxN[:, :, None] >> shifts) & mask
  return fields_BxNxP.reshape(batch, nbytes * per_byte)[:, :dim]


def quantize(*, bits: int, stochastic: bool = True, per: str = "row") -> Codec:
  """Uniform quantization to ``bits`` bits per value, bit-packed into uint8.

  With ``per="row"`` each row (one example) is mapped affinely onto ``2**bits`` levels between
  its minimum and maximum; the row's minimum and level width travel as float32 (8 bytes per row;
  chain with ``cast(dtype=jnp.float16)`` to halve them). With ``per="tensor"`` one minimum and
  level width serve the whole leaf (8 bytes per message): cheaper for narrow rows, coarser when
  rows differ in range. Values are packed ``8 // bits`` to a byte, so 4 bits really cost half a
  byte.

  With ``stochastic=True`` each value rounds up with probability equal to its fractional
  position between two levels, which makes the codec unbiased, ``E[decode(encode(x))] = x``,
  with an error below one level width, ``(max - min) / (2**bits - 1)``, per element. With
  ``stochastic=False`` values round to the nearest level: biased, error at most half a level.
  The level width is that of the row (``per="row"``) or of the whole leaf (``per="tensor"``). A
  constant row (leaf) is sent exactly.

  Args:
    bits: bits per value, one of 1, 2, 4, 8.
    stochastic: stochastic (unbiased) rounding if True, round to nearest otherwise.
    per: ``"row"`` or ``"tensor"``: what shares one minimum and level width.

  Returns:
    A stateless :class:`Codec` whose payload is an :class:`EncodedTree` of
    :class:`QuantizedLeaf`.

  Raises:
    ValueError: if ``bits`` is not one of 1, 2, 4, 8, or ``per`` not "row" or "tensor".

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = quantize(bits=8, stochastic=False)
    >>> x = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> payload_nbytes(payload), float(jnp.abs(codec.decode(payload) - x).max()) < 2 / 255
    (80, True)
  """
  is_int = isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)
  if not is_int or bits not in _QUANTIZE_BITS:
    raise ValueError(f"quantize: bits must be one of {_QUANTIZE_BITS}; got {bits!r}.")
  if per not in ("row", "tensor"):
    raise ValueError(f"quantize: per must be 'row' or 'tensor'; got {per!r}.")
  bits = int(bits)
  num_levels = 2**bits - 1
  axis = 1 if per == "row" else None  # keepdims: (B, 1) per row, (1, 1) per tensor

  def encode_leaf(leaf, key):
    rows_BxD = _rows(leaf, "quantize").astype(jnp.float32)
    minimum_Bx1 = rows_BxD.min(axis=axis, keepdims=True)
    maximum_Bx1 = rows_BxD.max(axis=axis, keepdims=True)
    scale_Bx1 = (maximum_Bx1 - minimum_Bx1) / num_levels
    # A constant row has scale 0: send level 0 and decode to the minimum, which is exact.
    safe_scale_Bx1 = jnp.where(scale_Bx1 > 0, scale_Bx1, 1.0)
    position_BxD = (rows_BxD - minimum_Bx1) / safe_scale_Bx1
    if stochastic:
      position_BxD = jnp.floor(position_BxD + jax.random.uniform(key, position_BxD.shape))
    else:
      position_BxD = jnp.round(position_BxD)
    levels_BxD = jnp.clip(position_BxD, 0, num_levels).astype(jnp.uint8)
    return QuantizedLeaf(
        packed=_pack_bits(levels_BxD, bits),
        minimum=minimum_Bx1,
        scale=scale_Bx1,
        shape=tuple(leaf.shape),
        dtype=leaf.dtype,
        bits=bits,
    )

  def decode_leaf(payload: QuantizedLeaf):
    dim = math.prod(payload.shape[1:])
    levels_BxD = _unpack_bits(payload.packed, payload.bits, dim).astype(jnp.float32)
    minimum_Bx1 = payload.minimum.astype(jnp.float32)  # float16 if chained with cast
    rows_BxD = minimum_Bx1 + payload.scale.astype(jnp.float32) * levels_BxD
    return rows_BxD.astype(payload.dtype).reshape(payload.shape)

  return _leafwise_codec("quantize", QuantizedLeaf, encode_leaf, decode_leaf, random=stochastic,
                         config=_config("quantize", bits=bits, stochastic=bool(stochastic), per=per))


def _index_bits(row_length: int) -> int:
  """Bits that hold every position below ``row_length``: ``ceil(log2(row_length))``, at least 1."""
  if row_length > 2**31:
    raise ValueError(f"row length {row_length} does not fit int32 positions.")
  return max(1, (row_length - 1).bit_length())


def _pack_positions(positions_BxK: jax.Array, index_bits: int) -> jax.Array:
  """Bit-packs ``(B, k)`` positions below ``2**index_bits`` into ``(B, ceil(k * index_bits / 8))`` uint8."""
  batch, k = positions_BxK.shape
  shifts_1x1xI = jnp.arange(index_bits, dtype=jnp.uint32).reshape(1, 1, index_bits)
  bits_BxKxI = (positions_BxK.astype(jnp.uint32)[..., None] >> shifts_1x1xI) & 1
  return _pack_bits(bits_BxKxI.astype(jnp.uint8).reshape(batch, k * index_bits), 1)


def _check_k_and_fraction(codec_name: str, k, fraction) -> None:
  if (k is None) == (fraction is None):
    raise ValueError(
        f"{codec_name}: give exactly one of `k` or `fraction`; "
        f"got k={k!r}, fraction={fraction!r}."
    )
  if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1):
    raise ValueError(f"{codec_name}: k must be a positive int; got k={k!r}.")
  if fraction is not None and not 0 < fraction <= 1:
    raise ValueError(f"{codec_name}: fraction must be in (0, 1]; got fraction={fraction!r}.")


def _sparsifier(codec_name: str, select, *, k, fraction, error_feedback: bool, unbiased: bool,
                random: bool, straight_through: bool, described: Mapping[str, Any]) -> Codec:
  """Builds a per-row k-sparsifier; ``select(rows_BxD, k, key)`` returns ``(B, k)`` indices.
  ``described``: the factory's hyperparameters besides k, fraction, error feedback and straight-through."""
  _check_k_and_fraction(codec_name, k, fraction)
  config = _config(codec_name, k=None if k is None else int(k), fraction=None if fraction is None else float(fraction),
                   error_feedback=bool(error_feedback), straight_through=bool(straight_through), **described)

  def resolve_k(leaf) -> tuple[int, int]:
    dim = _row_length(leaf, codec_name)
    leaf_k = k if k is not None else max(1, round(fraction * dim))
    if leaf_k > dim:
      raise ValueError(
          f"{codec_name}: k must be at most the row length {dim} of the leaf with shape "
          f"{tuple(leaf.shape)}; got k={leaf_k}."
      )
    return int(leaf_k), dim

  def encode_leaf(leaf, key):
    leaf_k, dim = resolve_k(leaf)
    rows_BxD = _rows(leaf, codec_name)
    indices_BxK = select(rows_BxD, leaf_k, key)
    index_bits = _index_bits(dim)
    return SparseLeaf(
        values=jnp.take_along_axis(rows_BxD, indices_BxK, axis=1),
        indices=_pack_positions(indices_BxK, index_bits),
        shape=tuple(leaf.shape),
        dtype=leaf.dtype,
        rescale=dim / leaf_k if unbiased else 1.0,
        index_bits=index_bits,
    )

  def decode_leaf(payload: SparseLeaf):
    batch = payload.shape[0]
    dim = math.prod(payload.shape[1:])
    values_BxK = payload.values
    if payload.rescale != 1.0:
      values_BxK = (values_BxK.astype(jnp.float32) * payload.rescale).astype(payload.dtype)
    rows_BxD = jnp.zeros((batch, dim), payload.dtype)
    rows_BxD = rows_BxD.at[jnp.arange(batch)[:, None], payload.positions()].set(
        values_BxK
    )
    return rows_BxD.reshape(payload.shape)

  def init(example_tree):
    if not error_feedback:
      return EmptyState()
    # Validate k against the leaves now rather than at the first encode.
    for leaf in jax.tree.leaves(example_tree):
      if _is_float(leaf):
        resolve_k(leaf)
    return ErrorFeedbackState(residual=_zeros_like(example_tree))

  def decode(payload):
    return _decode_float_leaves(payload, SparseLeaf, decode_leaf, codec_name)

  def backward(payload, g):
    """The gradient masked to the sent coordinates and rescaled like them: decode is linear in
    the values it sends, and the values are the input's (plus a residual that does not depend on
    it) at the selected coordinates."""
    g_leaves = jax.tree.leaves(g)
    if len(g_leaves) != len(payload.leaves):
      raise ValueError(f"{codec_name}.backward: `g` must be shaped like the decoded message; got "
                       f"{len(g_leaves)} leaves for {len(payload.leaves)}.")
    out = []
    for p, g_leaf in zip(payload.leaves, g_leaves):
      if isinstance(p, SparseLeaf):
        rows_BxD = jnp.reshape(g_leaf, (p.shape[0], -1)).astype(p.dtype)
        g_leaf = decode_leaf(p.replace(values=jnp.take_along_axis(rows_BxD, p.positions(), axis=1)))
      out.append(g_leaf)
    return payload.treedef.unflatten(out)

  def encode(tree, state, key):
    key = key if random else None
    if not error_feedback:
      return _encode_float_leaves(tree, encode_leaf, key), state
    _check_residual(codec_name, tree, state)
    corrected = jax.tree.map(jnp.add, tree, state.residual)
    payload = _encode_float_leaves(corrected, encode_leaf, key)
    residual = jax.tree.map(jnp.subtract, corrected, decode(payload))
    return payload, ErrorFeedbackState(residual=residual)

  return _jitted_codec(init, encode, decode, None if straight_through else backward, config=config)


def _check_residual(codec_name: str, tree, state) -> None:
  if not isinstance(state, ErrorFeedbackState):
    raise ValueError(
        f"{codec_name}: with error_feedback=True, `state` must be the ErrorFeedbackState "
        f"from init; got {type(state).__name__}."
    )
  expected = jax.tree.map(lambda leaf: (tuple(jnp.shape(leaf)), jnp.result_type(leaf)), tree)
  actual = jax.tree.map(
      lambda leaf: (tuple(jnp.shape(leaf)), jnp.result_type(leaf)), state.residual
  )
  if jax.tree.structure(tree) != jax.tree.structure(state.residual) or expected != actual:
    raise ValueError(
        f"{codec_name}: `state.residual` must match `tree` in structure, shapes and dtypes "
        f"(expected {expected}); got {actual}. Call init on a tree like the one encoded."
    )


def top_k(*, k: int | None = None, fraction: float | None = None,
          error_feedback: bool = False, straight_through: bool = False) -> Codec:
  """Keeps the ``k`` largest-magnitude values of each row.

  The payload holds the kept values in the leaf's dtype and their positions, bit-packed at
  ``ceil(log2 D)`` bits each for rows of ``D`` values. Biased: the dropped coordinates decode to
  zero. With ``error_feedback=True`` what was not sent is kept in the state and added to the
  next input before selection, so nothing is lost over time: after ``n`` encodes the decoded
  outputs plus the residual sum to the inputs. The residual is kept per row, so error feedback
  suits quantities summed over steps; on per-example messages (smashed data, cut gradients of
  shuffled batches) it adds one example's remainder to another's row and hurts training.

  Args:
    k: values kept per row, at most the row length.
    fraction: alternatively, the fraction of each row kept, in ``(0, 1]``;
      ``k = max(1, round(fraction * row_length))`` per leaf.
    error_feedback: carry the unsent remainder in the state.
    straight_through: pass gradients back unmasked (``backward`` None) instead of through the
      exact transpose (masked to the sent coordinates). Biased, but it also moves what was not
      sent, which can train a sparsified cut better (see experiments/benchmarks/codecs.py).

  Returns:
    A :class:`Codec` whose payload is an :class:`EncodedTree` of :class:`SparseLeaf`; its state
    is :class:`ErrorFeedbackState` with error feedback and :class:`EmptyState` without.

  Raises:
    ValueError: unless exactly one of ``k`` and ``fraction`` is given, if ``k < 1``, if
      ``fraction`` is outside ``(0, 1]``, or (on init or encode) if ``k`` exceeds a row length.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = top_k(k=1)
    >>> x = jnp.array([[1.0, -3.0, 2.0]])
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> codec.decode(payload).tolist(), payload_nbytes(payload)  # 4-byte value + a 2-bit index in a byte
    ([[0.0, -3.0, 0.0]], 5)
  """

  def select(rows_BxD, leaf_k, key):
    del key
    _, indices_BxK = jax.lax.top_k(jnp.abs(rows_BxD), leaf_k)
    return indices_BxK

  return _sparsifier("top_k", select, k=k, fraction=fraction, error_feedback=error_feedback,
                     unbiased=False, random=False, straight_through=straight_through, described={})


def random_k(*, k: int | None = None, fraction: float | None = None,
             error_feedback: bool = False, unbiased: bool = True, straight_through: bool = False) -> Codec:
  """Keeps ``k`` coordinates of each row drawn uniformly at random without replacement.

  With ``unbiased=True`` decode rescales the kept values by ``D / k`` (``D`` the row length),
  which makes the codec unbiased, ``E[decode(encode(x))] = x``, at the price of variance
  ``(D / k - 1) x**2`` per coordinate. With ``unbiased=False`` it is biased
  (``E = (k / D) x``) and may carry error feedback like :func:`top_k`.

  The indices travel bit-packed, ``ceil(log2 D)`` bits each, although
  the receiver could regenerate them from a shared key: a self-describing payload keeps decode
  key-free and the transcript complete, so attacks and audits see exactly what the server saw.

  Args:
    k: coordinates kept per row, at most the row length.
    fraction: alternatively, the fraction of each row kept, in ``(0, 1]``;
      ``k = max(1, round(fraction * row_length))`` per leaf.
    error_feedback: carry the unsent remainder in the state; needs ``unbiased=False``.
    unbiased: rescale by ``D / k`` on decode.
    straight_through: pass gradients back unmasked and unscaled, as :func:`top_k`.

  Returns:
    A :class:`Codec` whose payload is an :class:`EncodedTree` of :class:`SparseLeaf`.

  Raises:
    ValueError: as :func:`top_k`, and if both ``error_feedback`` and ``unbiased`` are set:
      the rescaled compressor is not a contraction for ``k < D / 2``, so the residual would
      grow without bound.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = random_k(fraction=0.25)
    >>> x = jnp.ones((2, 8))
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> x_hat = codec.decode(payload)  # two coordinates per row, each 8 / 2 = 4.0
    >>> (x_hat != 0).sum(axis=1).tolist(), float(x_hat.max()), payload_nbytes(payload)  # 2 x (8 + 1)
    ([2, 2], 4.0, 18)
  """
  if error_feedback and unbiased:
    raise ValueError(
        "random_k: error_feedback=True needs unbiased=False (the D/k rescaling is not a "
        "contraction, so the residual would diverge); got error_feedback=True, unbiased=True."
    )

  def select(rows_BxD, leaf_k, key):
    # The k largest of i.i.d. uniforms index a uniformly random k-subset of each row.
    _, indices_BxK = jax.lax.top_k(jax.random.uniform(key, rows_BxD.shape), leaf_k)
    return indices_BxK

  return _sparsifier("random_k", select, k=k, fraction=fraction, error_feedback=error_feedback,
                     unbiased=unbiased, random=True, straight_through=straight_through,
                     described={"unbiased": bool(unbiased)})


def clip(*, max_norm: float) -> Codec:
  """Scales each example down so that its L2 norm is at most ``max_norm``.

  The norm of example ``b`` is taken over row ``b`` of every floating leaf together, so the
  whole per-example message is bounded -- the sensitivity a noise codec after it relies on.
  Examples already within the bound pass unchanged. Biased: clipped examples shrink. The
  payload is the clipped tree; decode is the identity.

  Args:
    max_norm: the bound, ``> 0``.

  Returns:
    A stateless :class:`Codec`.

  Raises:
    ValueError: if ``max_norm <= 0``, or (on encode) if the floating leaves disagree on the
      batch size.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = clip(max_norm=1.0)
    >>> x = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    >>> payload, _ = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> jnp.linalg.norm(codec.decode(payload), axis=1).round(3).tolist()
    [1.0, 0.5]
  """
  if not max_norm > 0:
    raise ValueError(f"clip: max_norm must be > 0; got max_norm={max_norm!r}.")
  config = _config("clip", max_norm=float(max_norm))

  def encode(tree, state, key):
    del key
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    rows = {
        position: _rows(leaf, "clip").astype(jnp.float32)
        for position, leaf in enumerate(leaves)
        if _is_float(leaf)
    }
    if not rows:
      return tree, state
    if len({rows_BxD.shape[0] for rows_BxD in rows.values()}) != 1:
      raise ValueError(
          "clip: the floating leaves of `tree` must share the leading batch axis; got "
          f"shapes {[tuple(leaves[position].shape) for position in rows]}."
      )
    norm_B = jnp.sqrt(sum(jnp.sum(jnp.square(rows_BxD), axis=1) for rows_BxD in rows.values()))
    tiny = jnp.finfo(jnp.float32).tiny  # a zero row stays zero instead of dividing by zero
    factor_Bx1 = jnp.minimum(1.0, max_norm / jnp.maximum(norm_B, tiny))[:, None]
    for position, rows_BxD in rows.items():
      leaf = leaves[position]
      leaves[position] = (rows_BxD * factor_Bx1).astype(leaf.dtype).reshape(leaf.shape)
    return treedef.unflatten(leaves), state

  def decode(payload):
    return payload

  return _jitted_codec(_init_empty, encode, decode, config=config)


def chain(*codecs: Codec) -> Codec:
  """Composes codecs: encode runs them in order, decode in reverse.

  Each codec's payload is the next one's input tree, and its state is the tuple of the inner
  states. Each inner codec gets its own key, split from the one passed to encode. The chain is
  unbiased when its inner codecs are and each decoder is affine in the values the later codecs
  act on -- e.g. ``chain(random_k(k=...), quantize(bits=...))``; clipping or nearest rounding
  anywhere makes it biased.

  Args:
    *codecs: the codecs to compose, first applied first.

  Returns:
    A :class:`Codec` whose state is a tuple of the inner states.

  Raises:
    TypeError: if an argument is not a :class:`Codec`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> codec = chain(clip(max_norm=1.0), quantize(bits=8))
    >>> x = jnp.full((2, 16), 3.0)
    >>> payload, state = codec.encode(x, codec.init(x), jax.random.key(0))
    >>> codec.decode(payload)[0, 0].round(3).item(), payload_nbytes(payload)  # 3 -> 1/sqrt(16)
    (0.25, 48)
  """
  for position, codec in enumerate(codecs):
    if not isinstance(codec, Codec):
      raise TypeError(
          f"chain: every argument must be a Codec; got {type(codec).__name__} at position "
          f"{position}."
      )

  def init(example_tree):
    states = []
    for position, codec in enumerate(codecs):
      state = codec.init(example_tree)
      states.append(state)
      if position + 1 < len(codecs):
        # The next codec's input is this codec's payload; its shapes are all init needs.
        example_tree, _ = jax.eval_shape(codec.encode, example_tree, state,
                                         jax.random.key(0))
    return tuple(states)

  def encode(tree, state, key):
    if not isinstance(state, tuple) or len(state) != len(codecs):
      length = len(state) if isinstance(state, tuple) else "n/a"
      raise ValueError(
          f"chain: `state` must be the tuple of {len(codecs)} inner states from init; got "
          f"{type(state).__name__} of length {length}."
      )
    keys = jax.random.split(key, len(codecs)) if codecs else []
    new_states = []
    for codec, inner_state, inner_key in zip(codecs, state, keys):
      tree, inner_state = codec.encode(tree, inner_state, inner_key)
      new_states.append(inner_state)
    return tree, tuple(new_states)

  def decode(payload):
    for codec in reversed(codecs):
      payload = codec.decode(payload)
    return payload

  def backward(payload, g):
    # Each codec's own payload, recovered by decoding the later ones (indices pass through
    # exactly). The codecs that act on trees shaped like the message (those before the first
    # one whose payload is not) map the cotangent back, last applied first; the later codecs
    # act on an earlier payload's values and pass the gradient straight through.
    payloads = [payload]
    for codec in reversed(codecs[1:]):
      payloads.insert(0, codec.decode(payloads[0]))
    message_structure = jax.tree.structure(g)
    acting = 1
    while acting < len(codecs) and jax.tree.structure(payloads[acting - 1]) == message_structure:
      acting += 1
    for codec, own in reversed(list(zip(codecs[:acting], payloads[:acting]))):
      g = cotangent(codec, own, g)
    return g

  has_backward = any(codec.backward is not None for codec in codecs)
  described = all(codec.config is not None for codec in codecs)
  config = _config("chain", codecs=[describe(codec) for codec in codecs]) if described else None
  return _jitted_codec(init, encode, decode, backward if has_backward else None, config=config)
