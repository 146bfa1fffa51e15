"""Vertical split learning end to end: fit over epochs, evaluation, codecs and privacy hooks per party."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import sljax
from sljax import codecs, merges
from sljax.privacy import defenses

N = 96
BATCH = 32


@pytest.fixture(scope="module")
def data():
  """Breast cancer's 30 features split 12/18 between a party "a" and a party "b", and the labels."""
  ds = sljax.data.load_breast_cancer()
  xa, xb = sljax.data.vertical_split(ds.x_train[:N], feature_groups=[12, 18])
  return (xa, xb), ds.y_train[:N]


def _model(merge, width=4):
  return sljax.vertical_model([nn.Dense(width), nn.Dense(width)], merge, nn.Dense(2), names=["a", "b"])


MERGES = {"concat": merges.concat, "attention": lambda: merges.attention(hidden=3)}


@pytest.mark.parametrize("merge", ["concat"])
def test_fit_equals_centralized(data, merge):
  """`fit` of vertical SL (parties as a dict by name) equals `fit` of the composed model on the joined features.

  (tests/test_vertical_model.py holds the fused step to the composed model for every merge.)"""
  xs, y = data
  model = _model(MERGES[merge]())
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-2), top_optimizer=optax.adam(1e-2))
  central = sljax.vertical_centralized(model, optimizer=optax.adam(1e-2))
  state = sl.init(jax.random.key(0), xs)
  # The same initial model as central.init would draw (model.init with the same key), without compiling a second
  # init program.
  c_state = sljax.PartyState(state.params, state.model_state, optax.adam(1e-2).init(state.params),
                             tuple(p.input_spec for p in state.parties))
  state, history = sljax.fit(sl, state, {"b": xs[1], "a": xs[0]}, y, key=jax.random.key(1), epochs=2,
                             batch_size=BATCH)
  c_state, c_history = sljax.fit(central, c_state, xs, y, key=jax.random.key(1), epochs=2, batch_size=BATCH)
  assert history[-1]["loss"] < history[0]["loss"]  # it trains
  np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in c_history], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.params, c_state.params, atol=1e-5, rtol=1e-5)
  assert history[0]["bytes_up"] == 2 * (N // BATCH) * sljax.wire_size(sljax.SmashedData(jnp.zeros((BATCH, 4))))
  got = sljax.vertical_evaluate(sl, state, xs, y)
  out, _ = central.predict(c_state, xs)
  probs = np.asarray(jax.nn.softmax(out))[:, 1]
  ranks = np.argsort(np.argsort(probs)) + 1.0  # AUC by the rank sum (no ties in float probabilities)
  pos = y == 1
  want_auc = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
  assert got["accuracy"] == np.mean(np.argmax(np.asarray(out), -1) == y) and 0.5 < got["auc"] <= 1.0
  np.testing.assert_allclose(got["auc"], want_auc, atol=1e-6)
  assert got["bytes_up"] == sljax.wire_size(sljax.SmashedData(jnp.zeros((N, 4)))) * 2


def _clip(g, labels, key):
  """A deterministic cut-gradient transform: every row's norm to at most 0.01."""
  del labels, key
  norms = jnp.linalg.norm(g, axis=-1, keepdims=True)
  return g * jnp.minimum(1.0, 0.01 / jnp.maximum(norms, 1e-12))


def test_one_party_with_codecs_and_hooks_equals_vanilla(data):
  """With one party, vertical SL with codecs and hooks is vanilla SL with the same codecs and hooks."""
  xs, y = data
  bottom, top = nn.Dense(4), nn.Dense(2)
  hooks = {"uplink": codecs.quantize(bits=4, stochastic=True), "downlink": codecs.top_k(k=2, error_feedback=True),
           "client_loss": lambda x, h: 0.1 * jnp.mean(h**2), "cut_gradient_transform": _clip}
  model = sljax.vertical_model([bottom], merges.concat(), top, names=["a"])
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.5), top_optimizer=optax.sgd(0.5), **hooks)
  ref = sljax.vanilla(sljax.split_model(bottom, top), client_optimizer=optax.sgd(0.5), server_optimizer=optax.sgd(0.5),
                      **hooks)
  batch_x, batch_y = jnp.asarray(xs[0][:BATCH]), jnp.asarray(y[:BATCH])
  state, r_state = sl.init(jax.random.key(0), (batch_x,)), ref.init(jax.random.key(0), batch_x)
  r_state = r_state.replace(client=r_state.client.replace(params=state.parties[0].params),
                            server=r_state.server.replace(params=state.top.params[1]))
  both = jax.jit(lambda s, r, k: (sl.step(s, ((batch_x,), batch_y), k), ref.step(r, (batch_x, batch_y), k)))
  for i in range(2):
    (state, metrics), (r_state, r_metrics) = both(state, r_state, jax.random.key(i))
    np.testing.assert_allclose(metrics["loss"], r_metrics["loss"], atol=1e-6)
    np.testing.assert_allclose(metrics["client_loss_a"], r_metrics["client_loss"], atol=1e-6)
    assert metrics["bytes_down_a"] == r_metrics["bytes_down"]
    assert metrics["bytes_up_a"] < r_metrics["bytes_up"]  # vanilla sends the labels up too
  chex.assert_trees_all_close(state.parties[0].params, r_state.client.params, atol=1e-6)
  chex.assert_trees_all_close(state.top.codec_state[0], r_state.server.codec_state, atol=1e-6)  # error feedback


