"""Several bottoms joined by a merge (vertical split learning): split legs against the composed model."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sljax
from sljax import merges, models

STEPS = 20
BATCH = 16
NAMES = ("a", "b", "c")


def _digits_columns(n=BATCH * 5):
  """Digits' 64 features split into 3 column groups (22, 21, 21), one per party, and the labels."""
  ds = sljax.data.load_digits(image=False)
  xs = sljax.data.vertical_split(ds.x_train[:n].astype(np.float32), num_parties=3)
  return tuple(xs), ds.y_train[:n].astype(np.int32)


def _batches(xs, y, steps=STEPS):
  n = y.shape[0] // BATCH
  for i in range(steps):
    rows = slice((i % n) * BATCH, (i % n + 1) * BATCH)
    yield tuple(jnp.asarray(x[rows]) for x in xs), jnp.asarray(y[rows])


def _model(merge, widths=(8, 8, 8), *, label_party="c"):
  """Three kinds of bottom (Linen with dropout, cut from a stack; NNX; a function), a top with dropout."""
  wa, wb, wc = widths
  bottom_a = sljax.cut(models.mlp(hidden=(wa,), dropout=0.2), 1).client
  bottom_b = sljax.sequential(sljax.nnx_stage(lambda rngs: nnx.Linear(21, wb, rngs=rngs)), jax.nn.relu)
  bottom_c = sljax.function_stage(lambda p, x: jnp.tanh(x @ p["w"]),
                                  lambda key, x: {"w": 0.3 * jax.random.normal(key, (x.shape[-1], wc))})
  top = sljax.sequential(*models.mlp(hidden=(16,), dropout=0.2))
  return sljax.vertical_model([bottom_a, bottom_b, bottom_c], merge, top, names=NAMES, label_party=label_party)


MERGES = {
    "concat": (merges.concat, (8, 6, 4)),
    "sum": (merges.sum, (8, 8, 8)),
    "mean": (merges.mean, (8, 8, 8)),
    "attention": (lambda: merges.attention(hidden=6), (8, 8, 8)),
}
# A different optimizer for every party, and for the label party.
OPTIMIZERS = {"a": optax.adam(1e-2), "b": optax.sgd(0.1, momentum=0.9), "c": optax.adam(3e-3),
              "label": optax.adam(1e-2)}


def _central_step(model):
  """Centralized training of model.compose(), each part under its own party's optimizer."""
  whole = model.compose()
  opt = optax.multi_transform(OPTIMIZERS, (*NAMES, "label"))

  def loss_fn(params, model_state, xs, labels, key):
    out, model_state = whole.apply(params, model_state, xs, key=key, train=True)
    return sljax.softmax_cross_entropy(out, labels), model_state

  @jax.jit
  def step(params, model_state, opt_state, batch, key):
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, *batch, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_state, opt_state, loss

  return whole, opt, step


@pytest.mark.parametrize("merge", list(MERGES))
def test_split_equals_centralized(merge):
  make_merge, widths = MERGES[merge]
  model = _model(make_merge(), widths)
  xs, y = _digits_columns()
  sl = sljax.vertical_sl(model, party_optimizers=[OPTIMIZERS[n] for n in NAMES], top_optimizer=OPTIMIZERS["label"])
  state = sl.init(jax.random.key(0), tuple(x[:2] for x in xs))
  whole, opt, central_step = _central_step(model)
  params, model_state = whole.init(jax.random.key(0), tuple(x[:2] for x in xs))
  chex.assert_trees_all_close(state.params, params, atol=1e-7, rtol=1e-6)  # the same init key split (init is jitted)
  opt_state = opt.init(params)
  merge_init = state.top.params[0]

  step = jax.jit(sl.step)
  s_losses, c_losses = [], []
  for i, batch in enumerate(_batches(xs, y)):
    key = jax.random.key(100 + i)
    state, metrics = step(state, batch, key)
    params, model_state, opt_state, loss = central_step(params, model_state, opt_state, batch, key)
    s_losses.append(float(metrics["loss"]))
    c_losses.append(float(loss))

  assert s_losses[-1] < s_losses[0]  # it trains
  np.testing.assert_allclose(s_losses, c_losses, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.params, params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.model_state, model_state, atol=1e-5, rtol=1e-5)
  if merge == "attention":  # the learned merge's params live with the label party and train, every one
    assert sorted(merge_init) == ["bias", "kernel", "party_bias", "query"]
    for name in merge_init:
      assert not np.allclose(state.top.params[0][name], merge_init[name]), name
    chex.assert_trees_all_close(whole.get_layer(params, "merge"), state.top.params[0], atol=1e-5, rtol=1e-5)


def test_split_differs_when_keys_differ():
  """The equivalence can fail: the same step under another key (dropout) gives another run."""
  model = _model(merges.concat(), (8, 6, 4))
  xs, y = _digits_columns()
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), tuple(x[:2] for x in xs))
  batch = next(_batches(xs, y))
  step = jax.jit(sl.step)
  a, _ = step(state, batch, jax.random.key(1))
  b, _ = step(state, batch, jax.random.key(2))
  assert not np.allclose(a.parties[0].params[0]["Dense_0"]["kernel"], b.parties[0].params[0]["Dense_0"]["kernel"])


