"""Vertical split learning, one step: several parties' bottoms, the label party's merge and top.

Vertical split learning (Vepakomma et al. 2018, "Split learning for health: distributed deep
learning without sharing raw patient data", vertically partitioned data; Ceballos et al. 2020,
"SplitNN-driven vertical partitioning"): the parties hold different feature columns of the same
examples. One training step with P parties:

    party_forward[p]   smashed_p = f_p(params_p, x_p) under jax.vjp   --- SmashedData(smashed_p) --->
    top_step           loss = L(top(merge(smashed_0, ..., smashed_P-1)), y); update merge and top
                       <--- CutGradient(dL/dsmashed_p), one per party ---
    party_backward[p]  grads_p = pullback_p(dL/dsmashed_p); update params_p

The labels stay with the label party, which may hold features of its own (a bottom of its own,
`VerticalModel.label_party`). Every leg is pure; each party's pullback stays in its
`ClientPending`, never in a message. The fused `step` calls exactly these legs; the multi-party
schedule and its network protocol are built on them, not here.

Keys: the step key is split into P + 1 keys, `jax.random.split(key, P + 1)`: party p's leg takes
key p, `top_step` the last (its stack splits it into merge, then top), exactly as
`VerticalModel.compose()` splits it, so split training equals centralized training of the
composed model, dropout included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from sljax import messages as msgs
from sljax.protocol import (
    ArraySpec,
    ClientPending,
    Metrics,
    PartyState,
    _client_vjp,
    accuracy,
    apply_update,
    check_batch,
    check_labels,
    softmax_cross_entropy,
)
from sljax.split import VerticalModel, describe

PyTree = Any


@struct.dataclass
class VerticalState:
  """The state of a vertical split: every party's `PartyState`, the label party's (merge and top), the step.

  The top's `input_spec` is a tuple of `ArraySpec`s, one per party's smashed data.
  """

  parties: tuple[PartyState, ...]
  top: PartyState
  step: jax.Array

  @property
  def params(self) -> tuple:
    """The params in the layout of `VerticalModel.compose()`: one entry per party, then (merge, top)."""
    return tuple(p.params for p in self.parties) + (self.top.params,)

  @property
  def model_state(self) -> tuple:
    """The model state in the layout of `VerticalModel.compose()`."""
    return tuple(p.model_state for p in self.parties) + (self.top.model_state,)


class VerticalSL(NamedTuple):
  """Vertical split learning: pure legs and their fused composition. Built by `vertical_sl`.

  `party_forward` and `party_backward` hold one function per party, in order (each closes over its
  party's bottom and optimizer): `sl.party_forward[p](state.parties[p], x_p, key)`. The last
  fields are the configuration it was built with.
  """

  init: Callable[..., VerticalState]
  party_forward: tuple[Callable[..., tuple[msgs.SmashedData, ClientPending]], ...]
  top_step: Callable[..., tuple[PartyState, tuple[msgs.CutGradient, ...], dict]]
  party_backward: tuple[Callable[..., PartyState], ...]
  step: Callable[..., tuple[VerticalState, Metrics]]
  predict: Callable[..., tuple[jax.Array, Metrics]]
  model: VerticalModel
  party_optimizers: tuple[optax.GradientTransformation, ...]
  top_optimizer: optax.GradientTransformation
  loss: Callable[[jax.Array, jax.Array], jax.Array]


def vertical_sl(
    model: VerticalModel,
    *,
    party_optimizers: optax.GradientTransformation | Sequence[optax.GradientTransformation],
    top_optimizer: optax.GradientTransformation,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> VerticalSL:
  """The legs of one vertical split-learning step over the parties of `model`.

  Args:
    model: a `VerticalModel` (`sljax.vertical_model`).
    party_optimizers: one optax transformation per party, in order, or one for all (each party
      still keeps its own optimizer state).
    top_optimizer: the label party's, for the merge and the top (params `(merge, top)`).
    loss: `loss(outputs, labels) -> scalar`, computed by the label party.

  Returns:
    A `VerticalSL`: `init(key, xs) -> VerticalState`; the legs
    `party_forward[p](party, x_p, key) -> (SmashedData, ClientPending)`,
    `top_step(top, messages, labels, key) -> (top, (CutGradient, ...), metrics)` and
    `party_backward[p](party, pending, CutGradient) -> party`; the fused
    `step(state, (xs, labels), key) -> (state, metrics)` calling exactly those legs; and
    `predict(state, xs) -> (outputs, metrics)` in eval mode. Bytes count the messages of the
    parties other than `model.label_party`, whose smashed data stays with the label party.

  With no randomness in the parts and the same element-wise optimizer everywhere (sgd, adam),
  `step` follows centralized training of `model.compose()` exactly; the tests hold it to that.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, sljax
    >>> model = sljax.vertical_model([nn.Dense(8), nn.Dense(8)], sljax.merges.sum(), nn.Dense(10))
    >>> sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.adam(1e-3))
    >>> xs, y = (jnp.ones((4, 5)), jnp.ones((4, 3))), jnp.zeros((4,), jnp.int32)
    >>> state = sl.init(jax.random.key(0), xs)
    >>> state, metrics = jax.jit(sl.step)(state, (xs, y), jax.random.key(1))
    >>> metrics["bytes_up"] == 2 * sljax.wire_size(sljax.SmashedData(jnp.ones((4, 8))))
    True
  """
  if not isinstance(model, VerticalModel):
    raise TypeError(f"model: expected a VerticalModel (sljax.vertical_model), got {type(model).__name__}")
  n = model.num_parties
  optimizers = _party_optimizers(party_optimizers, model.names)
  if not isinstance(top_optimizer, optax.GradientTransformation):
    raise TypeError(f"top_optimizer: expected an optax.GradientTransformation, got {type(top_optimizer).__name__}")
  label_stage = model.label_stage
  remote = tuple(name != model.label_party for name in model.names)  # whose messages cross the network

  def init(key, xs) -> VerticalState:
    xs = tuple(jnp.asarray(x) for x in model.check_inputs(xs))
    return jax.jit(_init_traced)(key, xs)

  def _init_traced(key, xs) -> VerticalState:
    params, model_state = model.init(key, xs)
    # Traced under jit for their shapes only: XLA drops what the state does not use.
    hs = tuple(b.apply(p, s, x, key=None, train=False)[0]
               for b, p, s, x in zip(model.bottoms, params[:n], model_state[:n], xs, strict=True))
    out, _ = label_stage.apply(params[n], model_state[n], hs, key=None, train=False)
    _check_loss(loss, xs[0].shape[0], out)
    parties = tuple(PartyState(p, s, opt.init(p), ArraySpec.of(x))
                    for p, s, opt, x in zip(params[:n], model_state[:n], optimizers, xs, strict=True))
    top = PartyState(params[n], model_state[n], top_optimizer.init(params[n]), tuple(ArraySpec.of(h) for h in hs))
    return VerticalState(parties, top, jnp.zeros((), jnp.int32))

  def make_party_forward(p: int):
    bottom, name = model.bottoms[p], model.names[p]

    def party_forward(party: PartyState, x, key) -> tuple[msgs.SmashedData, ClientPending]:
      """Party p's forward: its bottom under `jax.vjp` on its columns; the smashed data goes up, no labels."""
      check_batch(f"x (party {name!r})", x, party.input_spec)
      smashed, pullback, model_state, _ = _client_vjp(bottom, None, party.params, party.model_state, x, key)
      return msgs.SmashedData(smashed), ClientPending(pullback, model_state)

    return party_forward

  def make_party_backward(p: int):
    optimizer = optimizers[p]

    def party_backward(party: PartyState, pending: ClientPending, message: msgs.CutGradient) -> PartyState:
      """Party p's backward: its pullback on the gradient at its smashed data, then its optimizer step."""
      (grads,) = pending.pullback(message.grad)
      return apply_update(party, grads, optimizer, pending.model_state)

    return party_backward

  def top_step(top: PartyState, messages: Sequence[msgs.SmashedData], labels,
               key) -> tuple[PartyState, tuple[msgs.CutGradient, ...], dict]:
    """The label party's step: merge and top on every party's smashed data, the loss, one update of
    (merge, top), and the gradient at each party's smashed data, in party order."""
    if not isinstance(messages, (tuple, list)) or len(messages) != n:
      got = f"{len(messages)} messages" if isinstance(messages, (tuple, list)) else type(messages).__name__
      raise ValueError(f"messages: expected {n} SmashedData, one per party {model.names}, got {got}")
    hs = tuple(m.activations for m in messages)
    for i, (h, spec) in enumerate(zip(hs, top.input_spec, strict=True)):
      check_batch(f"messages[{i}].activations (party {model.names[i]!r})", h, spec,
                  batch=None if i == 0 else hs[0].shape[0])
    check_labels(labels, batch=hs[0].shape[0])

    def objective(params, hs):
      out, model_state = label_stage.apply(params, top.model_state, hs, key=key, train=True)
      return loss(out, labels), (out, model_state)

    (value, (out, model_state)), (g_params, g_hs) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        top.params, hs)
    metrics = {"loss": value, "accuracy": accuracy(out, labels)}
    return apply_update(top, g_params, top_optimizer, model_state), tuple(msgs.CutGradient(g) for g in g_hs), metrics

  party_forward = tuple(make_party_forward(p) for p in range(n))
  party_backward = tuple(make_party_backward(p) for p in range(n))

  def step(state: VerticalState, batch, key) -> tuple[VerticalState, Metrics]:
    xs, labels = batch
    xs = model.check_inputs(xs)
    keys = jax.random.split(key, n + 1)
    ups, pendings = zip(*(party_forward[p](state.parties[p], xs[p], keys[p]) for p in range(n)), strict=True)
    top, downs, metrics = top_step(state.top, ups, labels, keys[n])
    parties = tuple(party_backward[p](state.parties[p], pendings[p], downs[p]) for p in range(n))
    metrics = Metrics(metrics, {"bytes_up": _bytes(ups, remote), "bytes_down": _bytes(downs, remote)})
    return VerticalState(parties, top, state.step + 1), metrics

  def predict(state: VerticalState, xs) -> tuple[jax.Array, Metrics]:
    """Collaborative inference in eval mode: every bottom on its columns, then the label party's merge and top."""
    xs = model.check_inputs(xs)
    ups = []
    for p, (bottom, party, x) in enumerate(zip(model.bottoms, state.parties, xs, strict=True)):
      check_batch(f"xs[{p}] (party {model.names[p]!r})", x, party.input_spec)
      ups.append(msgs.SmashedData(bottom.apply(party.params, party.model_state, x, key=None, train=False)[0]))
    hs = tuple(m.activations for m in ups)
    out, _ = label_stage.apply(state.top.params, state.top.model_state, hs, key=None, train=False)
    return out, Metrics({}, {"bytes_up": _bytes(ups, remote), "bytes_down": 0})

  return VerticalSL(init=init, party_forward=party_forward, top_step=top_step, party_backward=party_backward,
                    step=step, predict=predict, model=model, party_optimizers=optimizers,
                    top_optimizer=top_optimizer, loss=loss)