def test_codecs_and_hooks_act_per_party(data):
  """A downlink codec and a cut-gradient transform on party "a" leave party "b"'s update as it was; an uplink
  codec on "a" shrinks only "a"'s bytes."""
  xs, y = data
  model = _model(merges.concat())
  batch = (tuple(jnp.asarray(x[:BATCH]) for x in xs), jnp.asarray(y[:BATCH]))
  plain = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.5), top_optimizer=optax.sgd(0.5))
  state = plain.init(jax.random.key(0), batch[0])
  want, plain_metrics = jax.jit(plain.step)(state, batch, jax.random.key(1))
  only_a = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.5), top_optimizer=optax.sgd(0.5),
                             downlink=[codecs.cast(dtype=jnp.bfloat16), None],
                             cut_gradient_transform=[defenses.max_norm(), None])
  got, metrics = jax.jit(only_a.step)(state, batch, jax.random.key(1))  # stateless codecs: the same state
  chex.assert_trees_all_equal(got.parties[1].params, want.parties[1].params)
  assert not np.allclose(jax.tree.leaves(got.parties[0].params)[-1], jax.tree.leaves(want.parties[0].params)[-1])
  assert metrics["bytes_down_a"] < metrics["bytes_down_b"] == plain_metrics["bytes_down_b"]
  up_a = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.5), top_optimizer=optax.sgd(0.5),
                           uplink=[codecs.quantize(bits=8), None])
  _, metrics = jax.eval_shape(up_a.step, state, batch, jax.random.key(1))
  assert metrics["bytes_up_a"] < metrics["bytes_up_b"] == plain_metrics["bytes_up_b"]
  assert metrics["bytes_up"] == metrics["bytes_up_a"] + metrics["bytes_up_b"]


