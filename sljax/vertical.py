"""Vertical split learning: several parties' bottoms, the label party's merge and top (docs/vertical.md).

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

Around the step: `vertical_centralized` (the composed model trained in one place on the joined
columns, the reference) and `vertical_evaluate` (accuracy, loss, AUC over every party's columns);
`sljax.fit` trains either over epochs; `sljax.align` lines the parties' rows up by ID first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sljax import codecs as codec_lib
from sljax import messages as msgs
from sljax.protocol import (
    CODEC_STREAM,
    ArraySpec,
    Centralized,
    ClientPending,
    Metrics,
    PartyState,
    _client_vjp,
    _fresh_encode,
    _transform_cut_gradient,
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

  The top's `input_spec` is a tuple of `ArraySpec`s, one per party's smashed data. `replacement`
  (with `vertical_sl(..., replacement="learned")`): per party, the label party's learned stand-in
  for that party's embedding of one sample (params of the party's smashed shape, with the top's
  optimizer), used where the party is absent; None with zero stand-ins.
  """

  parties: tuple[PartyState, ...]
  top: PartyState
  step: jax.Array
  replacement: tuple[PartyState, ...] | None = None

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
  fields are the configuration it was built with (codecs and hooks as one entry per party: the
  identity codec, or None, where a party has none).
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
  uplinks: tuple[codec_lib.Codec, ...] = ()
  downlinks: tuple[codec_lib.Codec, ...] = ()
  client_losses: tuple[Callable | None, ...] = ()
  cut_gradient_transforms: tuple[Callable | None, ...] = ()
  vectorize: bool = False
  replacement: str = "zero"


