"""sljax.plots: the records of runs as tables and the standard plots, mean and spread over seeds."""

import doctest
import json
import math

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

import sljax
from sljax import algorithms as A
from sljax import plots

matplotlib.use("Agg")


def _records(accuracies, *, losses=None, bytes_per_round=(10, 5), tested_every=1):
  """simulation.run-like records: a round each, test figures every `tested_every` rounds and at the last."""
  out, up, down = [], 0, 0
  for r, acc in enumerate(accuracies, 1):
    up, down = up + bytes_per_round[0], down + bytes_per_round[1]
    record = {"round": r, "train_batch_loss": 1.0 / r, "bytes_up": bytes_per_round[0], "bytes_down": bytes_per_round[1],
              "bytes_up_cumulative": up, "bytes_down_cumulative": down, "bytes_up_per_client": [1, 2]}
    if r % tested_every == 0 or r == len(accuracies):
      record["test_accuracy"] = acc
      record["test_loss"] = (losses or [2.0] * len(accuracies))[r - 1]
    out.append(record)
  return out


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


SEEDS = {"a": [_records([0.2, 0.4, 0.6]), _records([0.4, 0.8, 0.7])], "b": [_records([0.1, 0.1, 0.3])]}


def test_the_line_is_the_mean_over_seeds_and_the_band_one_std():
  ax = plots.plot(SEEDS, "test_accuracy")
  a, b = ax.lines
  assert a.get_label() == "a" and b.get_label() == "b"
  np.testing.assert_allclose(a.get_xdata(), [1, 2, 3])
  np.testing.assert_allclose(a.get_ydata(), [0.3, 0.6, 0.65])
  np.testing.assert_allclose(b.get_ydata(), [0.1, 0.1, 0.3])
  assert len(ax.collections) == 1  # a band for "a" (two runs), none for "b" (one)
  vertices = ax.collections[0].get_paths()[0].vertices
  std = np.std([[0.2, 0.4, 0.6], [0.4, 0.8, 0.7]], axis=0)
  for x, mean, s in zip([1, 2, 3], [0.3, 0.6, 0.65], std):
    at = vertices[np.isclose(vertices[:, 0], x), 1]
    np.testing.assert_allclose([at.min(), at.max()], [mean - s, mean + s])
  assert ax.get_xlabel() == "round" and ax.get_ylabel() == "test_accuracy"


def test_against_bytes_and_tested_rounds_only():
  runs = {"a": [_records([0.2, 0.4, 0.6, 0.8], tested_every=2), _records([0.4, 0.6, 0.8, 1.0], tested_every=2)]}
  by_step = plots.curves(runs, "test_accuracy")["a"]
  assert by_step.x.tolist() == [2, 4] and by_step.mean.tolist() == pytest.approx([0.5, 0.9]) and by_step.runs == 2
  by_bytes = plots.curves(runs, "test_accuracy", x="bytes")["a"]
  assert by_bytes.x.tolist() == [30, 60]  # (10 + 5) bytes a round, up to rounds 2 and 4
  # without the cumulative fields (a fit history, or a run resumed without its metrics file): the running sum
  plain = [{k: v for k, v in r.items() if "cumulative" not in k} for r in runs["a"][0]]
  assert plots.curves({"a": [plain]}, "test_accuracy", x="bytes")["a"].x.tolist() == [30, 60]
  assert plots.curves(runs, "test_accuracy", ddof=1)["a"].std.tolist() == pytest.approx([np.sqrt(0.02)] * 2)


def test_a_fit_history_plots_by_epoch_skipping_the_epochs_not_tested():
  history = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5, "bytes_up": 7, "bytes_down": 3, "dropped_samples": 0,
              "test_accuracy": math.nan if e % 2 else 0.1 * e} for e in (1, 2, 3, 4)]
  fig = plots.plot_runs(history)
  acc_step, acc_bytes, loss_step, _ = fig.axes
  assert acc_step.lines[0].get_xdata().tolist() == [2, 4] and acc_step.get_xlabel() == "epoch"
  np.testing.assert_allclose(acc_step.lines[0].get_ydata(), [0.2, 0.4])
  assert acc_bytes.lines[0].get_xdata().tolist() == [20, 40] and acc_bytes.get_xlabel() == "bytes (up + down)"
  assert loss_step.get_ylabel() == "loss" and len(loss_step.lines[0].get_xdata()) == 4  # no test loss: training's
  assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # a notebook shows it, without pyplot's inline backend


def _counting_algorithm():
  """An algorithm whose round only counts, with fixed bytes and a loss falling by round, its prediction the
  test features plus the round number in column 0: its test accuracy rises as the rounds go."""

  def init(key, data):
    del key, data
    return A.SimState(clients=jnp.zeros((1,)), server=jnp.zeros(()), round=jnp.zeros((), jnp.int32),
                      key=jax.random.key_data(jax.random.key(0)))

  def round_(state, data, inputs=None):
    del data, inputs
    metrics = {"loss": 1.0 / (state.round + 1), "accuracy": jnp.float32(0.5), "bytes_up": jnp.int32(100),
               "bytes_down": jnp.int32(40)}
    return state.replace(round=state.round + 1), metrics

  predict = lambda state, x, client=0: x.at[:, 0].add(state.round.astype(x.dtype))  # noqa: E731
  return A.Algorithm("counting", init, round_, predict=predict, local_steps=1, shared_model=True)


