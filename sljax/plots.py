"""Tables and the standard plots of a study, from the records of its runs.

A run's records are what `simulation.run` returns and writes as JSON lines (`metrics_path=`), one
per round, or what `fit` returns, one per epoch. A study compares configurations, each run with
several seeds: here `runs` maps a label (the configuration) to its runs, and every figure is the
mean over a label's runs with their spread (the standard deviation over seeds).

Every function takes `runs` as any of:

- a mapping from a label to its runs: each a path to a metrics file or a list of records, or a
  list of those (the seeds); e.g. `{"SplitFed v1": ["sfl1_s0.jsonl", "sfl1_s1.jsonl"]}`;
- one run (a path, or a list of records: labelled by the file's name, or "run");
- a list of runs (paths or lists of records), each a label of its own (its file's name, or
  "run 0", "run 1", ...); `load_runs(paths, label=...)` groups files by a label instead.

Only matplotlib is needed (and only to plot); `table` gives a dict of columns that
`pandas.DataFrame` takes as it is, and `to_markdown` prints one.

Example:
  >>> import math
  >>> runs = {"a": [[{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.7}],
  ...               [{"round": 1, "test_accuracy": 0.7}, {"round": 2, "test_accuracy": 0.9}]]}
  >>> curves(runs, "test_accuracy")["a"].mean.round(6).tolist()
  [0.6, 0.8]
  >>> print(to_markdown(summary(runs, ["test_accuracy"])))
  | label | runs | test_accuracy_mean | test_accuracy_std |
  |---|---|---|---|
  | a | 2 | 0.8 | 0.1 |
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

Records = list[dict[str, Any]]
Runs = dict[str, list[Records]]

# The figures the standard plots show, where their names are not given: the first the records hold.
ACCURACY_NAMES = ("test_accuracy", "test_accuracy_mean", "train_batch_accuracy", "accuracy")
LOSS_NAMES = ("test_loss", "test_loss_mean", "train_batch_loss", "loss")


class Curve(NamedTuple):
  """A figure of one label against a step or the bytes: the mean over its runs and their spread.

  Attributes:
    x: (T,) the rounds (or epochs) where every run holds the figure, or the bytes sent up and down
      by then (the mean over the runs, which may differ with dropouts).
    mean: (T,) the mean over the runs.
    std: (T,) the standard deviation over the runs (zero for a single run).
    runs: the number of runs.
  """

  x: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  runs: int


def read_metrics(path: str | os.PathLike) -> Records:
  """The records of one run from its metrics file (`simulation.run(..., metrics_path=path)`).

  Args:
    path: a file of JSON lines, one record (a JSON object) per line; blank lines are skipped.

  Returns:
    The records, in the file's order.

  Raises:
    ValueError: naming the file (and the line) when it holds no record or a line is not a JSON object.

  Example:
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> with open(path, "w") as f:
    ...   _ = f.write(json.dumps({"round": 1, "train_batch_loss": 2.3}) + "\\n")
    >>> read_metrics(path)
    [{'round': 1, 'train_batch_loss': 2.3}]
  """
  records = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict):
        raise ValueError(f"{os.fspath(path)}, line {i}: expected a JSON object (a record), got {line.strip()[:60]!r}")
      records.append(record)
  if not records:
    raise ValueError(f"{os.fspath(path)}: expected JSON lines, one record per round "
                     f"(simulation.run(metrics_path=...)), got an empty file")
  return records


def load_runs(paths: Sequence[str | os.PathLike], *, label: Callable[[str], str] | None = None) -> Runs:
  """Reads metrics files and groups them by a label: the runs of one configuration with several seeds.

  Args:
    paths: metrics files, one per run.
    label: the label of a file from its path (e.g. `lambda p: os.path.basename(p).split("_seed")[0]`);
      by default, its name without the extension (every file a label of its own).

  Returns:
    A dict from each label to its runs (lists of records), labels and runs in the order of `paths`.

  Example:
    >>> import json, os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for seed in (0, 1):
    ...   with open(os.path.join(folder, f"fedavg_seed{seed}.jsonl"), "w") as f:
    ...     _ = f.write(json.dumps({"round": 1, "test_accuracy": 0.5 + seed / 10}) + "\\n")
    >>> runs = load_runs(sorted(os.path.join(folder, n) for n in os.listdir(folder)),
    ...                  label=lambda p: os.path.basename(p).split("_seed")[0])
    >>> {name: len(seeds) for name, seeds in runs.items()}
    {'fedavg': 2}
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  runs: Runs = {}
  for path in paths:
    name = label(os.fspath(path)) if label is not None else _stem(path)
    runs.setdefault(name, []).append(read_metrics(path))
  if not runs:
    raise ValueError("paths: expected at least one metrics file, got none")
  return runs


def table(runs: Any) -> dict[str, list]:
  """Every record of every run as one table: a dict of columns, one row per record.

  Args:
    runs: see the module docstring.

  Returns:
    Columns `label`, `run` (the run's index within its label) and every field of the records that
    holds a number (lists, such as the per-client figures, are left out), in order of appearance;
    NaN where a record lacks a field (e.g. the test figures of a round not tested).
    `pandas.DataFrame(table(runs))` takes it as it is.

  Example:
    >>> t = table({"a": [[{"round": 1, "loss": 2.0}, {"round": 2, "loss": 1.5, "test_accuracy": 0.6}]]})
    >>> t["round"], t["test_accuracy"][1]
    ([1, 2], 0.6)
  """
  rows = [{"label": name, "run": i, **{k: v for k, v in record.items() if _is_number(v)}}
          for name, group in _as_runs(runs).items() for i, records in enumerate(group) for record in records]
  keys = list(dict.fromkeys(k for row in rows for k in row))
  return {k: [row.get(k, math.nan) for row in rows] for k in keys}


def curves(runs: Any, metric: str, *, x: str | None = None, ddof: int = 0) -> dict[str, Curve]:
  """The mean and spread over each label's runs of `metric`, against the step or the bytes.

  Args:
    runs: see the module docstring.
    metric: a record field holding a number, e.g. "test_accuracy", "train_batch_loss" (records
      without it, such as rounds not tested, are skipped).
    x: None for the step (the records' `round`, or `epoch` for a `fit` history), "bytes" for the
      bytes sent up and down by then (`bytes_up_cumulative + bytes_down_cumulative`, or the running
      sum of `bytes_up + bytes_down` from the first round where the records lack those), or another
      record field.
    ddof: the standard deviation's delta degrees of freedom (0: over the runs as they are; 1: the
      sample estimate).

  Returns:
    A dict from each label to its `Curve`.

  Raises:
    ValueError: naming the label and the run, when a run lacks `metric` or `x`, or the runs of one
      label hold `metric` at different steps (e.g. runs of different lengths).

  Example:
    >>> runs = {"a": [[{"round": 1, "bytes_up_cumulative": 10, "bytes_down_cumulative": 5, "loss": 2.0}]]}
    >>> curves(runs, "loss", x="bytes")["a"].x.tolist()
    [15.0]
  """
  out = {}
  for name, group in _as_runs(runs).items():
    steps, xs, ys = [], [], []
    for i, records in enumerate(group):
      where = f"run {i} of {name!r}"
      step = _step_name(records, where)
      _check_metric(records, metric, where, "metric")
      x_of = _bytes(records, where) if x == "bytes" else _field(records, x or step, where)
      held = [(r[step], x_of[j], r[metric]) for j, r in enumerate(records) if _holds(r, metric)]
      steps.append([s for s, _, _ in held])
      xs.append([v for _, v, _ in held])
      ys.append([v for _, _, v in held])
      if steps[i] != steps[0]:
        raise ValueError(f"runs[{name!r}]: expected every run to hold {metric!r} at the same {step}s as run 0 "
                         f"({_describe(steps[0], step)}), got {_describe(steps[i], step)} in run {i}")
    ys_RxT = np.asarray(ys, np.float64)
    out[name] = Curve(np.asarray(xs, np.float64).mean(axis=0), ys_RxT.mean(axis=0),
                      ys_RxT.std(axis=0, ddof=ddof) if len(group) > ddof else np.full(ys_RxT.shape[1], np.nan),
                      len(group))
  return out


def summary(runs: Any, metrics: Sequence[str], *, ddof: int = 0) -> dict[str, list]:
  """The final figures of each label: the mean and spread over its runs of each metric's last value.

  Args:
    runs: see the module docstring.
    metrics: record fields, e.g. `["test_accuracy", "train_batch_loss"]`; each taken at the last
      record that holds it (the last test, for test figures).
    ddof: as in `curves`.

  Returns:
    Columns `label`, `runs` and, per metric, `<metric>_mean` and `<metric>_std`: one row per label,
    for `to_markdown` or `pandas.DataFrame`.

  Example:
    >>> runs = {"a": [[{"round": 1, "test_accuracy": 0.5}], [{"round": 1, "test_accuracy": 0.7}]]}
    >>> summary(runs, ["test_accuracy"])["test_accuracy_mean"]
    [0.6]
  """
  if isinstance(metrics, str):
    metrics = [metrics]
  runs = _as_runs(runs)
  columns: dict[str, list] = {"label": list(runs), "runs": [len(group) for group in runs.values()]}
  for metric in metrics:
    by_label = curves(runs, metric, ddof=ddof)
    columns[f"{metric}_mean"] = [float(by_label[name].mean[-1]) for name in runs]
    columns[f"{metric}_std"] = [float(by_label[name].std[-1]) for name in runs]
  return columns


def to_markdown(columns: Mapping[str, Sequence] | Sequence[Mapping[str, Any]], *, digits: int = 4) -> str:
  """A table as Markdown (a GitHub pipe table), to print or to paste into a README.

  Args:
    columns: a dict of columns (`table`, `summary`) or a list of rows (dicts, e.g. a `fit` history).
    digits: significant digits of non-integer numbers; NaN and None print as empty cells.

  Returns:
    The table's lines, joined by newlines.

  Example:
    >>> print(to_markdown([{"epoch": 1, "loss": 2.302585}, {"epoch": 2, "loss": 1.5}]))
    | epoch | loss |
    |---|---|
    | 1 | 2.303 |
    | 2 | 1.5 |
  """
  if isinstance(columns, Mapping):
    keys = list(columns)
    lengths = {len(columns[k]) for k in keys}
    if len(lengths) > 1:
      raise ValueError(f"columns: expected columns of one length, got lengths {sorted(lengths)}")
    rows = [{k: columns[k][i] for k in keys} for i in range(lengths.pop() if lengths else 0)]
  else:
    rows = list(columns)
    keys = list(dict.fromkeys(k for row in rows for k in row))

  def cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return ""
    if isinstance(v, numbers.Integral):
      return str(int(v))
    if isinstance(v, numbers.Real):
      return f"{float(v):.{digits}g}"
    return str(v).replace("|", "\\|")

  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
  return "\n".join(lines)


def plot(runs: Any, metric: str, *, x: str | None = None, ax: Any = None, ddof: int = 0):
  """One line per label: the mean of `metric` over its runs, in a band of one standard deviation.

  Args:
    runs: see the module docstring.
    metric: a record field holding a number (see `curves`).
    x: None for the step (rounds, or epochs), "bytes" for the bytes sent up and down, or a field.
    ax: a matplotlib `Axes` to draw on; by default one of a new `Figure` (no pyplot state).
    ddof: as in `curves`.

  Returns:
    The `Axes` (its `figure` to save: `ax.figure.savefig(path)`). Each label's mean is the line
    labelled with it; the band (drawn for two runs or more) spans the mean +- the std.

  Example:
    >>> ax = plot({"a": [[{"round": 1, "loss": 2.0}, {"round": 2, "loss": 1.0}]]}, "loss")
    >>> ax.lines[0].get_ydata().tolist(), ax.get_xlabel()
    ([2.0, 1.0], 'round')
  """
  runs = _as_runs(runs)
  by_label = curves(runs, metric, x=x, ddof=ddof)
  if ax is None:
    ax = _figure(figsize=(5, 3.5), layout="constrained").subplots()
  for name, curve in by_label.items():
    (line,) = ax.plot(curve.x, curve.mean, marker="." if len(curve.x) <= 50 else None, label=name)
    if curve.runs > 1:
      ax.fill_between(curve.x, curve.mean - curve.std, curve.mean + curve.std, color=line.get_color(), alpha=0.2,
                      linewidth=0)
  ax.set_xlabel("bytes (up + down)" if x == "bytes" else x or _step_name(next(iter(runs.values()))[0], "runs"))
  ax.set_ylabel(metric)
  ax.legend(fontsize=8)
  return ax


def plot_runs(runs: Any, *, accuracy: str | None = None, loss: str | None = None, ddof: int = 0, title: str = ""):
  """The standard plots of a study: accuracy and loss against the step and against the bytes.

  Args:
    runs: see the module docstring.
    accuracy: the accuracy figure; by default the first of `ACCURACY_NAMES` the records hold
      (`test_accuracy`, then `test_accuracy_mean`, then the training figures).
    loss: the loss figure; by default the first of `LOSS_NAMES` the records hold.
    ddof: as in `curves`.
    title: the figure's title.

  Returns:
    A matplotlib `Figure` (no pyplot state; in a notebook it shows itself) of 2 x 2 panels:
    accuracy (top) and loss (bottom) against the step (left) and the bytes (right).

  Example:
    >>> records = [{"round": r, "bytes_up": 10, "bytes_down": 5, "train_batch_accuracy": r / 4,
    ...             "train_batch_loss": 1 / r} for r in (1, 2, 3)]
    >>> fig = plot_runs({"parallel SL": [records]})
    >>> [ax.get_ylabel() for ax in fig.axes]
    ['train_batch_accuracy', 'train_batch_accuracy', 'train_batch_loss', 'train_batch_loss']
  """
  runs = _as_runs(runs)
  first = next(iter(runs.values()))[0]
  accuracy = accuracy or _first_held(first, ACCURACY_NAMES, "accuracy")
  loss = loss or _first_held(first, LOSS_NAMES, "loss")
  fig = _figure(figsize=(10, 6.5), layout="constrained")
  axes = fig.subplots(2, 2)
  for row, metric in enumerate((accuracy, loss)):
    for col, x in enumerate((None, "bytes")):
      plot(runs, metric, x=x, ax=axes[row, col], ddof=ddof)
  if title:
    fig.suptitle(title)
  return fig


def _figure(**kwargs: Any):
  """A matplotlib `Figure(**kwargs)` (no pyplot state) that a notebook shows as a PNG, pyplot imported or not."""
  from matplotlib.figure import Figure  # noqa: PLC0415 -- matplotlib is needed only to plot

  class _Figure(Figure):
    def _repr_png_(self) -> bytes:
      # IPython shows a Figure by the inline backend's formatter, which only importing pyplot installs
      buffer = io.BytesIO()
      self.savefig(buffer, format="png")
      return buffer.getvalue()

  return _Figure(**kwargs)


def _as_runs(runs: Any) -> Runs:
  """`runs` in any of the forms the module docstring lists, as a dict from each label to its runs."""
  if isinstance(runs, Mapping):
    out = {str(name): _group(value, f"runs[{name!r}]") for name, value in runs.items()}
  elif _is_run(runs):
    out = {_stem(runs) if isinstance(runs, (str, os.PathLike)) else "run": [_run(runs)]}
  elif isinstance(runs, Sequence):
    out = {}
    for i, run in enumerate(runs):
      if not _is_run(run):
        raise ValueError(f"runs[{i}]: expected a path to a metrics file or a list of records, got "
                         f"{type(run).__name__}")
      out[_stem(run) if isinstance(run, (str, os.PathLike)) else f"run {i}"] = [_run(run)]
  else:
    raise ValueError(f"runs: expected a dict from labels to runs, a run or a list of runs, got {type(runs).__name__}")
  if not out or any(not group for group in out.values()):
    raise ValueError(f"runs: expected at least one run for every label, got {({k: len(v) for k, v in out.items()})}")
  return out


def _is_run(value: Any) -> bool:
  """A path, or a list of records."""
  return isinstance(value, (str, os.PathLike)) or (isinstance(value, Sequence) and bool(value)
                                                   and all(isinstance(r, Mapping) for r in value))


def _group(value: Any, where: str) -> list[Records]:
  if _is_run(value):
    return [_run(value)]
  if isinstance(value, Sequence) and all(_is_run(v) for v in value):
    return [_run(v) for v in value]
  raise ValueError(f"{where}: expected a run (a path or a list of records) or a list of runs, got "
                   f"{type(value).__name__}")


def _run(value: Any) -> Records:
  return read_metrics(value) if isinstance(value, (str, os.PathLike)) else [dict(r) for r in value]


def _stem(path: str | os.PathLike) -> str:
  return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _holds(record: Mapping, name: str) -> bool:
  """Whether the record holds a number for `name` (NaN in a `fit` history: an epoch not tested)."""
  value = record.get(name)
  return _is_number(value) and not math.isnan(value)


def _step_name(records: Records, where: str) -> str:
  for name in ("round", "epoch"):
    if name in records[0]:
      return name
  raise ValueError(f"{where}: expected records with a 'round' (simulation.run) or an 'epoch' (fit), got fields "
                   f"{sorted(records[0])}")


def _check_metric(records: Records, metric: str, where: str, argument: str) -> None:
  """Raises a ValueError naming `argument` unless some record holds a number for `metric`."""
  if any(_holds(r, metric) for r in records):
    return
  other = [r[metric] for r in records if metric in r and not _is_number(r[metric])]
  if other:
    raise ValueError(f"{argument}: expected a figure holding one number per record, got {metric!r}, which holds "
                     f"{type(other[0]).__name__} values in {where}")
  names = sorted({k for r in records for k in r if _holds(r, k)})
  raise ValueError(f"{argument}: expected a figure the records hold, got {metric!r}; {where} holds {names}")


def _field(records: Records, name: str, where: str) -> list:
  _check_metric(records, name, where, "x")
  return [r.get(name, math.nan) for r in records]


def _bytes(records: Records, where: str) -> list:
  """The bytes up and down sent by each record's step: the cumulative fields, or the running sum."""
  if all("bytes_up_cumulative" in r and "bytes_down_cumulative" in r for r in records):
    return [r["bytes_up_cumulative"] + r["bytes_down_cumulative"] for r in records]
  step = _step_name(records, where)
  if all("bytes_up" in r and "bytes_down" in r for r in records) and records[0][step] == 1:
    return np.cumsum([r["bytes_up"] + r["bytes_down"] for r in records]).tolist()
  raise ValueError(f"x: 'bytes' needs bytes_up_cumulative and bytes_down_cumulative (simulation.run's records) or "
                   f"bytes_up and bytes_down in every record from {step} 1; {where} has neither")


def _first_held(records: Records, names: Sequence[str], argument: str) -> str:
  for name in names:
    if any(_holds(r, name) for r in records):
      return name
  raise ValueError(f"{argument}: expected one of {list(names)} in the records, or a name, got records with "
                   f"{sorted({k for r in records for k in r})}")


def _describe(steps: list, step: str) -> str:
  if not steps:
    return f"no {step}s"
  shown = ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
  return f"{len(steps)} {step}s: {shown}"