def vertical_sl(
    model: VerticalModel,
    *,
    party_optimizers: optax.GradientTransformation | Sequence[optax.GradientTransformation],
    top_optimizer: optax.GradientTransformation,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    uplink: codec_lib.Codec | Sequence[codec_lib.Codec | None] | None = None,
    downlink: codec_lib.Codec | Sequence[codec_lib.Codec | None] | None = None,
    client_loss: Callable[..., jax.Array] | Sequence[Callable | None] | None = None,
    cut_gradient_transform: Callable[..., Any] | Sequence[Callable | None] | None = None,
    vectorize: bool = False,
    replacement: str = "zero",
) -> VerticalSL:
  """The legs of one vertical split-learning step over the parties of `model`.

  Codecs and privacy hooks are per party. Each of `uplink`, `downlink`, `client_loss` and
  `cut_gradient_transform` is None (none), one value for every party whose messages cross the
  network (all but `model.label_party`), or a sequence with one entry (or None) per party, in
  order; the label party's own bottom takes none (its messages never leave it).

  Args:
    model: a `VerticalModel` (`sljax.vertical_model`).
    party_optimizers: one optax transformation per party, in order, or one for all (each party
      still keeps its own optimizer state).
    top_optimizer: the label party's, for the merge and the top (params `(merge, top)`).
    loss: `loss(outputs, labels) -> scalar`, computed by the label party.
    uplink: the codec party p applies to its smashed data (`sljax.codecs`, e.g. the noise codecs
      of `sljax.privacy.defenses`); its state is `state.parties[p].codec_state`. Randomness:
      fold_in(party p's key, CODEC_STREAM), as in `vanilla`.
    downlink: the codec the label party applies to party p's cut gradient; its states are
      `state.top.codec_state[p]`. Randomness: fold_in(fold_in(label key, CODEC_STREAM), p).
    client_loss: `client_loss(x, smashed[, key]) -> scalar`, a term party p adds to its own
      objective (e.g. `sljax.privacy.defenses.nopeek`); reported as `client_loss_<name>`.
    cut_gradient_transform: `fn(grad, labels, key) -> grad` the label party applies to party p's
      cut gradient before its downlink codec (e.g. `defenses.max_norm()`, `defenses.marvell()`);
      key: fold_in(label key, p), then the transform's stream as in `vanilla`.
    vectorize: in the fused `step`, run the parties' legs as one `jax.vmap` over their stacked
      states instead of a Python loop over the parties (both inside the one jitted program).
      Needs every party to run the same legs: bottoms of one architecture on inputs of one shape,
      the same optimizer, codecs and hooks (checked at trace time: an error names the party that
      differs). The same math; the states are stacked and unstacked inside the step, so on a
      2-core CPU it was no faster than the loop for 2 and 4 small MLP bottoms
      (experiments/benchmarks/vertical.py); it is there for many parties or an accelerator.
    replacement: what the label party puts in an absent party's place (`step` and `predict` with
      `absent=`): "zero", a zero embedding; or "learned", a vector per party of its smashed
      data's shape, learned with `top_optimizer` in the steps where that party is absent (train
      some steps with `absent=` to learn it: `sljax.vertical.without(sl, names)` for `fit`).

  Parties that fail: `step(state, batch, key, absent=names)` trains without the parties `names`
  (static): their embeddings replaced as above, their states and downlink codec states left as
  they are, nothing sent to or from them, their bytes not counted. `step(..., present=mask)` does
  the same with a (P,) bool mask (True: the party takes part) that may be traced: one jitted program
  for every mask (e.g. random party dropout, `sljax.vertical.with_dropout`). Every party's legs
  then run and `jnp.where` keeps what the absent ones would not have done, with the same numbers as
  `absent=` for that mask; the bytes are arrays (0 for an absent party), the metrics add `present`
  and `discarded`, and an absent party's `client_loss_<name>` is NaN. A mask without any party, or
  (traced) without the label party, discards the step; a concrete one without the label party is
  an error. Not with `absent=`; `vectorize` is not used with it. `step(..., dropped=flags)`
  with (P,) bools (traced) discards the whole step everywhere when any party dropped during it
  (after its forward, as in horizontal SL): the state comes back as it was, `metrics["discarded"]`
  says so, and the bytes sent before the drop are still counted.

  Returns:
    A `VerticalSL`: `init(key, xs) -> VerticalState`; the legs
    `party_forward[p](party, x_p, key) -> (SmashedData, ClientPending)`,
    `top_step(top, messages, labels, key) -> (top, (CutGradient, ...), metrics)` and
    `party_backward[p](party, pending, CutGradient) -> party`; the fused
    `step(state, (xs, labels), key) -> (state, metrics)` calling exactly those legs; and
    `predict(state, xs) -> (outputs, metrics)` in eval mode (`xs` a tuple in party order or a dict
    by party name; a missing party is an error naming it). Bytes count the messages of the
    parties other than `model.label_party`, whose smashed data stays with the label party:
    `bytes_up`/`bytes_down` in all, and `bytes_up_<name>`/`bytes_down_<name>` per party.

  Stateful codecs (error feedback) size their state from the batch given to `init`: initialise
  with a batch of the training batch size, as for `vanilla`.

  With no codec, no hook, no randomness in the parts and the same element-wise optimizer
  everywhere (sgd, adam), `step` follows centralized training of `model.compose()` exactly; the
  tests hold it to that.

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
  if replacement not in ("zero", "learned"):
    raise ValueError(f"replacement: expected 'zero' or 'learned' (what stands in for an absent party), got "
                     f"{replacement!r}")
  remote = tuple(name != model.label_party for name in model.names)  # whose messages cross the network
  is_codec = lambda c: isinstance(c, codec_lib.Codec)  # noqa: E731
  identity = codec_lib.identity()  # one object for every party without a codec (see _check_vectorizable)
  up_codecs = tuple(c or identity for c in _per_party("uplink", uplink, model, is_codec, "a sljax.codecs.Codec"))
  down_codecs = tuple(c or identity for c in _per_party("downlink", downlink, model, is_codec, "a sljax.codecs.Codec"))
  client_losses = _per_party("client_loss", client_loss, model, callable, "a callable (x, smashed[, key]) -> scalar")
  transforms = _per_party("cut_gradient_transform", cut_gradient_transform, model, callable,
                          "a callable (grad, labels, key) -> grad")

  def init(key, xs) -> VerticalState:
    xs = tuple(jnp.asarray(x) for x in _party_inputs(model, xs))
    return jax.jit(_init_traced)(key, xs)

  def _init_traced(key, xs) -> VerticalState:
    params, model_state = model.init(key, xs)
    # Traced under jit for their shapes only: XLA drops what the state does not use.
    hs = tuple(b.apply(p, s, x, key=None, train=False)[0]
               for b, p, s, x in zip(model.bottoms, params[:n], model_state[:n], xs, strict=True))
    out, _ = label_stage.apply(params[n], model_state[n], hs, key=None, train=False)
    _check_loss(loss, xs[0].shape[0], out)
    parties = tuple(PartyState(p, s, opt.init(p), ArraySpec.of(x), codec.init(h))
                    for p, s, opt, x, codec, h in zip(params[:n], model_state[:n], optimizers, xs, up_codecs, hs,
                                                      strict=True))
    top = PartyState(params[n], model_state[n], top_optimizer.init(params[n]), tuple(ArraySpec.of(h) for h in hs),
                     tuple(codec.init(h) for codec, h in zip(down_codecs, hs, strict=True)))
    stand_ins = None
    if replacement == "learned":
      zeros = tuple(jnp.zeros(h.shape[1:], h.dtype) for h in hs)
      stand_ins = tuple(PartyState(z, (), top_optimizer.init(z), ArraySpec.of(h))
                        for z, h in zip(zeros, hs, strict=True))
    return VerticalState(parties, top, jnp.zeros((), jnp.int32), stand_ins)

  def make_party_forward(p: int):
    bottom, name, codec = model.bottoms[p], model.names[p], up_codecs[p]

    def party_forward(party: PartyState, x, key) -> tuple[msgs.SmashedData, ClientPending]:
      """Party p's forward: its bottom under `jax.vjp` on its columns; the (encoded) smashed data goes up, no labels."""
      check_batch(f"x (party {name!r})", x, party.input_spec)
      smashed, pullback, model_state, metrics = _client_vjp(bottom, client_losses[p], party.params,
                                                            party.model_state, x, key)
      payload, codec_state = codec.encode(smashed, party.codec_state, jax.random.fold_in(key, CODEC_STREAM))
      metrics = {f"client_loss_{name}": v for v in metrics.values()}
      return msgs.SmashedData(payload), ClientPending(pullback, model_state, codec_state, payload, metrics)

    return party_forward

  def make_party_backward(p: int):
    optimizer, up, down = optimizers[p], up_codecs[p], down_codecs[p]

    def party_backward(party: PartyState, pending: ClientPending, message: msgs.CutGradient) -> PartyState:
      """Party p's backward: its pullback on the (decoded) gradient at its smashed data, then its optimizer step."""
      (grads,) = pending.pullback(codec_lib.cotangent(up, pending.sent, down.decode(message.grad)))
      return apply_update(party, grads, optimizer, pending.model_state).replace(codec_state=pending.codec_state)

    return party_backward

  def top_step(top: PartyState, messages: Sequence[msgs.SmashedData], labels,
               key) -> tuple[PartyState, tuple[msgs.CutGradient, ...], dict]:
    """The label party's step: merge and top on every party's smashed data, the loss, one update of
    (merge, top), and the gradient at each party's smashed data, in party order."""
    if not isinstance(messages, (tuple, list)) or len(messages) != n:
      got = f"{len(messages)} messages" if isinstance(messages, (tuple, list)) else type(messages).__name__
      raise ValueError(f"messages: expected {n} SmashedData, one per party {model.names}, got {got}")
    hs = tuple(codec.decode(m.activations) for codec, m in zip(up_codecs, messages, strict=True))
    for i, (h, spec) in enumerate(zip(hs, top.input_spec, strict=True)):
      check_batch(f"messages[{i}].activations (party {model.names[i]!r})", h, spec,
                  batch=None if i == 0 else hs[0].shape[0])
    check_labels(labels, batch=hs[0].shape[0])

    def objective(params, hs):
      out, model_state = label_stage.apply(params, top.model_state, hs, key=key, train=True)
      return loss(out, labels), (out, model_state)

    (value, (out, model_state)), (g_params, g_hs) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        top.params, hs)
    downs, codec_states = [], []
    for p, g in enumerate(g_hs):
      if transforms[p] is not None:
        g = _transform_cut_gradient(transforms[p], g, labels, jax.random.fold_in(key, p))
      payload, codec_state = down_codecs[p].encode(
          g, top.codec_state[p], jax.random.fold_in(jax.random.fold_in(key, CODEC_STREAM), p))
      downs.append(msgs.CutGradient(payload))
      codec_states.append(codec_state)
    metrics = {"loss": value, "accuracy": accuracy(out, labels)}
    top = apply_update(top, g_params, top_optimizer, model_state).replace(codec_state=tuple(codec_states))
    return top, tuple(downs), metrics

  party_forward = tuple(make_party_forward(p) for p in range(n))
  party_backward = tuple(make_party_backward(p) for p in range(n))

  def _check_vectorizable(state: VerticalState, xs, keys) -> None:
    """At trace time: every party runs the same legs (bottom, input shape, optimizer, codecs, hooks)."""
    configs = tuple(zip(optimizers, up_codecs, down_codecs, client_losses, transforms, strict=True))

    def program(p):
      party = state.parties[p]
      fn = lambda params, x, k: model.bottoms[p].apply(params, party.model_state, x, key=k, train=True)  # noqa: E731
      return str(jax.make_jaxpr(fn)(party.params, xs[p], keys[p]))

    first = program(0)
    for p in range(1, n):
      what = None
      if state.parties[p].input_spec != state.parties[0].input_spec:
        specs = state.parties[p].input_spec.describe(), state.parties[0].input_spec.describe()
        what = f"input shape ({specs[0]} against {specs[1]})"
      elif any(a is not b for a, b in zip(configs[p], configs[0], strict=True)) or model.names[p] == model.label_party:
        what = "optimizer, codecs or hooks (pass one of each for every party; no label party's own bottom)"
      elif program(p) != first:
        what = "bottom (another architecture, params or model state)"
      if what is not None:
        raise ValueError(f"vectorize: party {model.names[p]!r} differs from party {model.names[0]!r} in its {what}; "
                         f"vectorize=True runs party 0's legs for every party, vmapped")

  def stand_in(state: VerticalState, p: int, batch: int) -> jax.Array:
    """What stands in for absent party p's smashed data: its learned vector, or zeros, per sample."""
    spec = state.top.input_spec[p]
    if state.replacement is None:
      return jnp.zeros((batch, *spec.shape), spec.dtype)
    return jnp.broadcast_to(state.replacement[p].params, (batch, *spec.shape))

  def step(state: VerticalState, batch, key, *, absent: Sequence[str] = (), present=None,
           dropped=None) -> tuple[VerticalState, Metrics]:
    absent = _check_absent(model, absent) if absent else ()
    if model.label_party in absent:
      raise ValueError(f"absent: party {model.label_party!r} is the label party, which runs the step; it cannot be "
                       "absent in training")
    if present is not None:
      if absent:
        raise ValueError(f"present: expected either absent= (static names) or present= (a mask), not both; got "
                         f"absent={absent}")
      return _step_in_a_loop(state, batch, key, _check_present(present), dropped)
    if absent or not vectorize:
      return _step_in_a_loop(state, batch, key, tuple(name not in absent for name in model.names), dropped)
    # party 0's legs vmapped over the parties' stacked states: one batched program
    xs, labels = batch
    xs = _party_inputs(model, xs)
    keys = jax.random.split(key, n + 1)
    _check_vectorizable(state, xs, keys)
    stacked = _stack(state.parties)
    ups_P, pendings_P = jax.vmap(party_forward[0])(stacked, jnp.stack(xs), keys[:n])
    ups, pendings = _unstack(ups_P, n), _unstack(pendings_P, n)
    top, downs, metrics = top_step(state.top, ups, labels, keys[n])
    parties = _unstack(jax.vmap(party_backward[0])(stacked, pendings_P, _stack(downs)), n)
    for name, pending in zip(model.names, pendings, strict=True):
      metrics.update({f"client_loss_{name}": v for v in pending.metrics.values()})
    new = VerticalState(parties, top, state.step + 1, state.replacement)
    return _discard_if(dropped, new, state, metrics, _traffic(model.names, ups, downs, remote))

  def _discard_if(dropped, new: VerticalState, old: VerticalState, metrics: dict, traffic: dict, *,
                  cannot_train=None):
    """`new`, or `old` where any party dropped during the step (`dropped`, (P,) bools, traced) or the
    step could not train (`cannot_train`, a traced bool)."""
    if dropped is None and cannot_train is None:
      return new, Metrics(metrics, traffic)
    discarded = cannot_train
    if dropped is not None:
      dropped = jnp.asarray(dropped)
      if dropped.shape != (n,) or dropped.dtype != jnp.bool_:
        raise ValueError(f"dropped: expected ({n},) bools, one per party {model.names}, got {dropped.shape} "
                         f"{dropped.dtype}")
      discarded = jnp.any(dropped) if cannot_train is None else jnp.any(dropped) | cannot_train
    new = jax.tree.map(lambda a, b: jnp.where(discarded, b, a), new, old)
    return new, Metrics({**metrics, "discarded": discarded}, traffic)

  def _check_present(present) -> tuple:
    """`step`'s `present`, (P,) bools (traced or not), as one traced bool per party; a concrete mask with
    the label party absent is refused (traced, its step is discarded)."""
    if not isinstance(present, jax.Array | np.ndarray) or present.shape != (n,) or present.dtype != np.bool_:
      got = (f"{present.shape} {present.dtype}" if isinstance(present, jax.Array | np.ndarray)
             else type(present).__name__)
      raise ValueError(f"present: expected a ({n},) bool array, one per party {model.names} (True: it takes part), "
                       f"got {got}")
    if not isinstance(present, jax.core.Tracer):  # a concrete mask: its values checked here
      flags = np.asarray(present)
      if model.label_party is not None and not flags[model.names.index(model.label_party)]:
        raise ValueError(f"present: party {model.label_party!r} is the label party, which runs the step; it cannot "
                         f"be absent in training, got present={flags.tolist()}")
    present = jnp.asarray(present)
    return tuple(present[p] for p in range(n))

  def _step_in_a_loop(state: VerticalState, batch, key, on: tuple, dropped):
    """`step` with a Python loop over the parties (inside the one jitted program). `on[p]`: whether
    party p takes part, a Python bool (static: a program per set of absent parties; `absent=`) or
    a traced bool (one program for every mask; `present=`). An absent party's embedding is stood
    in for (see `stand_in`); its state, and the downlink codec state of its gradient, are left as
    they are; nothing is sent to or from it. With traced flags every party's legs run and
    `jnp.where` keeps what an absent party would not have done, so both give the same numbers."""
    xs, labels = batch
    absent = tuple(name for name, o in zip(model.names, on, strict=True) if o is False)
    xs = _party_inputs(model, xs, absent)
    keys = jax.random.split(key, n + 1)
    batch_size = next(jnp.shape(x)[0] for x in xs if x is not None)

    def pick(p: int, taking_part, standing_in):
      """What party p's place holds: `taking_part()` where it takes part, else `standing_in()`."""
      if on[p] is True or on[p] is False:
        return taking_part() if on[p] else standing_in()
      return jax.tree.map(lambda a, b: jnp.where(on[p], a, b), taking_part(), standing_in())

    forwards = {p: party_forward[p](state.parties[p], xs[p], keys[p]) for p in range(n) if on[p] is not False}
    ups = tuple(pick(p, lambda p=p: forwards[p][0], lambda p=p: msgs.SmashedData(
        _fresh_encode(up_codecs[p], stand_in(state, p, batch_size), keys[p], CODEC_STREAM))) for p in range(n))
    top, downs, metrics = top_step(state.top, ups, labels, keys[n])
    top = top.replace(codec_state=tuple(pick(p, lambda c=c: c, lambda p=p: state.top.codec_state[p])
                                        for p, c in enumerate(top.codec_state)))
    parties = tuple(pick(p, lambda p=p: party_backward[p](state.parties[p], forwards[p][1], downs[p]),
                         lambda p=p: state.parties[p]) for p in range(n))
    stand_ins = state.replacement
    if stand_ins is not None:  # the absent parties' vectors learn from the gradient at their place
      stand_ins = tuple(
          pick(p, lambda r=r: r,
               lambda p=p, r=r: apply_update(r, down_codecs[p].decode(downs[p].grad).sum(0), top_optimizer, ()))
          for p, r in enumerate(stand_ins))
    for p, (_, pending) in forwards.items():  # traced flags: NaN where the party was absent (it computed nothing)
      metrics.update({f"client_loss_{model.names[p]}": pick(p, lambda v=v: v, lambda v=v: jnp.full_like(v, jnp.nan))
                      for v in pending.metrics.values()})
    present = [p for p in range(n) if on[p] is not False]
    traffic = _traffic([model.names[p] for p in present], [ups[p] for p in present], [downs[p] for p in present],
                       tuple(remote[p] for p in present))
    new = VerticalState(parties, top, state.step + 1, stand_ins)
    if all(o is True or o is False for o in on):
      return _discard_if(dropped, new, state, metrics, traffic)
    # Traced flags: the bytes, as arrays, count the parties that took part; a mask that cannot train (the label
    # party absent, or every party) discards the step.
    flags = jnp.stack(on)
    for direction in ("up", "down"):
      per_party = {name: jnp.where(flags[model.names.index(name)], traffic[f"bytes_{direction}_{name}"], 0)
                   for name in model.names if f"bytes_{direction}_{name}" in traffic}
      metrics.update({f"bytes_{direction}_{name}": b for name, b in per_party.items()})
      metrics[f"bytes_{direction}"] = sum(per_party.values(), jnp.zeros((), jnp.int32))
    cannot_train = ~jnp.any(flags)
    if model.label_party is not None:
      cannot_train |= ~flags[model.names.index(model.label_party)]
    return _discard_if(dropped, new, state, {**metrics, "present": flags}, {}, cannot_train=cannot_train)

  def predict(state: VerticalState, xs, key=None, *, absent: Sequence[str] = ()) -> tuple[jax.Array, Metrics]:
    """Collaborative inference in eval mode: every bottom on its columns (through its uplink codec,
    from a fresh codec state), then the label party's merge and top. `xs`: a tuple in party order
    or a dict by party name; every party must take part, unless named in `absent`: the label party
    then puts its stand-in in that party's place (zeros, or the learned vector with
    `replacement="learned"`; its columns may be left out, or None)."""
    absent = _check_absent(model, absent)
    xs = _party_inputs(model, xs, absent)
    batch = next(jnp.shape(x)[0] for x in xs if x is not None)
    hs, traffic_ups, traffic_remote = [], [], []
    for p, (bottom, party, x) in enumerate(zip(model.bottoms, state.parties, xs, strict=True)):
      if model.names[p] in absent:
        hs.append(stand_in(state, p, batch))
        continue
      check_batch(f"xs[{p}] (party {model.names[p]!r})", x, party.input_spec)
      smashed = bottom.apply(party.params, party.model_state, x, key=None, train=False)[0]
      party_key = None if key is None else jax.random.fold_in(key, p)
      up = msgs.SmashedData(_fresh_encode(up_codecs[p], smashed, party_key, CODEC_STREAM))
      hs.append(up_codecs[p].decode(up.activations))
      traffic_ups.append(up)
      traffic_remote.append(remote[p])
    out, _ = label_stage.apply(state.top.params, state.top.model_state, tuple(hs), key=None, train=False)
    present = tuple(n for n in model.names if n not in absent)
    return out, Metrics({}, _traffic(present, traffic_ups, None, tuple(traffic_remote)))

  return VerticalSL(init=init, party_forward=party_forward, top_step=top_step, party_backward=party_backward,
                    step=step, predict=predict, model=model, party_optimizers=optimizers,
                    top_optimizer=top_optimizer, loss=loss, uplinks=up_codecs, downlinks=down_codecs,
                    client_losses=client_losses, cut_gradient_transforms=transforms, vectorize=vectorize,
                    replacement=replacement)