def test_runs_written_by_simulation_run(tmp_path):
  x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
  algo, paths, records = _counting_algorithm(), [], []
  for seed in (0, 1):  # the "seeds" differ in their test labels
    y = np.where(np.arange(40) < 10 * (seed + 1), 0, np.argmax(x, 1)).astype(np.int32)
    path = tmp_path / f"counting_seed{seed}.jsonl"
    _, got = sljax.simulation.run(algo, algo.init(jax.random.key(seed), None), None, rounds=3, test=(x, y),
                                  eval_every=2, metrics_path=path)
    paths.append(path)
    records.append(got)
  runs = plots.load_runs(paths, label=lambda p: p.split("/")[-1].split("_seed")[0])
  assert list(runs) == ["counting"] and runs["counting"] == json.loads(json.dumps(records))
  fig = plots.plot_runs(runs)
  acc_step, acc_bytes, loss_step, loss_bytes = fig.axes
  want = np.mean([[r["test_accuracy"] for r in got if "test_accuracy" in r] for got in records], axis=0)
  np.testing.assert_allclose(acc_step.lines[0].get_ydata(), want)
  assert acc_step.lines[0].get_xdata().tolist() == [2, 3] and loss_step.get_ylabel() == "test_loss"
  assert acc_bytes.lines[0].get_xdata().tolist() == [280, 420]  # 100 + 40 bytes a round, by rounds 2 and 3
  assert len(acc_step.collections) == 1 and records[0][-1]["test_accuracy"] != records[1][-1]["test_accuracy"]
  summary = plots.summary(runs, ["test_accuracy"])
  assert summary["test_accuracy_mean"] == [pytest.approx(want[-1])] and summary["runs"] == [2]


def test_table_and_markdown():
  t = plots.table(SEEDS)
  assert t["label"] == ["a"] * 6 + ["b"] * 3 and t["run"] == [0, 0, 0, 1, 1, 1, 0, 0, 0]
  assert "bytes_up_per_client" not in t  # lists are left out
  assert plots.to_markdown(plots.summary(SEEDS, ["test_accuracy", "train_batch_loss"])) == "\n".join([
      "| label | runs | test_accuracy_mean | test_accuracy_std | train_batch_loss_mean | train_batch_loss_std |",
      "|---|---|---|---|---|---|",
      "| a | 2 | 0.65 | 0.05 | 0.3333 | 0 |",
      "| b | 1 | 0.3 | 0 | 0.3333 | 0 |",
  ])
  t = plots.table({"a": [[{"round": 1, "loss": 2.0}, {"round": 2, "loss": 1.0, "test_accuracy": 0.5}]]})
  assert math.isnan(t["test_accuracy"][0]) and plots.to_markdown(t).splitlines()[2] == "| a | 0 | 1 | 2 |  |"


def test_errors_say_what_was_expected(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match=r"empty.jsonl: expected JSON lines, one record per round "
                                       r"\(simulation.run\(metrics_path=...\)\), got an empty file$"):
    plots.read_metrics(empty)
  broken = _write(tmp_path / "broken.jsonl", [{"round": 1}])
  broken.write_text(broken.read_text() + "[1, 2]\n")
  with pytest.raises(ValueError, match=r"broken.jsonl, line 2: expected a JSON object \(a record\), got '\[1, 2\]'$"):
    plots.read_metrics(broken)
  with pytest.raises(ValueError, match=r"^metric: expected a figure the records hold, got 'test_acc'; run 0 of 'a' "
                                       r"holds \[.*'test_accuracy', 'test_loss', 'train_batch_loss'\]$"):
    plots.plot(SEEDS, "test_acc")
  with pytest.raises(ValueError, match=r"^metric: expected a figure holding one number per record, got "
                                       r"'bytes_up_per_client', which holds list values in run 0 of 'a'$"):
    plots.curves(SEEDS, "bytes_up_per_client")
  uneven = {"a": [_records([0.1, 0.2, 0.3]), _records([0.1, 0.2])]}
  with pytest.raises(ValueError, match=r"^runs\['a'\]: expected every run to hold 'test_accuracy' at the same rounds "
                                       r"as run 0 \(3 rounds: 1, 2, 3\), got 2 rounds: 1, 2 in run 1$"):
    plots.plot(uneven, "test_accuracy")
  no_bytes = [{"round": 2, "loss": 1.0}]
  with pytest.raises(ValueError, match=r"^x: 'bytes' needs bytes_up_cumulative and bytes_down_cumulative "
                                       r"\(simulation.run's records\) or bytes_up and bytes_down in every record from "
                                       r"round 1; run 0 of 'run' has neither$"):
    plots.curves(no_bytes, "loss", x="bytes")
  with pytest.raises(ValueError, match=r"^accuracy: expected one of \['test_accuracy', 'test_accuracy_mean', "
                                       r"'train_batch_accuracy', 'accuracy'\] in the records, or a name, got records "
                                       r"with \['loss', 'round'\]$"):
    plots.plot_runs(no_bytes)
  with pytest.raises(ValueError, match=r"^runs: expected a dict from labels to runs, a run or a list of runs, "
                                       r"got int$"):
    plots.table(3)
  with pytest.raises(ValueError, match=r"^runs\['a'\]: expected a run \(a path or a list of records\) or a list of "
                                       r"runs, got dict$"):
    plots.table({"a": {"round": 1}})
  with pytest.raises(ValueError, match=r"^columns: expected columns of one length, got lengths \[1, 2\]$"):
    plots.to_markdown({"a": [1], "b": [1, 2]})


def test_docstring_examples_run():
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in doctest.DocTestFinder().find(plots):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 10