def _party_optimizers(optimizers, names: tuple[str, ...]) -> tuple[optax.GradientTransformation, ...]:
  # An optax transformation is a NamedTuple, hence a Sequence: test for it first.
  if isinstance(optimizers, optax.GradientTransformation):
    return (optimizers,) * len(names)
  if not isinstance(optimizers, Sequence) or len(optimizers) != len(names):
    got = f"{len(optimizers)} of them" if isinstance(optimizers, Sequence) else type(optimizers).__name__
    raise ValueError(f"party_optimizers: expected one optax transformation for all parties or one per party "
                     f"{names}, got {got}")
  for name, opt in zip(names, optimizers, strict=True):
    if not isinstance(opt, optax.GradientTransformation):
      raise TypeError(f"party_optimizers: expected an optax.GradientTransformation for party {name!r}, "
                      f"got {type(opt).__name__}")
  return tuple(optimizers)


def _bytes(messages, remote: tuple[bool, ...]) -> int:
  return int(sum(msgs.wire_size(m) for m, r in zip(messages, remote, strict=True) if r))


def _check_loss(loss: Callable, batch: int, out) -> None:
  """Raises a ValueError unless `loss(out, labels)` with (batch,) integer labels is a scalar."""
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  out = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), out)
  try:
    value = jax.eval_shape(loss, out, labels)
  except Exception as e:  # noqa: BLE001 -- re-raised with the shapes the loss was given
    raise ValueError(f"loss: cannot take the top's outputs of shape {describe(out)} with labels of shape "
                     f"({batch},) int32: {e}") from None
  if getattr(value, "shape", None) != ():
    raise ValueError(f"loss: expected a scalar, got {describe(value)} for outputs of shape {describe(out)}")