def without(sl: VerticalSL, absent: Sequence[str]) -> VerticalSL:
  """`sl` whose `step` trains without the parties `absent` (`step(..., absent=absent)`), for
  `sljax.fit`: e.g. a few epochs that learn `replacement="learned"` stand-ins, or training on when
  a party has gone for good.

  Example:
    >>> import jax.numpy as jnp, flax.linen as nn, optax, sljax
    >>> model = sljax.vertical_model([nn.Dense(4), nn.Dense(4)], sljax.merges.concat(), nn.Dense(2), names=("a", "b"))
    >>> sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
    ...                        replacement="learned")
    >>> xs, y = (jnp.ones((8, 3)), jnp.ones((8, 2))), jnp.zeros((8,), jnp.int32)
    >>> state, _ = sljax.fit(without(sl, ["b"]), sl.init(jax.random.key(0)
    ...                      , xs), xs, y, key=jax.random.key(1), epochs=1, batch_size=4)
    >>> bool(jnp.any(state.replacement[1].params != 0))  # b's stand-in learned; a's untouched
    True
  """
  absent = _check_absent(sl.model, absent)
  return sl._replace(step=functools.partial(sl.step, absent=absent))


PRESENCE_STREAM = 0x9A27E5  # fold_in(step key, PRESENCE_STREAM): who takes part in a step of `with_dropout`