def test_bad_input_names_the_party(data):
  xs, y = data
  model = _model(merges.concat())
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), tuple(x[:4] for x in xs))
  with pytest.raises(ValueError, match=r"^x\['b'\]: expected the same 96 samples as x\['a'\], got shape \(90, 18\)$"):
    sljax.fit(sl, state, {"a": xs[0], "b": xs[1][:90]}, y, key=jax.random.key(0), epochs=1, batch_size=BATCH)
  with pytest.raises(ValueError, match=r"^xs\[1\]: every party holds the same examples in the same order; party 'b' "
                                       r"has \(90, 18\) float32, party 'a' \(96, 12\) float32$"):
    sl.init(jax.random.key(0), (xs[0], xs[1][:90]))
  with pytest.raises(ValueError, match=r"^xs: party 'b' is missing: every party \('a', 'b'\) must provide its "
                                       r"columns, got parties \('a',\)$"):
    sljax.vertical_evaluate(sl, state, {"a": xs[0]}, y)
  with pytest.raises(ValueError, match=r"^xs: unknown party 'c', expected the parties \('a', 'b'\)$"):
    sl.predict(state, {"a": xs[0], "b": xs[1], "c": xs[1]})
  with pytest.raises(ValueError, match=r"^xs\[1\] \(party 'b'\): expected shape \(B, 18\) float32, got \(96, 12\) "
                                       r"float32$"):
    sl.predict(state, (xs[0], xs[0]))
  labelled = sljax.vertical_model([nn.Dense(4), nn.Dense(4)], merges.concat(), nn.Dense(2), names=["a", "b"],
                                  label_party="b")
  with pytest.raises(ValueError, match=r"^uplink: party 'b' is the label party, whose smashed data and gradient never "
                                       r"leave it; expected None in its place$"):
    sljax.vertical_sl(labelled, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
                      uplink=[None, codecs.quantize(bits=8)])
  with pytest.raises(ValueError, match=r"^downlink: expected None, a sljax.codecs.Codec for every party, or one \(or "
                                       r"None\) per party \('a', 'b'\), got 3 of them$"):
    sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1), downlink=[None] * 3)
  with pytest.raises(TypeError, match=r"^client_loss: expected a callable .* or None for party 'a', got int$"):
    sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1), client_loss=[1, None])
  # The label party's own bottom: its messages are not counted, and a single codec skips it.
  sl = sljax.vertical_sl(labelled, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
                         uplink=codecs.quantize(bits=8))
  assert sl.uplinks[1].config == codecs.identity().config
  _, metrics = jax.eval_shape(sl.step, sl.init(jax.random.key(0), tuple(x[:4] for x in xs)),
                              (tuple(x[:4] for x in xs), y[:4]), jax.random.key(1))
  assert "bytes_up_b" not in metrics and metrics["bytes_up"] == metrics["bytes_up_a"] > 0


def test_vectorized_parties_equal_the_loop():
  """vectorize=True (party 0's legs vmapped over the stacked parties) is the loop over the parties, dropout, a
  stochastic codec and a client loss included; parties that differ are refused, by name."""
  rng = np.random.default_rng(0)
  xs = tuple(jnp.asarray(rng.normal(size=(16, 5)).astype(np.float32)) for _ in range(3))
  y = jnp.asarray(rng.integers(0, 2, 16).astype(np.int32))
  bottoms = [sljax.sequential(*sljax.models.mlp(hidden=(4,), num_classes=4, dropout=0.2)) for _ in range(2)]
  model = sljax.vertical_model(bottoms, merges.concat(), nn.Dense(2), names=["a", "b"])
  kw = dict(party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
            uplink=codecs.quantize(bits=4, stochastic=True), client_loss=lambda x, h: 0.1 * jnp.mean(h**2))
  loop, vec = sljax.vertical_sl(model, **kw), sljax.vertical_sl(model, vectorize=True, **kw)
  state = loop.init(jax.random.key(0), xs[:2])
  step = jax.jit(lambda s, k: (loop.step(s, (xs[:2], y), k), vec.step(s, (xs[:2], y), k)))
  (want, want_metrics), (got, metrics) = step(state, jax.random.key(1))
  chex.assert_trees_all_close(got, want, atol=1e-6)
  assert sorted(metrics) == sorted(want_metrics) and "client_loss_b" in metrics
  other = sljax.vertical_model([nn.Dense(4), nn.Dense(4), sljax.sequential(nn.Dense(4), jnp.tanh)], merges.sum(),
                               nn.Dense(2), names=["a", "b", "c"])
  bad = sljax.vertical_sl(other, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1), vectorize=True)
  with pytest.raises(ValueError, match=r"^vectorize: party 'c' differs from party 'a' in its bottom \(another "
                                       r"architecture, params or model state\); vectorize=True runs party 0's legs"):
    jax.eval_shape(bad.step, bad.init(jax.random.key(0), xs), (xs, y), jax.random.key(0))