def test_every_party_gets_the_gradient_of_the_composed_loss():
  """The legs, called one by one with the documented key split, against jax.grad of the composed loss."""
  model = _model(merges.attention())
  xs, y = _digits_columns()
  sgd = optax.sgd(1.0)  # new params = params - gradient
  sl = sljax.vertical_sl(model, party_optimizers=sgd, top_optimizer=sgd)
  state = sl.init(jax.random.key(0), tuple(x[:2] for x in xs))
  (batch_xs, labels) = next(_batches(xs, y))
  key = jax.random.key(7)

  whole = model.compose()

  def composed_loss(params):
    out, _ = whole.apply(params, state.model_state, batch_xs, key=key, train=True)
    return sljax.softmax_cross_entropy(out, labels)

  want = jax.grad(composed_loss)(state.params)

  keys = jax.random.split(key, 4)  # one per party, then the label party's
  ups, pendings = zip(*(sl.party_forward[p](state.parties[p], batch_xs[p], keys[p]) for p in range(3)))
  assert all(up.labels is None for up in ups)  # no labels go up
  top, downs, metrics = sl.top_step(state.top, ups, labels, keys[3])
  parties = tuple(sl.party_backward[p](state.parties[p], pendings[p], downs[p]) for p in range(3))

  for p, name in enumerate(NAMES):
    got = jax.tree.map(jnp.subtract, state.parties[p].params, parties[p].params)
    chex.assert_trees_all_close(got, whole.get_layer(want, name), atol=1e-6, rtol=1e-5)
  got_top = jax.tree.map(jnp.subtract, state.top.params, top.params)
  chex.assert_trees_all_close(got_top, want[3], atol=1e-6, rtol=1e-5)
  # A wrong gradient fails the comparison: the oracle is not compared with itself.
  assert not np.allclose(jax.tree.leaves(got_top)[0], jax.tree.leaves(want[0])[0][: jax.tree.leaves(got_top)[0].size])

  # The fused step is exactly these legs.
  fused, fused_metrics = sl.step(state, (batch_xs, labels), key)
  chex.assert_trees_all_equal((fused.parties, fused.top), (parties, top))
  assert float(fused_metrics["loss"]) == float(metrics["loss"])
  # Party "c" is the label party's own bottom: its smashed data and gradient stay home.
  assert fused_metrics["bytes_up"] == sljax.wire_size(ups[0]) + sljax.wire_size(ups[1])
  assert fused_metrics["bytes_down"] == sljax.wire_size(downs[0]) + sljax.wire_size(downs[1])


def test_predict_and_composed_layers():
  model = _model(merges.mean(), label_party=None)
  xs, y = _digits_columns()
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-2), top_optimizer=optax.adam(1e-2))
  state = sl.init(jax.random.key(0), tuple(x[:2] for x in xs))
  batch_xs, _ = next(_batches(xs, y))
  out, metrics = sl.predict(state, batch_xs)
  want, _ = model.apply(state.params, state.model_state, batch_xs, key=None, train=False)
  np.testing.assert_array_equal(out, want)
  assert metrics["bytes_up"] == 3 * sljax.wire_size(sljax.SmashedData(jnp.zeros((BATCH, 8))))  # every party remote
  whole = model.compose()
  assert whole.layer_names == ("a", "b", "c", "label")
  assert whole.get_layer(state.params, "b") is state.parties[1].params
  assert whole.get_layer(state.params, "output")["kernel"].shape == (16, 10)


def test_wrong_number_of_inputs():
  model = _model(merges.sum())
  xs, y = _digits_columns()
  with pytest.raises(ValueError, match=r"^xs: expected a tuple of 3 inputs, one per party \('a', 'b', 'c'\), "
                                       r"got 2 inputs$"):
    model.init(jax.random.key(0), xs[:2])
  with pytest.raises(ValueError, match=r"^xs: expected a tuple of 3 inputs, one per party \('a', 'b', 'c'\), "
                                       r"got \(4, 64\) float32$"):
    model.compose().init(jax.random.key(0), jnp.zeros((4, 64)))
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), tuple(x[:4] for x in xs))
  batch_xs, labels = next(_batches(xs, y))
  with pytest.raises(ValueError, match=r"^xs: expected a tuple of 3 inputs, .* got 4 inputs$"):
    sl.step(state, ((*batch_xs, batch_xs[0]), labels), jax.random.key(1))
  up, _ = sl.party_forward[0](state.parties[0], batch_xs[0], jax.random.key(1))
  with pytest.raises(ValueError, match=r"^messages: expected 3 SmashedData, one per party \('a', 'b', 'c'\), "
                                       r"got 1 messages$"):
    sl.top_step(state.top, [up], labels, jax.random.key(1))