def with_dropout(sl: VerticalSL, *, rate: float) -> VerticalSL:
  """`sl` whose `step` trains with random party dropout: each party other than the label party is
  absent from a step with probability `rate`, independently, for `sljax.fit`.

  The mask is drawn from the step key, `jax.random.bernoulli(fold_in(key, PRESENCE_STREAM), 1 - rate,
  (P,))` (the label party always takes part), and passed as `step(..., present=mask)`: one jitted
  program for every mask, an absent party's embedding stood in for (zeros, or the learned vector
  with `replacement="learned"`, which then learns in the steps its party misses), its state
  untouched, its bytes not counted. `metrics["present"]` says who took part; a step where no party
  does (possible only without a label party's own bottom) is discarded (`metrics["discarded"]`).
  Training so makes the model expect a party to be missing at inference
  (`vertical_evaluate(..., absent=...)`); experiments/vertical measures what it costs and gains.

  Args:
    sl: a `vertical_sl(...)`.
    rate: the probability that a party misses a step, in [0, 1). With 0 every party takes part and
      the step equals `sl.step` (bytes as arrays, and `present` and `discarded` in the metrics).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, sljax
    >>> model = sljax.vertical_model([nn.Dense(4)] * 3, sljax.merges.concat(), nn.Dense(2), names=("a", "b", "c"))
    >>> sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
    >>> xs, y = (jnp.ones((8, 3)), jnp.ones((8, 2)), jnp.ones((8, 1))), jnp.zeros((8,), jnp.int32)
    >>> state, history = sljax.fit(with_dropout(sl, rate=0.3), sl.init(jax.random.key(0), xs), xs, y,
    ...                            key=jax.random.key(1), epochs=4, batch_size=4)
    >>> one = sljax.wire_size(sljax.SmashedData(jnp.ones((4, 4))))  # one party's smashed data in one step
    >>> [h["bytes_up"] // one for h in history]  # who sent, of the 3 parties x 2 steps of each epoch
    [6, 4, 4, 3]
  """
  if not isinstance(sl, VerticalSL):
    raise TypeError(f"sl: expected a VerticalSL (sljax.vertical_sl), got {type(sl).__name__}")
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ValueError(f"rate: expected a probability in [0, 1) that a party misses a step, got {rate!r}")
  model, step = sl.model, sl.step
  label = np.array([name == model.label_party for name in model.names])

  def dropout_step(state: VerticalState, batch, key, **kwargs) -> tuple[VerticalState, Metrics]:
    present = jax.random.bernoulli(jax.random.fold_in(key, PRESENCE_STREAM), 1 - rate, (model.num_parties,))
    return step(state, batch, key, present=present | label, **kwargs)

  return sl._replace(step=dropout_step)


