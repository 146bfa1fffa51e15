"""Vertical split learning against each party alone and against centralized training, seeded.

Tasks (sljax.data.vertical): credit_fraud (a bank, a card network, a merchant; 5% frauds; metric
ROC AUC), breast_cancer split by feature groups across 2 and 4 parties (metric accuracy, AUC too).

Methods, all with the same parts (per party: an MLP bottom 16 ReLU -> 8; the top: 16 ReLU -> 2)
and the same epochs, each with a learning-rate sweep (Adam; the rate picked by the validation
metric on a 20% hold-out of the training rows, then the test figures reported):
  party <name>   that party alone: its bottom and the top on its own columns (no network);
  vertical       vertical SL (sljax.vertical_sl), concat merge, every party's bottom on its columns;
  centralized    the same composed model trained in one place on the joined columns
                 (sljax.vertical_centralized).
And, on credit_fraud, partial overlap: each party holds a random 90% of the training transactions;
sljax.align (PSI) finds the shared ones, vertical SL trains on them.

Usage:
  .venv/bin/python experiments/vertical/run.py [--quick] [--seeds 3] [--out DIR] [--studies ...]

And, on credit_fraud and breast_cancer_4, a party missing at inference: vertical SL trained with
every party, tested with each party absent (sljax.vertical_evaluate(..., absent=...): a zero
embedding in its place). And, on both, random party dropout in training (sljax.vertical.with_dropout,
rates 0.1 and 0.3, a learned stand-in) against full participation, tested with every party and with
each party missing.

Writes DIR/results.json and DIR/vertical.png (DIR: this folder by default) and prints a table;
`--studies tasks,overlap,missing,dropout` runs some of the parts and replaces only their entries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sljax

HERE = os.path.dirname(os.path.abspath(__file__))
RATES = (1e-3, 3e-3, 1e-2)


def _bottom():
  return sljax.sequential(*sljax.models.mlp(hidden=(16,), num_classes=8))


def _top():
  return sljax.sequential(*sljax.models.mlp(hidden=(16,), num_classes=2))


def _adam():
  return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def _with_rate(state, rate: float):
  """Every optimizer state in `state` set to learning rate `rate`: one compiled step serves the sweep."""

  def is_injected(node):  # optax.inject_hyperparams' state, whatever its class is called in this optax
    return hasattr(node, "hyperparams") and hasattr(node, "_replace")

  def set_rate(node):
    if is_injected(node):
      return node._replace(hyperparams={**node.hyperparams, "learning_rate": jnp.float32(rate)})
    return node

  return jax.tree.map(set_rate, state, is_leaf=is_injected)


def _holdout(xs, y, seed):
  """A seeded 80/20 split of the training rows: (train xs, train y), (validation xs, validation y)."""
  order = np.random.default_rng(seed).permutation(len(y))
  cut = int(0.8 * len(y))
  tr, va = order[:cut], order[cut:]
  return (tuple(x[tr] for x in xs), y[tr]), (tuple(x[va] for x in xs), y[va])


def _train(trainer, xs, y, *, rate, seed, epochs, batch_size):
  state = _with_rate(trainer.init(jax.random.key(seed), tuple(x[:2] for x in xs)), rate)
  state, _ = sljax.fit(trainer, state, xs, y, key=jax.random.key(seed + 1), epochs=epochs, batch_size=batch_size)
  return state


def _tuned(trainer, train, valid, test, *, metric, seed, epochs, batch_size, rates):
  """The test figures at the rate with the best validation `metric`, and that rate."""
  best = None
  for rate in rates:
    state = _train(trainer, *train, rate=rate, seed=seed, epochs=epochs, batch_size=batch_size)
    score = sljax.vertical_evaluate(trainer, state, *valid)[metric]
    if best is None or score > best[0]:
      best = (score, rate, state)
  _, rate, state = best
  figures = sljax.vertical_evaluate(trainer, state, *test)
  return {"rate": rate, "accuracy": figures["accuracy"], "auc": figures["auc"], "test_bytes_up": figures["bytes_up"]}


def _trainers(names):
  """Per method: a trainer (vertical SL, centralized, or one party alone)."""
  model = sljax.vertical_model([_bottom() for _ in names], sljax.merges.concat(), _top(), names=list(names))
  trainers = {"vertical": sljax.vertical_sl(model, party_optimizers=_adam(), top_optimizer=_adam()),
              "centralized": sljax.vertical_centralized(model, optimizer=_adam())}
  for name in names:
    alone = sljax.vertical_model([_bottom()], sljax.merges.concat(), _top(), names=[name])
    trainers[f"party {name}"] = sljax.vertical_centralized(alone, optimizer=_adam())
  return trainers


def task(data: sljax.data.VerticalDataset, *, metric: str, seeds: int, epochs: int, batch_size: int,
         rates) -> dict:
  names = data.parties
  train_all = data.parties_train()
  trainers = _trainers(names)
  results = {method: [] for method in trainers}
  for seed in range(seeds):
    train, valid = _holdout(train_all, data.dataset.y_train, seed)
    test = (data.parties_test(), data.dataset.y_test)
    for method, trainer in trainers.items():
      if method.startswith("party "):
        p = names.index(method.split(" ", 1)[1])
        pick = lambda split, p=p: ((split[0][p],), split[1])  # noqa: E731
        row = _tuned(trainer, pick(train), pick(valid), pick(test), metric=metric, seed=seed, epochs=epochs,
                     batch_size=batch_size, rates=rates)
      else:
        row = _tuned(trainer, train, valid, test, metric=metric, seed=seed, epochs=epochs, batch_size=batch_size,
                     rates=rates)
      results[method].append(row)
  summary = {}
  for method, rows in results.items():
    values = np.array([r[metric] for r in rows])
    summary[method] = {"mean": float(values.mean()), "std": float(values.std()), "runs": rows}
  return {"metric": metric, "parties": list(names), "feature_groups": list(data.feature_groups),
          "train": int(len(data.dataset.y_train)), "test": int(len(data.dataset.y_test)),
          "positives_train": int(data.dataset.y_train.sum()), "methods": summary}


def partial_overlap(data, *, seeds: int, epochs: int, batch_size: int, share: float = 0.9) -> dict:
  """Each party holds a random `share` of the training rows; PSI aligns them; vertical SL trains on the intersection."""
  names, xs, y = data.parties, data.parties_train(), data.dataset.y_train
  trainer = _trainers(names)["vertical"]
  runs = []
  for seed in range(seeds):
    rng = np.random.default_rng(100 + seed)
    held = {name: np.flatnonzero(rng.random(len(y)) < share) for name in names}
    t0 = time.perf_counter()
    aligned = sljax.align({name: list(data.ids_train[rows]) for name, rows in held.items()}, leader=names[0])
    seconds = time.perf_counter() - t0
    own = {name: data.ids_train[held[name]] for name in names}
    aligned_xs = tuple(aligned.take(name, xs[p][held[name]]) for p, name in enumerate(names))
    # The bank (the leader) holds the labels: its own rows' labels, in the common order.
    labels = aligned.take(names[0], y[held[names[0]]])
    assert all(np.array_equal(own[n][aligned.rows[n]], own[names[0]][aligned.rows[names[0]]]) for n in names)
    state = _train(trainer, aligned_xs, labels, rate=3e-3, seed=seed, epochs=epochs, batch_size=batch_size)
    figures = sljax.vertical_evaluate(trainer, state, data.parties_test(), data.dataset.y_test)
    runs.append({"intersection": aligned.size, "sizes": aligned.sizes, "psi_seconds": round(seconds, 3),
                 "psi_bytes": sum(len(m.payload) for m in aligned.messages), "auc": figures["auc"],
                 "accuracy": figures["accuracy"]})
  return {"share": share, "train": int(len(y)), "runs": runs,
          "auc_mean": float(np.mean([r["auc"] for r in runs]))}


def missing_party(data, *, seeds: int, epochs: int, batch_size: int, rate: float = 3e-3) -> dict:
  """Vertical SL trained with every party, then tested with each party absent: a zero embedding in its place
  ("zero"), or a learned stand-in after one more epoch trained without that party ("learned, +1 epoch")."""
  names = data.parties
  model = sljax.vertical_model([_bottom() for _ in names], sljax.merges.concat(), _top(), names=list(names))
  trainer = sljax.vertical_sl(model, party_optimizers=_adam(), top_optimizer=_adam(), replacement="learned")
  test = (data.parties_test(), data.dataset.y_test)
  runs = []
  for seed in range(seeds):
    train = (data.parties_train(), data.dataset.y_train)
    state = _train(trainer, *train, rate=rate, seed=seed, epochs=epochs, batch_size=batch_size)
    row = {"all": sljax.vertical_evaluate(trainer, state, *test)}
    zero = state.replace(replacement=jax.tree.map(jnp.zeros_like, state.replacement))  # never trained: zeros
    for name in names:
      row[f"without {name}"] = sljax.vertical_evaluate(trainer, zero, *test, absent=(name,))
      if name == trainer.model.label_party:
        continue
      on, _ = sljax.fit(sljax.vertical.without(trainer, [name]), state, *train, key=jax.random.key(seed + 7),
                        epochs=1, batch_size=batch_size)
      row[f"without {name}, learned"] = sljax.vertical_evaluate(trainer, on, *test, absent=(name,))
    runs.append({k: {"accuracy": v["accuracy"], "auc": v["auc"]} for k, v in row.items()})
  return {"rate": rate, "runs": runs,
          "mean": {k: {m: float(np.mean([r[k][m] for r in runs])) for m in ("accuracy", "auc")} for k in runs[0]}}


def dropout_training(data, *, seeds: int, epochs: int, batch_size: int, rates=(0.0, 0.1, 0.3),
                     rate: float = 3e-3) -> dict:
  """Vertical SL trained with random party dropout (`sljax.vertical.with_dropout`: each party absent from a step
  with probability `rates[i]`, a learned stand-in in its place), tested with every party and with each party
  missing; dropout rate 0 is full participation (its stand-ins never trained: zeros)."""
  names = data.parties
  model = sljax.vertical_model([_bottom() for _ in names], sljax.merges.concat(), _top(), names=list(names))
  trainer = sljax.vertical_sl(model, party_optimizers=_adam(), top_optimizer=_adam(), replacement="learned")
  train, test = (data.parties_train(), data.dataset.y_train), (data.parties_test(), data.dataset.y_test)
  runs = {str(r): [] for r in rates}
  for dropout in rates:
    fitted = sljax.vertical.with_dropout(trainer, rate=dropout) if dropout else trainer
    for seed in range(seeds):
      state = _train(fitted, *train, rate=rate, seed=seed, epochs=epochs, batch_size=batch_size)
      row = {"all": sljax.vertical_evaluate(trainer, state, *test)}
      for name in names:
        row[f"without {name}"] = sljax.vertical_evaluate(trainer, state, *test, absent=(name,))
      runs[str(dropout)].append({k: {"accuracy": v["accuracy"], "auc": v["auc"]} for k, v in row.items()})
  mean = {r: {k: {m: float(np.mean([run[k][m] for run in rs])) for m in ("accuracy", "auc")} for k in rs[0]}
          for r, rs in runs.items()}
  return {"rate": rate, "dropout_rates": list(rates), "runs": runs, "mean": mean}


def plot(results: dict, path: str) -> None:
  from matplotlib.figure import Figure  # noqa: PLC0415

  tasks = [t for t in results if "methods" in results[t]]
  fig = Figure(figsize=(4.2 * len(tasks), 3.6), layout="constrained")
  for i, name in enumerate(tasks):
    ax = fig.add_subplot(1, len(tasks), i + 1)
    methods = results[name]["methods"]
    labels = list(methods)
    colors = ["tab:gray" if m.startswith("party") else "tab:blue" if m == "vertical" else "tab:green" for m in labels]
    ax.bar(range(len(labels)), [methods[m]["mean"] for m in labels], yerr=[methods[m]["std"] for m in labels],
           color=colors)
    ax.set_xticks(range(len(labels)), [m.replace("party ", "") for m in labels], rotation=40, ha="right")
    metric = results[name]["metric"]
    ax.set_ylim(0.4, 1.0)
    ax.set_title(f"{name} (test {metric})")
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs, two rates")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default=HERE)
  parser.add_argument("--studies", default="tasks,overlap,missing,dropout",
                      help="which parts to run (their entries in an existing results.json are replaced)")
  args = parser.parse_args(argv)
  studies = set(args.studies.split(","))
  seeds = 1 if args.quick else args.seeds
  rates = RATES[1:] if args.quick else RATES
  fraud_epochs, bc_epochs = (8, 10) if args.quick else (30, 40)
  t0 = time.perf_counter()
  fraud = sljax.data.make_credit_fraud(seed=0)
  path = os.path.join(args.out, "results.json")
  results = {}
  if os.path.exists(path) and studies != {"tasks", "overlap", "missing", "dropout"}:
    with open(path) as f:
      results = json.load(f)
  if "tasks" in studies:
    results["credit_fraud"] = task(fraud, metric="auc", seeds=seeds, epochs=fraud_epochs, batch_size=64, rates=rates)
    for parties in (2, 4):
      results[f"breast_cancer_{parties}"] = task(sljax.data.load_breast_cancer_vertical(num_parties=parties),
                                                 metric="accuracy", seeds=seeds, epochs=bc_epochs, batch_size=32,
                                                 rates=rates)
  if "overlap" in studies:
    results["partial_overlap"] = partial_overlap(fraud, seeds=seeds, epochs=fraud_epochs, batch_size=64)
  if "dropout" in studies:
    results["dropout_training"] = {
        "credit_fraud": dropout_training(fraud, seeds=seeds, epochs=fraud_epochs, batch_size=64),
        "breast_cancer_4": dropout_training(sljax.data.load_breast_cancer_vertical(num_parties=4), seeds=seeds,
                                            epochs=bc_epochs, batch_size=32),
    }
  if "missing" in studies:
    results["missing_party"] = {
        "credit_fraud": missing_party(fraud, seeds=seeds, epochs=fraud_epochs, batch_size=64),
        "breast_cancer_4": missing_party(sljax.data.load_breast_cancer_vertical(num_parties=4), seeds=seeds,
                                         epochs=bc_epochs, batch_size=32),
    }
  results[f"_config_{'_'.join(sorted(studies))}"] = {
      "quick": args.quick, "seeds": seeds, "rates": list(rates), "seconds": round(time.perf_counter() - t0, 1),
      "backend": jax.default_backend()}
  os.makedirs(args.out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  if any("methods" in r for r in results.values()):
    plot(results, os.path.join(args.out, "vertical.png"))
  for name, r in results.items():
    if "methods" not in r:
      continue
    print(f"\n{name}: test {r['metric']} (mean ± std over {seeds} seeds; the rate picked on validation)")
    print("| method | " + r["metric"] + " | accuracy | AUC | rates picked |")
    print("|---|---|---|---|---|")
    for method, m in r["methods"].items():
      acc = np.mean([x["accuracy"] for x in m["runs"]])
      auc = np.mean([x["auc"] for x in m["runs"]])
      rates_picked = ",".join(f"{x['rate']:g}" for x in m["runs"])
      print(f"| {method} | {m['mean']:.3f} ± {m['std']:.3f} | {acc:.3f} | {auc:.3f} | {rates_picked} |")
  if "partial_overlap" in results:
    po = results["partial_overlap"]
    print(f"\npartial overlap (credit_fraud, each party holds {po['share']:.0%} of {po['train']} training rows):")
    for r in po["runs"]:
      print(f"  intersection {r['intersection']} of sizes {r['sizes']}; PSI {r['psi_seconds']} s, {r['psi_bytes']} "
            f"bytes; test AUC {r['auc']:.3f}")
  for name, r in results.get("missing_party", {}).items():
    print(f"\nmissing party ({name}; zero: a zero embedding in its place; learned: a learned stand-in after one more "
          f"epoch trained without the party; mean over {seeds} seeds):")
    for which, m in r["mean"].items():
      print(f"  {which:20} accuracy {m['accuracy']:.3f}  AUC {m['auc']:.3f}")
  for name, r in results.get("dropout_training", {}).items():
    metric = "auc" if name == "credit_fraud" else "accuracy"
    print(f"\nrandom party dropout in training ({name}; test {metric}, mean over {seeds} seeds; columns: the dropout "
          f"rate, 0 = every party in every step):")
    print("| tested | " + " | ".join(f"dropout {d}" for d in r["mean"]) + " |")
    print("|---" * (1 + len(r["mean"])) + "|")
    for which in next(iter(r["mean"].values())):
      print(f"| {which} | " + " | ".join(f"{m[which][metric]:.3f}" for m in r["mean"].values()) + " |")
  print(f"\n{round(time.perf_counter() - t0, 1)} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
