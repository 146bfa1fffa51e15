"""The studies in experiments/<study>/ run end to end on their smallest configuration and write
the JSON fields their READMEs and plots read, so that they do not rot as the library changes.

Each runs its `main` (one data set, one seed, one or two epochs, two algorithms or settings) into
a temporary folder; the full runs are in each study's README.
"""

import importlib.util
import json
import os

import pytest

import sljax

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def _study(name: str):
  spec = importlib.util.spec_from_file_location(f"study_{name}", os.path.join(EXPERIMENTS, name, "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(name: str, args: list[str], tmp_path) -> dict:
  out = tmp_path / "results.json"
  assert _study(name).main([*args, "--out", str(out)]) == 0
  with open(out) as f:
    return json.load(f)


def test_splitfed_accuracy(tmp_path):
  result = _run("splitfed_accuracy", ["--tasks", "wine", "--clients", "5", "--schemes", "iid,dir0.1", "--algorithms",
                                      "splitfed_v1", "--seeds", "1", "--epochs", "wine=2"], tmp_path)
  cell = result["grid"]["wine/K=5"]
  assert (cell["num_clients"], cell["epochs"], cell["seeds"]) == (5, 2, [0])
  assert set(cell["algorithms"]) == {"splitfed_v1"}
  assert set(cell["algorithms"]["splitfed_v1"]) == {"iid", "dir0.1"}
  figures = cell["algorithms"]["splitfed_v1"]["dir0.1"]
  assert figures["n"] == 1 and figures["std"] == 0.0 and 0.0 <= figures["mean"] <= 1.0
  assert figures["runs"] == [figures["mean"]]
  assert (tmp_path / "accuracy.png").exists()


def test_communication(tmp_path):
  # breast_cancer's 455 training rows split evenly in 5; an MLP 64-64 cut after its first layer
  result = _run("communication", ["--task", "breast_cancer", "--cuts", "1", "--clients", "5", "--schemes", "SL,FL"],
                tmp_path)
  r = result["cuts"]["cut 1"]
  assert r["client_counts"] == [5] and r["p"] == 455
  assert r["sizes"]["q"] == 64 * 4  # the first layer's 64 float32 per sample
  for label in ("SL", "FL"):
    measured = [row["bytes"] for row in r["measured"][label]]
    assert all(row["bytes"] == row["bytes_up"] + row["bytes_down"] for row in r["measured"][label])
    # the model leaves out the labels (4 bytes per sample up) and msgpack framing: a little above it
    assert all(1.0 <= m / a < 1.05 for m, a in zip(measured, r["analytic"][label])), (label, measured)
  (fl,) = r["measured"]["FL"]
  assert fl["bytes_up"] == fl["bytes_down"]  # the whole model up and down once per client
  assert r["crossovers"]["SL"]["analytic_K"] == pytest.approx(r["p"] * r["sizes"]["q"] / r["sizes"]["N"])
  assert (tmp_path / "communication.png").exists()


def test_compression(tmp_path):
  result = _run("compression", ["--models", "mlp", "--seeds", "1", "--epochs", "1", "--settings", "none,q8"], tmp_path)
  rows = result["models"]["mlp"]["rows"]
  assert [row["setting"] for row in rows] == ["none", "q8"]
  none, q8 = rows
  assert q8["bytes_up_per_epoch"] < none["bytes_up_per_epoch"] / 3  # 8 bits instead of 32, plus labels
  assert {"accuracy_mean", "accuracy_std", "ratio_total"} <= set(q8)
  assert set(result["models"]["mlp"]["frontier"]) <= {"none", "q8"}
  assert (tmp_path / "compression.png").exists()


def test_gpsl_pitfall(tmp_path):
  result = _run("gpsl_pitfall", ["--schemes", "dir0.1", "--seeds", "1", "--epochs", "1", "--arms", "gpsl"], tmp_path)
  scheme = result["schemes"]["dir0.1"]
  assert set(scheme["accuracy"]) == {"gpsl"}
  assert all(0.0 <= a["mean"] <= 1.0 for a in scheme["accuracy"].values())
  assert set(scheme["batch_label_tv"]) == {"fixed_local", "global_sampling"}
  assert sum(scheme["client_sizes"]) == len(sljax.data.load_digits().y_train) and len(scheme["client_sizes"]) == 10
  assert (tmp_path / "gpsl.png").exists()