def vertical_centralized(
    model: VerticalModel,
    *,
    optimizer: optax.GradientTransformation,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Centralized:
  """Centralized training of `model.compose()` on the joined features: the reference for `vertical_sl`.

  One party holds every party's columns and trains the composed model (bottoms, merge, top) under
  one `optimizer`; its step takes the same `(xs, labels)` batches and the same keys as
  `vertical_sl(...).step`, so `sljax.fit` and `vertical_evaluate` drive both alike. With the same
  element-wise optimizer everywhere and no codec or hook, the two follow each other exactly.

  Args:
    model: the vertical model (`sljax.vertical_model`), trained whole as `model.compose()`.
    optimizer: the optax optimizer of the whole model.
    loss: `loss(outputs, labels)`, the per-batch mean loss; softmax cross-entropy unless given.

  Returns:
    A `Centralized` trainer: `init(key, xs)`, `step(state, (xs, labels), key)`, `predict(state, xs)`.

  Raises:
    TypeError: `model` is not a `VerticalModel` or `optimizer` not an optax optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, sljax
    >>> model = sljax.vertical_model([nn.Dense(8), nn.Dense(8)], sljax.merges.concat(), nn.Dense(2))
    >>> central = sljax.vertical_centralized(model, optimizer=optax.adam(1e-2))
    >>> xs, y = (jnp.ones((4, 5)), jnp.ones((4, 3))), jnp.zeros((4,), jnp.int32)
    >>> state = central.init(jax.random.key(0), xs)
    >>> state, metrics = jax.jit(central.step)(state, (xs, y), jax.random.key(1))
    >>> metrics["bytes_up"]
    0
  """
  if not isinstance(model, VerticalModel):
    raise TypeError(f"model: expected a VerticalModel (sljax.vertical_model), got {type(model).__name__}")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"optimizer: expected an optax.GradientTransformation, got {type(optimizer).__name__}")
  whole = model.compose()

  def init(key, xs) -> PartyState:
    xs = tuple(jnp.asarray(x) for x in _party_inputs(model, xs))

    def traced(key, xs):
      params, model_state = model.init(key, xs)
      out, _ = model.apply(params, model_state, xs, key=None, train=False)
      _check_loss(loss, xs[0].shape[0], out)
      return PartyState(params, model_state, optimizer.init(params), tuple(ArraySpec.of(x) for x in xs))

    return jax.jit(traced)(key, xs)

  def check(state: PartyState, xs) -> tuple:
    xs = _party_inputs(model, xs)
    for p, (x, spec) in enumerate(zip(xs, state.input_spec, strict=True)):
      check_batch(f"xs[{p}] (party {model.names[p]!r})", x, spec)
    return xs

  def step(state: PartyState, batch, key) -> tuple[PartyState, Metrics]:
    xs, labels = batch
    xs = check(state, xs)
    check_labels(labels, batch=xs[0].shape[0])

    def objective(params):
      out, model_state = whole.apply(params, state.model_state, xs, key=key, train=True)
      return loss(out, labels), (out, model_state)

    (value, (out, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    metrics = Metrics({"loss": value, "accuracy": accuracy(out, labels)}, {"bytes_up": 0, "bytes_down": 0})
    return apply_update(state, grads, optimizer, model_state), metrics

  def predict(state: PartyState, xs, key=None) -> tuple[jax.Array, Metrics]:
    del key
    out, _ = whole.apply(state.params, state.model_state, check(state, xs), key=None, train=False)
    return out, Metrics({}, {"bytes_up": 0, "bytes_down": 0})

  return Centralized(init, step, predict)


def vertical_evaluate(trainer: VerticalSL | Centralized, state: Any, xs: Any, y: Any, *,
                      batch_size: int = 1024, absent: Sequence[str] = ()) -> dict[str, Any]:
  """Test figures of a vertical model: collaborative inference over every party, in batches.

  Args:
    trainer: a `vertical_sl(...)` or a `vertical_centralized(...)`, with `predict(state, xs)`.
    state: its state.
    xs: the test columns of every party (a tuple in party order, or a dict by party name); every
      party must take part (a missing one is an error naming it).
    y: integer labels, one per sample.
    batch_size: the samples that go through the model at once (the last batch may be smaller:
      one more compile, for its shape).
    absent: parties that do not take part (`vertical_sl` only): a zero embedding in their place
      (see `predict`); what a missing party costs.

  Returns:
    `accuracy`, `loss` (the mean softmax cross-entropy per sample), `auc` (the ROC AUC of the
    class-1 probability, for two classes; NaN if the labels hold one class only), and the
    inference traffic `bytes_up`, `bytes_down`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, sljax
    >>> model = sljax.vertical_model([nn.Dense(8), nn.Dense(8)], sljax.merges.concat(), nn.Dense(2))
    >>> sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
    >>> xs, y = (jnp.ones((4, 5)), jnp.ones((4, 3))), jnp.array([0, 1, 0, 1])
    >>> figures = vertical_evaluate(sl, sl.init(jax.random.key(0), xs), xs, y)
    >>> sorted(figures)
    ['accuracy', 'auc', 'bytes_down', 'bytes_up', 'loss']
    >>> figures["bytes_up"] == 2 * sljax.wire_size(sljax.SmashedData(jnp.ones((4, 8))))  # each party's embeddings
    True
  """
  from sljax.training import _check_labels, reuse_program  # noqa: PLC0415 -- training imports the algorithms

  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  model = trainer.model if isinstance(trainer, VerticalSL) else None
  if model is None and absent:
    raise ValueError(f"absent: only vertical_sl's predict takes absent parties, got {type(trainer).__name__}")
  if model is not None:
    absent = _check_absent(model, absent)
    xs = _party_inputs(model, xs, absent)
  xs, y = jax.tree.map(np.asarray, tuple(xs) if isinstance(xs, list) else xs), np.asarray(y)
  _check_labels(xs, y)
  predict_fn = trainer.predict  # held for as long as the program runs (see reuse_program)
  predict = reuse_program(predict_fn, ("predict", absent),
                          lambda f: jax.jit(functools.partial(f, absent=absent) if absent else f))
  outs, bytes_up, bytes_down = [], 0, 0
  for start in range(0, len(y), batch_size):
    out, traffic = predict(state, jax.tree.map(lambda a: jnp.asarray(a[start:start + batch_size]), xs))
    outs.append(np.asarray(out, np.float64))
    bytes_up += int(traffic["bytes_up"])
    bytes_down += int(traffic["bytes_down"])
  out = np.concatenate(outs)
  log_probs = out - np.logaddexp.reduce(out, axis=-1, keepdims=True)
  figures = {"accuracy": float(np.mean(np.argmax(out, -1) == y)),
             "loss": float(-np.mean(np.take_along_axis(log_probs, y[:, None].astype(np.int64), -1)))}
  if out.shape[-1] == 2:
    figures["auc"] = _auc(y, np.exp(log_probs[:, 1]))
  return {**figures, "bytes_up": bytes_up, "bytes_down": bytes_down}


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of `scores` against binary `labels` (`sklearn.metrics.roc_auc_score`); NaN with one class only."""
  from sklearn.metrics import roc_auc_score  # noqa: PLC0415 -- slow to import

  if len(np.unique(labels)) < 2:
    return float("nan")
  return float(roc_auc_score(labels, scores))


def _stack(trees) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree, n: int) -> tuple:
  return tuple(jax.tree.map(lambda leaf, p=p: leaf[p], tree) for p in range(n))


def _party_inputs(model: VerticalModel, xs, absent: tuple[str, ...] = ()) -> tuple:
  """`xs` as a checked tuple in party order: from a tuple/list, or a dict by party name (a missing or
  unknown party named in the error). The parties in `absent` may be left out (a dict) or None (a
  tuple); their entries come back None."""
  if isinstance(xs, Mapping):
    missing = [name for name in model.names if name not in xs and name not in absent]
    if missing:
      raise ValueError(f"xs: party {missing[0]!r} is missing: every party {model.names} must provide its "
                       f"columns, got parties {tuple(xs)}")
    unknown = [name for name in xs if name not in model.names]
    if unknown:
      raise ValueError(f"xs: unknown party {unknown[0]!r}, expected the parties {model.names}")
    xs = tuple(xs.get(name) for name in model.names)
  if not absent:
    return model.check_inputs(xs)
  if isinstance(xs, (tuple, list)) and len(xs) == model.num_parties:
    xs = tuple(None if name in absent else x for name, x in zip(model.names, xs, strict=True))
    present = next(x for x in xs if x is not None)
    model.check_inputs(tuple(present if x is None else x for x in xs))  # the absent ones stand in for nothing
    return xs
  return model.check_inputs(xs)  # raises, naming what was expected


def _check_absent(model: VerticalModel, absent) -> tuple[str, ...]:
  absent = (absent,) if isinstance(absent, str) else tuple(absent)
  for name in absent:
    if name not in model.names:
      raise ValueError(f"absent: unknown party {name!r}, expected some of the parties {model.names}")
  if len(set(absent)) == model.num_parties:
    raise ValueError(f"absent: every party {model.names} is absent; at least one must take part")
  return absent


def _per_party(what: str, value, model: VerticalModel, is_one: Callable[[Any], bool], kind: str) -> tuple:
  """`value` (None, one for every remote party, or one per party) as a tuple with one entry per party."""
  names = model.names
  if value is None:
    return (None,) * len(names)
  if is_one(value):
    return tuple(None if name == model.label_party else value for name in names)
  if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(names):
    got = f"{len(value)} of them" if isinstance(value, Sequence) else type(value).__name__
    raise ValueError(f"{what}: expected None, {kind} for every party, or one (or None) per party {names}, got {got}")
  for name, v in zip(names, value, strict=True):
    if v is not None and not is_one(v):
      raise TypeError(f"{what}: expected {kind} or None for party {name!r}, got {type(v).__name__}")
    if v is not None and name == model.label_party:
      raise ValueError(f"{what}: party {name!r} is the label party, whose smashed data and gradient never leave it; "
                       f"expected None in its place")
  return tuple(value)


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


def _traffic(names: Sequence[str], ups, downs, remote: tuple[bool, ...]) -> dict[str, int]:
  """Bytes of the messages that cross the network (static ints): in all, and per remote party."""
  traffic = {}
  for direction, messages in (("up", ups), ("down", downs)):
    sizes = ([int(msgs.wire_size(m)) if r else 0 for m, r in zip(messages, remote, strict=True)]
             if messages is not None else [0] * len(remote))
    traffic[f"bytes_{direction}"] = sum(sizes)
    traffic.update({f"bytes_{direction}_{name}": size
                    for name, size, r in zip(names, sizes, remote, strict=True) if r})
  return traffic


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