def test_bad_party_inputs_name_the_party():
  model = _model(merges.sum())
  xs, _ = _digits_columns()
  with pytest.raises(ValueError, match=r"^xs\[1\]: every party holds the same examples in the same order; party "
                                       r"'b' has \(3, 21\) float32, party 'a' \(4, 22\) float32$"):
    model.init(jax.random.key(0), (xs[0][:4], xs[1][:3], xs[2][:4]))
  with pytest.raises(ValueError, match=r"^xs\[0\]: the bottom of party 'a' expects shape \(B, features\), "
                                       r"got \(4, 2, 11\) float32$"):
    model.init(jax.random.key(0), (xs[0][:4].reshape(4, 2, 11), xs[1][:4], xs[2][:4]))
  sl = sljax.vertical_sl(model, party_optimizers=optax.sgd(0.1), top_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), tuple(x[:4] for x in xs))
  with pytest.raises(ValueError, match=r"^x \(party 'b'\): expected shape \(B, 21\) float32, got \(4, 22\) float32$"):
    sl.party_forward[1](state.parties[1], xs[0][:4], jax.random.key(1))


def _two_bottoms(shape_a, shape_b):
  """Parameter-free bottoms that output zeros of the given shapes (batch first)."""
  return [lambda x: jnp.zeros((x.shape[0], *shape_a)), lambda x: jnp.zeros((x.shape[0], *shape_b))]


def test_concat_needs_agreeing_shapes_but_not_widths():
  xs = (jnp.ones((4, 3)), jnp.ones((4, 5)))
  ok = sljax.vertical_model(_two_bottoms((8,), (2,)), merges.concat(), nn.Dense(10))
  params, _ = ok.init(jax.random.key(0), xs)
  assert ok.compose().get_layer(params, "top")["kernel"].shape == (10, 10)
  bad = sljax.vertical_model(_two_bottoms((8,), (2, 4)), merges.concat(), nn.Dense(10), names=["bank", "shop"])
  with pytest.raises(ValueError, match=r"^merge: concat along axis -1 takes bottom outputs that agree on every other "
                                       r"axis; party 'shop' outputs \(4, 2, 4\) float32, party 'bank' \(4, 8\) "
                                       r"float32$"):
    bad.init(jax.random.key(0), xs)


@pytest.mark.parametrize("merge", ["sum", "mean", "attention"])
def test_elementwise_merges_need_equal_shapes(merge):
  xs = (jnp.ones((4, 3)), jnp.ones((4, 5)))
  model = sljax.vertical_model(_two_bottoms((8,), (6,)), getattr(merges, merge)(), nn.Dense(10),
                               names=["bank", "shop"])
  with pytest.raises(ValueError, match=rf"^merge: {merge} takes bottom outputs of equal shapes; party 'shop' "
                                       r"outputs \(4, 6\) float32, party 'bank' \(4, 8\) float32 \(concat takes "
                                       r"different widths\)$"):
    model.init(jax.random.key(0), xs)


def test_bad_arguments():
  bottoms = _two_bottoms((8,), (8,))
  with pytest.raises(ValueError, match=r"^names: expected distinct party names, got \('x', 'x'\) \('x' more than "
                                       r"once\)$"):
    sljax.vertical_model(bottoms, merges.sum(), nn.Dense(10), names=["x", "x"])
  with pytest.raises(ValueError, match=r"^names: 'merge' names a part of the label party"):
    sljax.vertical_model(bottoms, merges.sum(), nn.Dense(10), names=["merge", "x"])
  with pytest.raises(ValueError, match=r"^label_party: expected None or one of the parties \('party_0', 'party_1'\), "
                                       r"got 'bank'$"):
    sljax.vertical_model(bottoms, merges.sum(), nn.Dense(10), label_party="bank")
  with pytest.raises(ValueError, match=r"^axis: expected a feature axis \(not the batch axis 0\), got 0$"):
    merges.concat(axis=0)
  model = sljax.vertical_model(bottoms, merges.sum(), nn.Dense(10))
  with pytest.raises(ValueError, match=r"^party_optimizers: expected one optax transformation for all parties or "
                                       r"one per party \('party_0', 'party_1'\), got 3 of them$"):
    sljax.vertical_sl(model, party_optimizers=[optax.sgd(0.1)] * 3, top_optimizer=optax.sgd(0.1))
  mismatched = sljax.vertical_model(_two_bottoms((2, 4), (2, 4)), merges.sum(),
                                    sljax.sequential(*models.mlp(hidden=(16,))))
  with pytest.raises(ValueError, match=r"^mismatched parts: the merge \(sum\) outputs shape \(4, 2, 4\) float32, but "
                                       r"the top expects shape \(B, features\)$"):
    mismatched.init(jax.random.key(0), (jnp.ones((4, 3)), jnp.ones((4, 5))))


def test_docstring_examples_run():
  for obj in (sljax.vertical_model, sljax.vertical_sl, merges):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(obj, globs={"jax": jax, "jnp": jnp}):
      runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, obj