def test_inference_without_a_party(data):
  """`absent`: the label party puts a zero embedding in a missing party's place; nothing of it is sent."""
  xs, y = data
  model = _model(merges.concat())
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), tuple(x[:4] for x in xs))
  out, traffic = sl.predict(state, {"a": xs[0]}, absent=["b"])
  h_a, _ = model.bottoms[0].apply(state.parties[0].params, state.parties[0].model_state, xs[0], key=None, train=False)
  want, _ = model.label_stage.apply(state.top.params, state.top.model_state, (h_a, jnp.zeros_like(h_a)), key=None,
                                    train=False)
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert traffic["bytes_up"] == traffic["bytes_up_a"] > 0 and "bytes_up_b" not in traffic
  figures = sljax.vertical_evaluate(sl, state, (xs[0], None), y, absent=("b",))
  assert figures["accuracy"] == np.mean(np.argmax(np.asarray(out), -1) == y)
  with pytest.raises(ValueError, match=r"^absent: every party \('a', 'b'\) is absent; at least one must take part$"):
    sl.predict(state, {}, absent=["a", "b"])
  with pytest.raises(ValueError, match=r"^absent: unknown party 'c', expected some of the parties \('a', 'b'\)$"):
    sl.predict(state, xs, absent="c")


def test_training_without_a_party_equals_training_with_its_embedding_zero(data):
  """`step(absent=)`: the absent party's embedding is zero (its state untouched, nothing sent to or from it), so
  the others and the top move as in a full step where that party's bottom outputs zeros."""
  xs, y = data
  model = _model(merges.concat())
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
  batch = (tuple(x[:BATCH] for x in xs), y[:BATCH])
  state = sl.init(jax.random.key(0), batch[0])
  step = jax.jit(sl.step, static_argnames="absent")
  without_b, metrics = step(state, batch, jax.random.key(1), absent=("b",))
  silent_b = state.replace(parties=(state.parties[0], state.parties[1].replace(
      params=jax.tree.map(jnp.zeros_like, state.parties[1].params))))
  full, full_metrics = step(silent_b, batch, jax.random.key(1))
  chex.assert_trees_all_close((without_b.parties[0], without_b.top), (full.parties[0], full.top), atol=1e-6)
  chex.assert_trees_all_equal(without_b.parties[1], state.parties[1])
  assert metrics["bytes_up"] == metrics["bytes_up_a"] == full_metrics["bytes_up_a"] and "bytes_up_b" not in metrics
  with pytest.raises(ValueError, match=r"absent: party 'b' is the label party"):
    sljax.vertical_sl(sljax.vertical_model([nn.Dense(4), nn.Dense(4)], merges.concat(), nn.Dense(2), names=["a", "b"],
                                           label_party="b"),
                      party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1)).step(
                          state, batch, jax.random.key(1), absent=("b",))


def test_a_learned_stand_in_learns_where_its_party_is_absent_and_a_dropped_step_is_discarded(data):
  xs, y = data
  sl = sljax.vertical_sl(_model(merges.concat()), party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
                         replacement="learned")
  state = sl.init(jax.random.key(0), tuple(x[:BATCH] for x in xs))
  trained, _ = sljax.fit(sljax.vertical.without(sl, ["b"]), state, xs, y, key=jax.random.key(1), epochs=2,
                         batch_size=BATCH)
  assert float(jnp.abs(trained.replacement[1].params).sum()) > 0
  chex.assert_trees_all_equal(trained.replacement[0], state.replacement[0])  # a was never absent
  out, _ = sl.predict(trained, {"a": xs[0][:4]}, absent=["b"])
  h_a, _ = sl.model.bottoms[0].apply(trained.parties[0].params, trained.parties[0].model_state, xs[0][:4], key=None,
                                     train=False)
  stand_in = jnp.broadcast_to(trained.replacement[1].params, h_a.shape)
  want, _ = sl.model.label_stage.apply(trained.top.params, trained.top.model_state, (h_a, stand_in), key=None,
                                       train=False)
  np.testing.assert_allclose(out, want, atol=1e-6)
  # a party dropping during a step: the step is discarded everywhere
  batch = (tuple(x[:BATCH] for x in xs), y[:BATCH])
  kept, metrics = jax.jit(sl.step)(state, batch, jax.random.key(1), dropped=jnp.array([False, True]))
  chex.assert_trees_all_equal(kept, state)
  assert bool(metrics["discarded"])
  moved, metrics = jax.jit(sl.step)(state, batch, jax.random.key(1), dropped=jnp.array([False, False]))
  assert not bool(metrics["discarded"]) and int(moved.step) == 1
  with pytest.raises(ValueError, match=r"dropped: expected \(2,\) bools, one per party \('a', 'b'\), got \(3,\) bool"):
    sl.step(state, batch, jax.random.key(1), dropped=jnp.zeros(3, bool))
  with pytest.raises(ValueError, match=r"replacement: expected 'zero' or 'learned'"):
    sljax.vertical_sl(_model(merges.concat()), party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
                      replacement="mean")


@pytest.fixture(scope="module")
def three_parties(data):
  """Parties "a" (the label party, with features of its own), "b" and "c"; a stateful downlink codec and a client
  loss on the remote ones; learned stand-ins, set to random vectors so that their update shows."""
  (xa, xb), y = data
  xs = (xa[:BATCH, :6], xa[:BATCH, 6:], xb[:BATCH])
  model = sljax.vertical_model([nn.Dense(4), nn.Dense(4), nn.Dense(4)], merges.concat(), nn.Dense(2),
                               names=["a", "b", "c"], label_party="a")
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(0.05), top_optimizer=optax.adam(0.05),
                         downlink=codecs.top_k(k=2, error_feedback=True), client_loss=lambda x, h: jnp.mean(h**2),
                         replacement="learned")
  state = sl.init(jax.random.key(0), xs)
  keys = jax.random.split(jax.random.key(5), 3)
  state = state.replace(replacement=tuple(r.replace(params=jax.random.normal(k, r.params.shape))
                                          for r, k in zip(state.replacement, keys, strict=True)))
  return sl, state, (xs, jnp.asarray(y[:BATCH]))


def test_a_traced_presence_mask_equals_absent_for_each_mask_in_one_program(three_parties):
  """`step(..., present=mask)`: one compiled program for every mask, each step equal to `step(..., absent=)` for
  that mask (the learned stand-ins' and the codec states' updates included); bytes as arrays, 0 for the absent."""
  sl, state, batch = three_parties
  names = sl.model.names
  masks = [(), ("b",), ("c",), ("b", "c")]  # every set of absent parties that can train ("a" holds the labels)
  # the static steps in one program (one compile instead of four)
  static = jax.jit(lambda s, keys: [sl.step(s, batch, k, absent=a) for k, a in zip(keys, masks, strict=True)])
  wants = static(state, jax.random.split(jax.random.key(1), len(masks)))
  masked = jax.jit(lambda s, k, m: sl.step(s, batch, k, present=m))
  for absent, key, (want, want_metrics) in zip(masks, jax.random.split(jax.random.key(1), len(masks)), wants,
                                               strict=True):
    mask = np.array([name not in absent for name in names])
    got, metrics = masked(state, key, mask)
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
    for p, name in enumerate(names[1:], 1):  # a stand-in moves where its party is absent, the party where present
      assert np.allclose(got.replacement[p].params, state.replacement[p].params) != (name in absent)
      assert np.allclose(got.parties[p].params["kernel"], state.parties[p].params["kernel"]) == (name in absent)
      assert np.isnan(metrics[f"client_loss_{name}"]) == (name in absent)
      for direction in ("up", "down"):
        assert metrics[f"bytes_{direction}_{name}"] == want_metrics.get(f"bytes_{direction}_{name}", 0)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], atol=1e-6)
    assert np.array_equal(metrics["present"], mask) and not bool(metrics["discarded"])
    assert metrics["bytes_up"] == want_metrics["bytes_up"] and metrics["bytes_down"] == want_metrics["bytes_down"]
  assert masked._cache_size() == 1  # one program for every mask


