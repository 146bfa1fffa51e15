"""How private was this run? The applicable attacks on a transcript, one table, and a privacy-utility plot.

`privacy_report(transcript)` reads the recorded steps and runs every attack the transcript allows:

- with cut gradients and binary labels in vanilla SL: norm and direction scoring (Li et al.), the
  client's view of the labels of the server (the label party);
- with labels: model completion from a few known labels (Fu et al.);
- with truth records (the recorder was asked for the trained batches): the distance correlation
  between inputs and smashed data, and the black-box inverse network (He et al.), its auxiliary
  data a share of the recorded examples held out from the targets (an attacker with data from the
  same distribution; an upper bound on one with less); the white-box inversion only when given the
  client half (`white_box=`).

Each row says the attack, what it targets, its success metrics, the defense, the DP epsilon and the
utility cost (from the arguments, else from the transcript's notes). `sljax privacy-report FILE`
prints the same table.

Example:
  >>> import os, tempfile, jax, numpy as np, optax, sljax
  >>> from sljax.privacy import report
  >>> rng = np.random.default_rng(0)
  >>> y = (rng.uniform(size=256) < 0.1).astype(np.int32)
  >>> x = (rng.normal(size=(256, 8)) + y[:, None]).astype(np.float32)
  >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(8,), num_classes=2), 1),
  ...                    client_optimizer=optax.adam(1e-2), server_optimizer=optax.adam(1e-2))
  >>> path = os.path.join(tempfile.mkdtemp(), "run.sljt")
  >>> _ = sljax.fit(sl, sl.init(jax.random.key(0), x[:32]), x, y, key=jax.random.key(1), epochs=1,
  ...               batch_size=32, transcript=path)
  >>> [row.attack for row in report.privacy_report(path).rows]
  ['norm_scoring', 'direction_scoring', 'model_completion']
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sljax import codecs as codec_lib
from sljax.privacy import attacks, metrics
from sljax.privacy import transcript as transcript_lib


_DEFAULT_INVERSE: Mapping[str, Any] = types.MappingProxyType({})  # InverseNetworkKnowledge's defaults


@dataclasses.dataclass(frozen=True)
class Row:
  """One attack's line: its success metrics (name -> value), the defense, epsilon and utility cost."""

  attack: str
  target: str
  metrics: Mapping[str, float]
  defense: str
  epsilon: float | None = None
  utility_cost: float | None = None


