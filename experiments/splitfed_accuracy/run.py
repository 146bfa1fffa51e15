"""SplitFed-style accuracy table: centralized, FedAvg, sequential SL, parallel SL, SplitFed v1 and v2.

Thapa, Chamikara, Camtepe & Sun, "SplitFed: When Federated Learning Meets Split Learning" (AAAI
2022) report SplitFed near split learning near centralized training on IID data. This study runs
the six algorithms of `sljax.algorithms.REGISTRY` with the same split model, optimizer (Adam),
batch size and number of epochs on four offline data sets (`sljax.data`: digits, breast_cancer,
wine, MNIST-1D), K in {5, 10} clients, an IID partition and Dirichlet label skew alpha in {1.0,
0.1}, and reports the final test accuracy as mean ± std over seeds.

A round is about one epoch: every client takes ceil(N / (K * B)) steps of batch B (sequential SL:
one client after the other; centralized: one step on the K batches pooled). Centralized training
is run on the IID partition only (pooled data has no partition) and shown as every column's
reference. Parallel SL keeps one client half per client: its figure is the mean of the K clients'
test accuracies (each client's half with the shared server half, on the whole test set).

Seed s draws the partition, the initialisation and the data order; the train/test split of each
data set is fixed (`sljax.data` seed 0). Each algorithm is built, and so compiled, once per
(data set, K) and reused for every seed and partition (the clients' data is padded to a fixed
shape, see experiments/studies.py).

Usage:
  .venv/bin/python experiments/splitfed_accuracy/run.py [--quick] [--seeds 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import studies  # noqa: E402
import sljax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
EPOCHS = {"digits": 20, "breast_cancer": 20, "wine": 40, "mnist1d": 30}
SCHEMES = ("iid", "dir1.0", "dir0.1")


def cell(task_name: str, num_clients: int, algorithm: str, schemes, seeds, *, epochs: int,
         log=lambda _: None) -> dict:
  """Final test accuracies of one algorithm on one task with K clients: {scheme: [per seed]}."""
  ds = studies.dataset(task_name)
  steps = studies.steps_per_epoch(len(ds.y_train), num_clients=num_clients, batch_size=BATCH_SIZE)
  config = sljax.algorithms.ScheduleConfig(num_clients=num_clients, batch_size=BATCH_SIZE, local_steps=steps)
  algo = studies.build(algorithm, studies.TASKS[task_name].model(ds.num_classes), config,
                       learning_rate=LEARNING_RATE)
  init = jax.jit(algo.init)  # one program for every seed and partition (algo.init alone traces anew per call)
  out = {}
  for scheme in schemes:
    accs = []
    for seed in seeds:
      t0 = time.perf_counter()
      parts = studies.partition(ds.y_train, scheme, num_clients=num_clients, seed=seed)
      data = studies.padded_clients(ds.x_train, ds.y_train, parts, len(ds.y_train))
      state = init(jax.random.key(seed), data)
      _, records = sljax.simulation.run(algo, state, data, rounds=epochs, test=(ds.x_test, ds.y_test),
                                        eval_every=epochs)
      accs.append(studies.test_accuracy(records[-1]))
      log(f"{task_name} K={num_clients} {scheme} {algorithm} seed {seed}: {accs[-1]:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")
    out[scheme] = accs
  return out


def study(tasks, client_counts, schemes, algorithms, seeds, *, epochs: dict | None = None, grid: dict | None = None,
          save=lambda grid: None, log=lambda _: None) -> dict:
  """The whole grid: per task and K, per algorithm and scheme, the seeds' accuracies and their mean ± std.

  `grid`: cells already run (e.g. read back from an earlier results.json), kept and not run again;
  `save(grid)` is called after every new cell, so an interrupted run keeps what it finished.
  """
  epochs = {**EPOCHS, **(epochs or {})}
  grid = dict(grid or {})
  for task_name in tasks:
    for num_clients in client_counts:
      key = f"{task_name}/K={num_clients}"
      cell_info = {"task": task_name, "num_clients": num_clients, "epochs": epochs[task_name], "seeds": list(seeds)}
      if key in grid and {k: grid[key].get(k) for k in cell_info} != cell_info:
        del grid[key]  # run with other settings: run again
      grid.setdefault(key, {**cell_info, "algorithms": {}})
      for algorithm in algorithms:
        # pooled data has no partition: centralized runs on the IID one and is every column's reference
        own = ("iid",) if algorithm == "centralized" else schemes
        if set(own) <= set(grid[key]["algorithms"].get(algorithm, {})):
          continue
        runs = cell(task_name, num_clients, algorithm, own, seeds, epochs=epochs[task_name], log=log)
        grid[key]["algorithms"][algorithm] = {s: {"runs": a, **studies.mean_std(a)} for s, a in runs.items()}
        save(grid)
  return grid


def from_log(path: str, seeds, epochs: dict | None = None) -> dict:
  """The cells finished by an interrupted run, read back from the lines it logged (accuracies to 4 digits)."""
  import re  # noqa: PLC0415

  epochs = {**EPOCHS, **(epochs or {})}
  found = {}
  pattern = re.compile(r"^(\w+) K=(\d+) (\S+) (\w+) seed (\d+): ([0-9.]+) ")
  with open(path) as f:
    for line in f:
      m = pattern.match(line)
      if m:
        task_name, k, scheme, algorithm, seed, acc = m.groups()
        found.setdefault((task_name, int(k)), {}).setdefault(algorithm, {}).setdefault(scheme, {})[int(seed)] = float(acc)
  grid = {}
  for (task_name, k), algorithms in found.items():
    cell_ = {"task": task_name, "num_clients": k, "epochs": epochs[task_name], "seeds": list(seeds),
             "algorithms": {}, "source": "log"}
    for algorithm, by_scheme in algorithms.items():
      if all(set(by_seed) == set(seeds) for by_seed in by_scheme.values()):
        cell_["algorithms"][algorithm] = {
            s: {"runs": [by_seed[i] for i in seeds], **studies.mean_std([by_seed[i] for i in seeds])}
            for s, by_seed in by_scheme.items()}
    grid[f"{task_name}/K={k}"] = cell_
  return grid


def _figures(grid: dict, task_name: str, k: int, algorithm: str, scheme: str) -> dict | None:
  """mean/std of one algorithm in one column (centralized: its IID figure in every column); None if not run."""
  figures = grid.get(f"{task_name}/K={k}", {}).get("algorithms", {}).get(algorithm)
  if figures is None:
    return None
  return figures.get(scheme, figures.get("iid") if algorithm == "centralized" else None)


def table(grid: dict, schemes, client_counts) -> str:
  lines = []
  for task_name in dict.fromkeys(c["task"] for c in grid.values()):
    cells_info = [grid[f"{task_name}/K={k}"] for k in client_counts if f"{task_name}/K={k}" in grid]
    seeds = sorted({len(c["seeds"]) for c in cells_info})
    epochs = sorted({c["epochs"] for c in cells_info})
    header = " | ".join(f"K={k} {s}" for k in client_counts for s in schemes)
    lines += [f"\n{task_name} ({'/'.join(map(str, epochs))} epochs): test accuracy %, mean ± std over "
              f"{'/'.join(map(str, seeds))} seeds", f"| algorithm | {header} |",
              "|---|" + "---|" * (len(client_counts) * len(schemes))]
    for algorithm in studies.ALGORITHMS:
      cells = []
      for k in client_counts:
        for s in schemes:
          f = _figures(grid, task_name, k, algorithm, s)
          cells.append("–" if f is None else f"{100 * f['mean']:.1f} ± {100 * f['std']:.1f}")
      if any(c != "–" for c in cells):
        lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(grid: dict, schemes, client_counts, path: str) -> None:
  tasks = list(dict.fromkeys(c["task"] for c in grid.values()))
  fig = studies.figure(figsize=(3.6 * len(tasks), 3.0 * len(client_counts)), layout="constrained")
  axes = fig.subplots(len(client_counts), len(tasks), squeeze=False)
  colors = dict(zip(studies.ALGORITHMS, ("black", "tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red")))
  width = 0.8 / len(studies.ALGORITHMS)
  for row, k in enumerate(client_counts):
    for col, task_name in enumerate(tasks):
      ax = axes[row][col]
      lows = []
      for i, algorithm in enumerate(studies.ALGORITHMS):
        figures = [_figures(grid, task_name, k, algorithm, s) for s in schemes]
        at = [j for j, f in enumerate(figures) if f is not None]
        if not at:
          continue
        means = [100 * figures[j]["mean"] for j in at]
        lows += means
        ax.bar(np.array(at) + (i - (len(studies.ALGORITHMS) - 1) / 2) * width, means, width,
               yerr=[100 * figures[j]["std"] for j in at], color=colors[algorithm], label=algorithm, capsize=1.5)
      if not lows:
        ax.set_axis_off()
        continue
      ax.set_xticks(range(len(schemes)), schemes)
      ax.set_ylim(max(0, min(lows) - 10), 100)
      ax.set_title(f"{task_name}, K={k}", fontsize=9)
      if col == 0:
        ax.set_ylabel("test accuracy %")
  axes[0][0].legend(fontsize=6, loc="lower left")
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="wine, K=5, IID and alpha=0.1, 2 seeds, "
                      "a quarter of the epochs")
  parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. n-1")
  parser.add_argument("--tasks", default=",".join(studies.TASKS))
  parser.add_argument("--clients", default="5,10", help="values of K")
  parser.add_argument("--schemes", default=",".join(SCHEMES))
  parser.add_argument("--algorithms", default=",".join(studies.ALGORITHMS))
  parser.add_argument("--epochs", default="", help="per-task epochs, e.g. mnist1d=10 (default: " +
                      ",".join(f"{k}={v}" for k, v in EPOCHS.items()) + ")")
  parser.add_argument("--resume", action="store_true", help="keep the cells of --out run with the same settings")
  parser.add_argument("--from-log", default=None, help="start from the cells an interrupted run logged (its stderr)")
  parser.add_argument("--out", default=os.path.join(HERE, "results.json"), help="the JSON file; the plot goes "
                      "next to it (accuracy.png)")
  args = parser.parse_args(argv)
  tasks, schemes = args.tasks.split(","), args.schemes.split(",")
  client_counts = [int(k) for k in args.clients.split(",")]
  algorithms = args.algorithms.split(",")
  seeds = list(range(args.seeds))
  epochs = {k: int(v) for k, v in (item.split("=") for item in args.epochs.split(",") if item)}
  if args.quick:
    tasks, client_counts, schemes, seeds = ["wine"], [5], ["iid", "dir0.1"], [0, 1]
    epochs = {name: max(2, e // 4) for name, e in EPOCHS.items()}
  timer = studies.Timer()
  grid = {}
  if args.from_log:
    grid = from_log(args.from_log, seeds, epochs)
  elif args.resume and os.path.exists(args.out):
    with open(args.out) as f:
      grid = json.load(f)["grid"]

  def result_of(grid):
    return {"study": "splitfed_accuracy", "quick": args.quick, "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE, "optimizer": "adam", "schemes": schemes, "grid": grid,
            "environment": studies.environment(timer())}

  grid = study(tasks, client_counts, schemes, algorithms, seeds, epochs=epochs, grid=grid,
               save=lambda g: studies.write_json(args.out, result_of(g)),
               log=lambda line: print(line, file=sys.stderr, flush=True))
  studies.write_json(args.out, result_of(grid))
  client_counts = sorted({c["num_clients"] for c in grid.values()})
  plot(grid, schemes, client_counts, os.path.join(os.path.dirname(os.path.abspath(args.out)), "accuracy.png"))
  print(table(grid, schemes, client_counts))
  print(f"\n{timer():.0f} s; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