def test_a_bad_presence_mask_is_refused(three_parties):
  sl, state, batch = three_parties
  with pytest.raises(ValueError, match=r"^present: expected a \(3,\) bool array, one per party \('a', 'b', 'c'\) "
                                       r"\(True: it takes part\), got \(2,\) bool$"):
    sl.step(state, batch, jax.random.key(0), present=np.ones(2, bool))
  with pytest.raises(ValueError, match=r"^present: expected a \(3,\) bool array, .*, got \(3,\) int32$"):
    sl.step(state, batch, jax.random.key(0), present=jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match=r"^present: expected a \(3,\) bool array, .*, got list$"):
    sl.step(state, batch, jax.random.key(0), present=[True, True, True])
  with pytest.raises(ValueError, match=r"^present: party 'a' is the label party, which runs the step; it cannot be "
                                       r"absent in training, got present=\[False, True, True\]$"):
    sl.step(state, batch, jax.random.key(0), present=np.array([False, True, True]))
  with pytest.raises(ValueError, match=r"^present: expected either absent= \(static names\) or present= \(a mask\), "
                                       r"not both; got absent=\('b',\)$"):
    sl.step(state, batch, jax.random.key(0), present=np.ones(3, bool), absent=("b",))
  # traced, a mask without the label party cannot train: the step is discarded, the state left as it was
  kept, metrics = jax.jit(lambda s, m: sl.step(s, batch, jax.random.key(0), present=m))(state,
                                                                                        np.array([False, True, True]))
  chex.assert_trees_all_equal(kept, state)
  assert bool(metrics["discarded"])
  with pytest.raises(ValueError, match=r"^rate: expected a probability in \[0, 1\) that a party misses a step, "
                                       r"got 1.0$"):
    sljax.vertical.with_dropout(sl, rate=1.0)


def test_fit_with_random_party_dropout(data):
  """`with_dropout(sl, rate=)` in `fit`, one program: parties left out of some steps (fewer bytes; a learned
  stand-in moves only when its party misses a step)."""
  xs, y = data
  sl = sljax.vertical_sl(_model(merges.concat()), party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1),
                         replacement="learned")
  state = sl.init(jax.random.key(0), tuple(x[:BATCH] for x in xs))
  dropout = sljax.vertical.with_dropout(sl, rate=0.5)
  dropout = dropout._replace(step=chex.assert_max_traces(dropout.step, n=1))
  got, history = sljax.fit(dropout, state, xs, y, key=jax.random.key(1), epochs=2, batch_size=BATCH)
  one = sljax.wire_size(sljax.SmashedData(jnp.zeros((BATCH, 4))))  # one party's smashed data, one step
  sent = [h["bytes_up"] // one for h in history]  # how many of the 2 x 3 party-steps of each epoch took place
  assert all(h["bytes_up"] % one == 0 for h in history) and 0 < min(sent) and max(sent) < 2 * (N // BATCH)
  assert float(jnp.abs(got.replacement[0].params).sum()) > 0 and history[-1]["loss"] < history[0]["loss"]