@dataclasses.dataclass(frozen=True)
class PrivacyReport:
  """The table of `privacy_report`: `rows`, the transcript's path, and the attacks that did not apply (and why)."""

  rows: tuple[Row, ...]
  path: str
  skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def row(self, attack: str) -> Row:
    """The row of `attack` (e.g. "norm_scoring"); KeyError naming the attacks run if there is none."""
    for r in self.rows:
      if r.attack == attack:
        return r
    raise KeyError(f"attack: {attack!r} was not run; the report has {[r.attack for r in self.rows]}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-able: {"transcript", "rows": [{attack, target, metrics, defense, epsilon, utility_cost}], "skipped"}."""
    return {"transcript": self.path, "rows": [dataclasses.asdict(r) | {"metrics": dict(r.metrics)} for r in self.rows],
            "skipped": dict(self.skipped)}

  def __str__(self) -> str:
    header = ("attack", "target", "success", "defense", "epsilon", "utility cost")
    lines = [header]
    for r in self.rows:
      success = ", ".join(f"{k} {_number(v)}" for k, v in r.metrics.items())
      lines.append((r.attack, r.target, success, r.defense, _number(r.epsilon), _number(r.utility_cost)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"privacy report: {self.path}"]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text += [f"not run: {name}: {why}" for name, why in self.skipped.items()]
    return "\n".join(text)


def _number(value: float | None) -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and math.isnan(value):
    return "nan"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _describe_codec(description: Any) -> str | None:
  if not description or description.get("name") == "identity":
    return None
  params = ", ".join(f"{k}={v}" for k, v in sorted(description.items()) if k != "name")
  return f"{description['name']}({params})"


def _defense_from_notes(notes: Mapping[str, Any]) -> str:
  parts = []
  for label, value in (("uplink", _describe_codec(notes.get("uplink"))),
                       ("downlink", _describe_codec(notes.get("downlink"))),
                       ("client loss", notes.get("client_loss")),
                       ("cut gradient", notes.get("cut_gradient_transform"))):
    if value:
      parts.append(f"{label}: {value}")
  return "; ".join(parts) or "none"


def privacy_report(
    transcript: str | os.PathLike | transcript_lib.Transcript,
    *,
    defense: str | None = None,
    epsilon: float | None = None,
    utility_cost: float | None = None,
    completion: attacks.CompletionKnowledge | None = attacks.CompletionKnowledge(),
    white_box: attacks.WhiteBoxKnowledge | None = None,
    inverse_network: Mapping[str, Any] | None = _DEFAULT_INVERSE,
    aux_fraction: float = 0.5,
    uplink: codec_lib.Codec | None = None,
    downlink: codec_lib.Codec | None = None,
) -> PrivacyReport:
  """Runs the attacks a transcript allows and returns their table (see the module docstring).

  Args:
    transcript: a path or a loaded `Transcript`.
    defense: the defense's name for the table; by default read from the transcript's notes (codecs,
      client loss, cut-gradient transform), "none" if it had none.
    epsilon: the DP epsilon the run spent; by default the "epsilon" note, if any.
    utility_cost: what the defense cost in utility (e.g. accuracy points against an undefended
      run); by default the "utility_cost" note, if any.
    completion: model completion's knowledge; None to skip it.
    white_box: the client half, for the white-box inversion (needs truth records); None to skip it.
    inverse_network: the black-box inverse network's settings (keyword arguments of
      `attacks.InverseNetworkKnowledge` other than the auxiliary data: hidden, steps, learning_rate,
      batch_size, seed), run when the transcript has truth records; None to skip it.
    aux_fraction: the share of the last round's recorded examples given to the inverse network as
      auxiliary data (the rest are its targets).
    uplink, downlink: the codecs, to decode messages sent through one (see `Transcript.exchanges`).

  Returns:
    A `PrivacyReport`: one `Row` per attack run, and the attacks skipped with the reason.

  Raises:
    ValueError: `aux_fraction` is not in (0, 1).

  Example:
    >>> import os, tempfile, numpy as np
    >>> from sljax import messages
    >>> from sljax.privacy.transcript import Recorder
    >>> path = os.path.join(tempfile.mkdtemp(), "run.sljt")
    >>> y = np.array([0, 1, 0, 0, 1, 0, 0, 0], np.int32)
    >>> with Recorder(path) as rec:
    ...   for step in range(4):  # a server whose cut gradients are larger for the positives
    ...     h = np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)
    ...     rec.record("up", 0, step, 0, messages.SmashedData(h, y))
    ...     rec.record("down", 0, step, 0, messages.CutGradient(np.where(y[:, None] == 1, 1.0, -0.1) * np.ones((8, 3))))
    >>> report = privacy_report(path, completion=None)
    >>> [(row.attack, row.metrics["auc_mean"]) for row in report.rows]
    [('norm_scoring', 1.0), ('direction_scoring', 1.0)]
  """
  if not 0 < aux_fraction < 1:
    raise ValueError(f"aux_fraction: expected a share in (0, 1), got {aux_fraction!r}")
  loaded = transcript if isinstance(transcript, transcript_lib.Transcript) else transcript_lib.load(transcript)
  notes = loaded.notes
  defense = defense if defense is not None else _defense_from_notes(notes)
  epsilon = epsilon if epsilon is not None else notes.get("epsilon")
  utility_cost = utility_cost if utility_cost is not None else notes.get("utility_cost")
  steps = loaded.exchanges(uplink=uplink, downlink=downlink)
  rows: list[Row] = []
  skipped: dict[str, str] = {}

  def add(attack: str, target: str, found: Mapping[str, float]) -> None:
    rows.append(Row(attack, target, dict(found), defense, epsilon, utility_cost))

  if not steps:
    return PrivacyReport((), loaded.path, {"all": "the transcript holds no smashed data"})
  has_labels = all(e.labels is not None or e.true_labels is not None for e in steps)
  labels = np.concatenate([np.asarray(e.true_labels if e.true_labels is not None else e.labels)
                           for e in steps]) if has_labels else None
  binary = labels is not None and np.isin(np.unique(labels), (0, 1)).all()
  if not has_labels:
    skipped["label attacks"] = "no labels to score against: U-shaped SL sends none; record with Recorder(truth=True)"
  elif notes.get("protocol") == "u_shaped":
    skipped["norm_scoring, direction_scoring"] = ("U-shaped SL: the cut gradient goes to the client, which holds the "
                                                  "labels")
  elif not all(e.grad is not None for e in steps):
    skipped["norm_scoring, direction_scoring"] = "no cut gradients recorded"
  elif not binary:
    skipped["norm_scoring, direction_scoring"] = "labels are not binary"
  else:
    for attack in (attacks.norm_scoring, attacks.direction_scoring):
      found = attack(steps)
      add(found.attack, "labels", {"auc_mean": found.auc_mean, "leak_p95": found.leak_p95})
  if has_labels and completion is not None:
    try:
      found = attacks.model_completion(steps, completion)
    except ValueError as e:  # too few examples of a class to know some and attack the rest
      skipped["model_completion"] = str(e)
    else:
      add("model_completion", "labels", {"accuracy": found.accuracy, "auc_mean": found.auc_mean}
          if binary else {"accuracy": found.accuracy})

  last = max(e.round for e in steps)
  final = [e for e in steps if e.round == last]
  if any(e.inputs is None for e in final):
    skipped["input attacks"] = "no truth records to score against; record with Recorder(truth=True)"
    return PrivacyReport(tuple(rows), loaded.path, skipped)
  x = np.concatenate([e.inputs for e in final])
  z = np.concatenate([e.smashed for e in final])
  if len({e.smashed.shape for e in final}) == 1:  # one program for the round's batches
    dcor = jax.jit(jax.vmap(metrics.distance_correlation))(np.stack([e.inputs for e in final]),
                                                           np.stack([e.smashed for e in final]))
  else:
    dcor = [metrics.distance_correlation(e.inputs, e.smashed) for e in final]
  add("distance_correlation", "inputs", {"dcor_mean": float(np.mean(np.asarray(dcor)))})
  if inverse_network is not None:
    cut = int(round(aux_fraction * len(x)))
    if 0 < cut < len(x):
      knowledge = attacks.InverseNetworkKnowledge(aux_inputs=x[:cut], aux_smashed=z[:cut], **inverse_network)
      found = attacks.inverse_network(z[cut:], knowledge, inputs=x[cut:])
      add("inverse_network", "inputs", _reconstruction_metrics(found))
  if white_box is not None:
    found = attacks.white_box_inversion(z, white_box, inputs=x)
    add("white_box_inversion", "inputs", _reconstruction_metrics(found))
  return PrivacyReport(tuple(rows), loaded.path, skipped)


def _reconstruction_metrics(found: attacks.Reconstruction) -> dict[str, float]:
  out = {"mse": found.mse, "psnr": found.psnr}
  if not math.isnan(found.ssim):
    out["ssim"] = found.ssim
  return out


def privacy_utility_plot(points: Sequence[tuple[str, float, float]], *, privacy_label: str = "attack success",
                         utility_label: str = "utility cost", title: str | None = None):
  """A privacy-utility scatter: one labelled point per (name, utility cost, attack success); returns the figure.

  Built on `matplotlib.figure.Figure` (no pyplot state): save it with `fig.savefig(path)` or show
  it in a notebook as is.

  Args:
    points: (name, utility cost, attack success) per defense setting, e.g.
      `("marvell 4", 0.012, report.row("norm_scoring").metrics["auc_mean"])`.
    privacy_label, utility_label, title: axis labels and title.

  Raises:
    ValueError: `points` is empty or a point is not (name, number, number).
  """
  from sljax.plots import _figure  # noqa: PLC0415 -- a Figure a notebook shows without pyplot

  points = list(points)
  if not points or not all(len(p) == 3 and isinstance(p[0], str) for p in points):
    raise ValueError(f"points: expected a non-empty list of (name, utility cost, attack success), got {points[:3]!r}")
  fig = _figure(figsize=(5, 4))
  ax = fig.add_subplot()
  for name, utility, success in points:
    ax.scatter([float(utility)], [float(success)])
    ax.annotate(name, (float(utility), float(success)), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel(utility_label)
  ax.set_ylabel(privacy_label)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig
