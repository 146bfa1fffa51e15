"""Attacks succeed on undefended runs and the matching defense clearly reduces them (thresholds and seeds fixed);
the privacy report runs them on a transcript; bad input gets errors naming the argument."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import sljax
from sljax.privacy import attacks, defenses, metrics, report
from sljax.privacy import transcript as tr
from sljax.privacy.transcript import Exchange


def _imbalanced(n=512, seed=0):
  """A synthetic binary task, positive rate 0.1, positives shifted along a few features."""
  rng = np.random.default_rng(seed)
  y = (rng.uniform(size=n) < 0.1).astype(np.int32)
  x = (rng.normal(size=(n, 10)) + y[:, None] * np.linspace(1, 0, 10)[None]).astype(np.float32)
  return x, y


@pytest.fixture(scope="module")
def label_runs(tmp_path_factory):
  """One epoch (8 steps of 64) undefended, and one with max-norm on the cut gradient, from one initial state."""
  d = tmp_path_factory.mktemp("labels")
  x, y = _imbalanced()
  model = sljax.cut(sljax.models.mlp(hidden=(16, 16), num_classes=2), 1)
  runs, state = [], None
  for name, hooks in (("plain", {}), ("max_norm", {"cut_gradient_transform": defenses.max_norm()})):
    sl = sljax.vanilla(model, client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2), **hooks)
    state = sl.init(jax.random.key(0), x[:64]) if state is None else state
    sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=64, transcript=d / f"{name}.sljt")
    runs.append(tr.load(d / f"{name}.sljt"))
  return runs


def test_norm_and_direction_scoring_leak_the_labels_and_max_norm_stops_the_norm(label_runs):
  plain, defended = label_runs
  # From the third step on: at initialisation both classes get gradients of one size; the model
  # learns the imbalance in two steps (Li et al. score trained models).
  later = [e for e in plain.exchanges() if e.step >= 2]
  norm = attacks.norm_scoring(later)
  assert norm.aucs.shape == (6,) and norm.auc_mean >= 0.9, norm.aucs  # measured 0.99
  assert norm.leak_p95 >= 0.45
  direction = attacks.direction_scoring(plain)  # knowing no label: the minority rule
  assert direction.auc_mean >= 0.9, direction.aucs  # measured 1.0
  guarded = attacks.norm_scoring([e for e in defended.exchanges() if e.step >= 2])
  assert guarded.auc_mean <= 0.7, guarded.aucs  # measured 0.52
  assert guarded.leak_p95 < norm.leak_p95
  known = [int(np.flatnonzero(e.labels == 1)[0]) if (e.labels == 1).any() else -1 for e in plain.exchanges()]
  assert attacks.direction_scoring(plain, attacks.DirectionKnowledge(known_positive=known)).auc_mean >= 0.9


def test_the_report_runs_the_label_attacks_of_a_transcript(label_runs):
  plain, defended = label_runs
  table = report.privacy_report(defended, utility_cost=0.01)  # model completion: 4 known labels per class
  assert [r.attack for r in table.rows] == ["norm_scoring", "direction_scoring", "model_completion"]
  assert table.row("norm_scoring").defense == "cut gradient: max_norm"
  assert table.row("norm_scoring").metrics["auc_mean"] == pytest.approx(attacks.norm_scoring(defended).auc_mean)
  assert "input attacks" in table.skipped  # no truth records: nothing to score reconstructions against
  text = str(table)
  assert "norm_scoring" in text and "cut gradient: max_norm" in text and "0.01" in text
  assert json.loads(json.dumps(table.to_dict()))["rows"][0]["utility_cost"] == 0.01
  with pytest.raises(KeyError, match="attack: 'white_box_inversion' was not run"):
    table.row("white_box_inversion")
  leak = table.row("norm_scoring").metrics["auc_mean"]
  fig = report.privacy_utility_plot([("none", 0.0, 0.99), ("max-norm", 0.01, leak)])
  assert len(fig.axes) == 1


@pytest.fixture(scope="module")
def digits_cut1():
  ds = sljax.data.load_digits()
  model = sljax.cut(sljax.models.cnn(), 1)  # the client: one 3x3 convolution, 16 channels, ReLU
  params, model_state = jax.jit(model.client.init)(jax.random.key(0), ds.x_train[:32])

  def client_apply(x):
    return model.client.apply(params, model_state, x, key=None, train=False)[0]

  return ds, client_apply


def test_white_box_inversion_of_a_shallow_cut_and_noise_against_it(digits_cut1):
  ds, client_apply = digits_cut1
  x = ds.x_test[:32]
  smashed = client_apply(x)
  knowledge = attacks.WhiteBoxKnowledge(client_apply=client_apply, input_shape=(8, 8, 1), steps=60, learning_rate=0.1)
  found = attacks.white_box_inversion(smashed, knowledge, inputs=x)
  assert found.reconstructions.shape == x.shape
  assert found.ssim >= 0.95 and found.psnr >= 30  # measured SSIM 0.9999
  codec = defenses.gaussian_noise(clip_norm=13.0, noise_multiplier=0.3)  # rows have norm ~13; noise std 3.9
  noisy = codec.decode(codec.encode(smashed, codec.init(smashed), jax.random.key(3))[0])
  defended = attacks.white_box_inversion(noisy, knowledge, inputs=x)
  assert defended.ssim <= 0.6, defended.ssim  # measured 0.18
  assert defended.mse > 100 * found.mse


def test_inverse_network_learns_an_invertible_cut_from_auxiliary_pairs():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(300, 4)).astype(np.float32)
  z = np.tanh(x @ rng.normal(size=(4, 8)).astype(np.float32))  # injective
  knowledge = attacks.InverseNetworkKnowledge(aux_inputs=x[:256], aux_smashed=z[:256], hidden=(32,), steps=200,
                                              learning_rate=1e-2)
  found = attacks.inverse_network(z[256:], knowledge, inputs=x[256:])
  assert found.mse < 5e-3, found.mse  # measured 0.0027; the inputs' variance is 0.083
  blind = attacks.InverseNetworkKnowledge(aux_inputs=x[:256], aux_smashed=rng.permutation(z[:256]), hidden=(32,),
                                          steps=200, learning_rate=1e-2)  # pairs shuffled: nothing to learn
  assert attacks.inverse_network(z[256:], blind, inputs=x[256:]).mse > 10 * found.mse


def test_distance_correlation_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 5)).astype(np.float32)
  z = np.tanh(x @ rng.normal(size=(5, 5))).astype(np.float32)
  dcor = jax.jit(metrics.distance_correlation)  # one compile: every pair below has shapes (24, 5)

  def reference(a, b):
    da = np.linalg.norm(a[:, None] - a[None], axis=-1)
    db = np.linalg.norm(b[:, None] - b[None], axis=-1)
    ca = da - da.mean(0) - da.mean(1)[:, None] + da.mean()
    cb = db - db.mean(0) - db.mean(1)[:, None] + db.mean()
    return np.sqrt((ca * cb).mean() / np.sqrt((ca * ca).mean() * (cb * cb).mean()))

  assert float(dcor(x, z)) == pytest.approx(reference(x.astype(np.float64), z.astype(np.float64)), rel=1e-4)
  assert float(dcor(x, 3 * x - 1)) == pytest.approx(1.0, abs=1e-5)
  assert float(dcor(x, np.ones((24, 5), np.float32))) == 0.0
  grad = jax.jit(jax.grad(lambda h: metrics.distance_correlation(x, h)))(np.concatenate([z[:1], z[:23]]))  # a repeat
  assert np.isfinite(np.asarray(grad)).all()


def _step(labels, grad=True):
  g = np.ones((len(labels), 3), np.float32) if grad else None
  return Exchange(0, 0, 0, np.zeros((len(labels), 3), np.float32), np.asarray(labels), g)


def test_bad_input_gets_errors_naming_the_argument(digits_cut1):
  with pytest.raises(ValueError, match=r"norm_scoring: labels must be binary \(0/1\) .* got values \[0, 1, 2\]"):
    attacks.norm_scoring([_step([0, 1, 2])])
  with pytest.raises(ValueError, match=r"direction_scoring: step \(round 0, step 0, client 0\) has no cut gradient"):
    attacks.direction_scoring([_step([0, 1], grad=False)])
  with pytest.raises(ValueError, match=r"knowledge.known_positive: expected one row per step \(1\), got 2"):
    attacks.direction_scoring([_step([0, 1])], attacks.DirectionKnowledge(known_positive=[0, 1]))
  with pytest.raises(TypeError, match="run: expected a Transcript or a non-empty sequence of Exchange, got int"):
    attacks.norm_scoring([1, 2])
  with pytest.raises(ValueError, match=r"knowledge.known_rows: expected indices in \[0, 2\), got \[5\]"):
    attacks.model_completion([_step([0, 1])], attacks.CompletionKnowledge(known_rows=[5]))
  with pytest.raises(ValueError, match="knowledge.known_per_class: class 0 has 1 examples in the last round, not "
                                       "more than 4"):
    attacks.model_completion([_step([0, 1])])
  knowledge = attacks.InverseNetworkKnowledge(aux_inputs=np.zeros((8, 4)), aux_smashed=np.zeros((7, 3)))
  with pytest.raises(ValueError, match=r"knowledge.aux_inputs, knowledge.aux_smashed: expected pairs with the same "
                                       r"leading axis, got shapes \(8, 4\) and \(7, 3\)"):
    attacks.inverse_network(np.zeros((2, 3)), knowledge)
  knowledge = attacks.InverseNetworkKnowledge(aux_inputs=np.zeros((8, 4)), aux_smashed=np.zeros((8, 3)))
  with pytest.raises(ValueError, match=r"smashed: expected shape \(N, 3\) like knowledge.aux_smashed, got \(2, 5\)"):
    attacks.inverse_network(np.zeros((2, 5)), knowledge)
  _, client_apply = digits_cut1
  knowledge = attacks.WhiteBoxKnowledge(client_apply=client_apply, input_shape=(8, 8, 1))
  with pytest.raises(ValueError, match=r"knowledge.client_apply: maps inputs \(2, 8, 8, 1\) to \(2, 8, 8, 16\), "
                                       r"expected the smashed data's shape \(2, 5\)"):
    attacks.white_box_inversion(np.zeros((2, 5)), knowledge)
  with pytest.raises(ValueError, match=r"x, z: expected batches with the same leading axis, got shapes \(4, 2\) and "
                                       r"\(3, 2\)"):
    metrics.distance_correlation(np.zeros((4, 2)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"inputs: SSIM takes images \(B, H, W, C\), got shape \(4, 8, 2\)"):
    metrics.ssim(np.zeros((4, 8, 2)), np.zeros((4, 8, 2)))  # 1-D signals (B, L, C), not images
  with pytest.raises(ValueError, match=r"labels: expected binary labels 0/1, got values \[0, 3\]"):
    metrics.leak_auc([0, 3], [0.1, 0.2])
  with pytest.raises(ValueError, match=r"aux_fraction: expected a share in \(0, 1\), got 1.5"):
    report.privacy_report("unused.sljt", aux_fraction=1.5)
  with pytest.raises(ValueError, match=r"points: expected a non-empty list of \(name, utility cost, attack success\)"):
    report.privacy_utility_plot([])


def test_the_cli_prints_the_report(label_runs, capsys, tmp_path):
  from sljax import cli

  plain, _ = label_runs
  assert cli.main(["privacy-report", plain.path, "--json", "--epsilon", "2.5"]) == 0
  rows = json.loads(capsys.readouterr().out)["rows"]
  assert rows[0]["attack"] == "norm_scoring" and rows[0]["epsilon"] == 2.5 and rows[0]["defense"] == "none"
  (tmp_path / "cut.sljt").write_bytes(Path(plain.path).read_bytes()[:-3])
  assert cli.main(["privacy-report", str(tmp_path / "cut.sljt")]) == 1
  assert "truncated record at byte offset" in capsys.readouterr().err


def test_a_u_shaped_run_recorded_with_its_batches_gets_the_input_attacks(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(32, 6)).astype(np.float32)
  y = (x[:, 0] > 0.5).astype(np.int32)
  model = sljax.cut(sljax.models.mlp(hidden=(12, 8), num_classes=2), 1, 2)
  sl = sljax.u_shaped(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1))
  state = sl.init(jax.random.key(0), x[:8])
  plain, _ = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=8)
  with tr.Recorder(tmp_path / "u.sljt", truth=True) as rec:
    recorded, _ = sljax.fit(sl, state, x, y, key=jax.random.key(1), epochs=1, batch_size=8, transcript=rec)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), recorded, plain)
  loaded = tr.load(tmp_path / "u.sljt")
  assert [r.direction for r in loaded.records if r.step == 0 and r.direction != "note"] == [
      "truth", "up", "down", "up", "down"]
  steps = loaded.exchanges()
  assert len(steps) == 4 and all(e.labels is None and e.grad.shape == (8, 12) for e in steps)  # no labels go up
  # The inverse network is tested on its own above (here it would compile another program for ~2 s).
  table = report.privacy_report(loaded, completion=None, inverse_network=None)
  assert [r.attack for r in table.rows] == ["distance_correlation"]
  assert "U-shaped SL" in table.skipped["norm_scoring, direction_scoring"]
  assert 0 < table.row("distance_correlation").metrics["dcor_mean"] <= 1
