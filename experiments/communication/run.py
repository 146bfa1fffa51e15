"""Bytes per epoch of SL, SL with weight hand-off, SplitFed and FedAvg against the number of clients K.

Singh, Vepakomma, Gupta & Raskar, "Detailed comparison of communication efficiency of split
learning and federated learning" (arXiv:1909.09145, 2019), Table 1, per epoch over p samples
held by K clients, with q the cut layer's size per sample, N the model's size and eta the client
half's share of it:

  split learning (no weight sharing)             2 p q
  split learning with client weight sharing      2 p q + eta N K     (the client half handed on once per client)
  federated learning                             2 N K
and for SplitFed (Thapa et al., AAAI 2022, the client halves averaged: up and down once per client)
                                                 2 p q + 2 eta N K
so FL needs fewer bytes than SL below K = p q / N, and more above: the crossover.

sljax measures the same with the algorithms of `sljax.algorithms`: `parallel_sl` (each client keeps
its half: no weights cross), `sequential_sl` (the client half relayed from client to client),
`splitfed_v1` (and v2: the same traffic) and `fedavg`, one round over the whole training set
(`local_steps=1`, batch p / K per client: one epoch), the exact wire bytes up and down from the
records of `sljax.simulation.run` (every message as `sljax.to_bytes` frames it: the uplink carries
the int32 labels too, which the model above leaves out, and msgpack adds a few bytes per message).

The task is the MNIST-1D model of the accuracy study (`sljax.data.make_mnist1d`, 3200 training
signals; `cnn1d(channels=(16, 32), hidden=64)`: conv | conv | dense 64 | output), cut at two
places: after the first conv layer (q = 20 x 16 floats per sample, the client holds 0.4% of the
weights) and after the dense layer (q = 64 floats, the client holds 97%).

Bytes do not depend on the numbers computed, only on the shapes: the programs are compiled with
XLA's backend optimizations off (`--xla_backend_optimization_level=0`), which compiles faster.

Usage:
  .venv/bin/python experiments/communication/run.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":  # only the shapes matter here (see above): compile fast. Set before jax is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import studies  # noqa: E402
import sljax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASK = "mnist1d"
# label -> the algorithm in sljax.algorithms.REGISTRY
SCHEMES = {"SL": "parallel_sl", "SL + weight hand-off": "sequential_sl", "SplitFed": "splitfed_v1", "FL": "fedavg"}
CLIENTS = (1, 2, 5, 10, 20, 40, 80, 160, 320)  # divisors of the 3200 training samples: equal clients
QUICK_CLIENTS = (5, 80)  # with cut 3 only
CUTS = {"cut 1": 1, "cut 3": 3}  # after the first conv layer; after the dense layer


def split_model(task: str, cut: int, num_classes: int) -> sljax.SplitModel:
  """The cnn1d on MNIST-1D; on the other data sets (`--task`, for a quick check) an MLP 64-64."""
  if task == "mnist1d":
    return sljax.cut(sljax.models.cnn1d(channels=(16, 32), hidden=64, num_classes=num_classes), cut)
  return sljax.cut(sljax.models.mlp(hidden=(64, 64), num_classes=num_classes), cut)


def _nbytes(tree) -> int:
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def sizes(model: sljax.SplitModel, x_example) -> dict:
  """q (cut bytes per sample), N (model bytes) and eta (the client half's share of N), float32 as sent."""
  state = sljax.vanilla(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(0.1)).init(jax.random.key(0), x_example)
  client, server = _nbytes(state.client.params), _nbytes(state.server.params)
  spec = state.server.input_spec
  return {"q": int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize, "N": client + server,
          "N_client": client, "eta": client / (client + server), "cut_shape": list(spec.shape)}


def analytic(p: int, k, s: dict) -> dict:
  """Singh et al. (2019) Table 1 (and SplitFed), total bytes per epoch for K = `k` clients."""
  q, n, eta = s["q"], s["N"], s["eta"]
  k = np.asarray(k, np.float64)
  return {"SL": 2 * p * q + 0 * k, "SL + weight hand-off": 2 * p * q + eta * n * k,
          "SplitFed": 2 * p * q + 2 * eta * n * k, "FL": 2 * n * k}


def analytic_crossovers(p: int, s: dict) -> dict:
  """The K at which FL's bytes equal each split scheme's, by the model above."""
  q, n, eta = s["q"], s["N"], s["eta"]
  return {"SL": p * q / n, "SL + weight hand-off": 2 * p * q / ((2 - eta) * n), "SplitFed": p * q / ((1 - eta) * n)}


def measured_crossover(ks, split, fl) -> float | None:
  """Where the measured FL curve crosses a split scheme's: interpolated linearly in K between the two
  measured K around the sign change (both totals are linear in K); None if it does not cross."""
  diff = np.asarray(fl, np.float64) - np.asarray(split, np.float64)
  for i in range(len(ks) - 1):
    if diff[i] <= 0 < diff[i + 1] or diff[i] >= 0 > diff[i + 1]:
      return float(ks[i] + (ks[i + 1] - ks[i]) * (0 - diff[i]) / (diff[i + 1] - diff[i]))
  return None


def measure(task: str, model: sljax.SplitModel, client_counts, schemes=SCHEMES, *, log=lambda _: None) -> dict:
  """Exact bytes up and down of one epoch (one round, batch p/K, one step) per scheme and K."""
  ds = studies.dataset(task)
  p = len(ds.y_train)
  rows = {label: [] for label in schemes}
  for k in client_counts:
    if p % k:
      raise ValueError(f"client_counts: expected divisors of the {p} training samples (equal clients), got {k}")
    config = sljax.algorithms.ScheduleConfig(num_clients=k, batch_size=p // k, local_steps=1)
    parts = sljax.data.iid(ds.y_train, num_clients=k, seed=0)
    data = sljax.data.stack_clients(ds.x_train, ds.y_train, parts)
    for label, name in schemes.items():
      algo = studies.build(name, model, config, learning_rate=1e-3)
      _, records = sljax.simulation.run(algo, algo.init(jax.random.key(0), data), data, rounds=1)
      up, down = int(records[-1]["bytes_up"]), int(records[-1]["bytes_down"])
      rows[label].append({"K": k, "bytes_up": up, "bytes_down": down, "bytes": up + down})
      log(f"K={k} {label} ({name}): {up + down:,} bytes ({up:,} up, {down:,} down)")
  return {"p": p, "client_counts": list(client_counts), "measured": rows}


def study(cut: int, client_counts, *, task: str = TASK, schemes=SCHEMES, log=lambda _: None) -> dict:
  """Measured and modelled bytes per epoch against K for the model cut at `cut`, and the crossovers."""
  ds = studies.dataset(task)
  model = split_model(task, cut, ds.num_classes)
  result = measure(task, model, client_counts, schemes, log=lambda line: log(f"cut {cut}: {line}"))
  s = sizes(model, ds.x_train[:2])
  p, ks = result["p"], result["client_counts"]
  model = {label: [float(v) for v in values] for label, values in analytic(p, ks, s).items()
           if label in result["measured"]}
  fl = [r["bytes"] for r in result["measured"].get("FL", [])]
  crossovers = {}
  for label, at in analytic_crossovers(p, s).items():
    if label not in result["measured"] or "FL" not in result["measured"]:
      continue
    crossovers[label] = {"analytic_K": at,
                         "measured_K": measured_crossover(ks, [r["bytes"] for r in result["measured"][label]], fl)}
  ratios = {label: [r["bytes"] / m for r, m in zip(result["measured"][label], model[label])]
            for label in result["measured"]}
  return {**result, "sizes": s, "analytic": model, "measured_over_analytic": ratios, "crossovers": crossovers}


def plot(results: dict, path: str) -> None:
  fig = studies.figure(figsize=(5.2 * len(results), 4.4), layout="constrained")
  colors = dict(zip(SCHEMES, ("tab:blue", "tab:purple", "tab:green", "tab:red")))
  # hollow, larger markers for the hand-off: its measured bytes equal SplitFed's (see the README)
  markers = {"SL + weight hand-off": dict(marker="s", ms=9, mfc="none")}
  for i, (name, result) in enumerate(results.items()):
    ax = fig.add_subplot(1, len(results), i + 1)
    ks = np.array(result["client_counts"], np.float64)
    fine = np.geomspace(ks.min(), ks.max(), 200)
    model = analytic(result["p"], fine, result["sizes"])
    for label, rows in result["measured"].items():
      ax.plot(ks, [r["bytes"] for r in rows], ls="none", color=colors[label], label=f"{label} (measured)",
              **markers.get(label, dict(marker="o")))
      ax.plot(fine, model[label], "--", color=colors[label], lw=1, label=f"{label} (model)")
    for label, c in result["crossovers"].items():
      ax.axvline(c["analytic_K"], color=colors[label], ls=":", lw=1)
      if c["measured_K"] is not None:
        y = float(analytic(result["p"], [c["measured_K"]], result["sizes"])["FL"][0])
        ax.plot([c["measured_K"]], [y], "x", color=colors[label], ms=10, mew=2)
        ax.annotate(f"K={c['measured_K']:.0f}", (c["measured_K"], y), textcoords="offset points",
                    xytext=(6, -12 - 9 * list(result["crossovers"]).index(label)), fontsize=7, color=colors[label])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"clients K (the {result['p']} training samples split among them)")
    ax.set_ylabel("bytes per epoch (up + down)")
    s = result["sizes"]
    ax.set_title(f"{name}: q = {s['q']} B/sample, N = {s['N'] / 1e3:.1f} kB, eta = {s['eta']:.3f}\n"
                 "x: measured crossover with FL; dotted: the model's", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
  fig.savefig(path, dpi=120)


def table(name: str, result: dict) -> str:
  labels = list(result["measured"])
  s = result["sizes"]
  lines = [f"\n{name}: p = {result['p']} samples, q = {s['q']} bytes/sample (cut {s['cut_shape']}), "
           f"N = {s['N']:,} bytes, eta = {s['eta']:.3f}; MB per epoch measured (model)",
           "| K | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
  for i, k in enumerate(result["client_counts"]):
    cells = [f"{result['measured'][label][i]['bytes'] / 1e6:.3f} ({result['analytic'][label][i] / 1e6:.3f})"
             for label in labels]
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  for label, c in result["crossovers"].items():
    measured = "none in range" if c["measured_K"] is None else f"{c['measured_K']:.1f}"
    lines.append(f"FL = {label} at K = {c['analytic_K']:.1f} (model), {measured} (measured)")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"cut 3 and K in {QUICK_CLIENTS} only")
  parser.add_argument("--seeds", type=int, default=1, help="unused: bytes do not depend on the seed (seed 0)")
  parser.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="values of K (divisors of 3200)")
  parser.add_argument("--cuts", default=",".join(map(str, CUTS.values())), help="cut layers of the cnn1d")
  parser.add_argument("--replot", action="store_true", help="only redraw the plot and tables from --out")
  parser.add_argument("--task", default=TASK, choices=list(studies.TASKS),
                      help="the data set (its size must be divisible by every K)")
  parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"a subset of {','.join(SCHEMES)}")
  parser.add_argument("--out", default=os.path.join(HERE, "results.json"), help="the JSON file; the plot goes "
                      "next to it (communication.png)")
  args = parser.parse_args(argv)
  if args.replot:
    with open(args.out) as f:
      cuts = json.load(f)["cuts"]
    plot(cuts, os.path.join(os.path.dirname(os.path.abspath(args.out)), "communication.png"))
    for name, r in cuts.items():
      print(table(name, r))
    return 0
  client_counts = QUICK_CLIENTS if args.quick else [int(k) for k in args.clients.split(",")]
  cut_list = ["3"] if args.quick else args.cuts.split(",")
  unknown = sorted(set(args.schemes.split(",")) - set(SCHEMES))
  if unknown:
    parser.error(f"--schemes: expected names among {list(SCHEMES)}, got {unknown}")
  schemes = {label: SCHEMES[label] for label in args.schemes.split(",")}
  timer = studies.Timer()
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  cuts = {f"cut {c}": study(int(c), client_counts, task=args.task, schemes=schemes, log=log) for c in cut_list}
  result = {"study": "communication", "quick": args.quick, "task": args.task, "cuts": cuts,
            "environment": studies.environment(timer())}
  studies.write_json(args.out, result)
  plot(cuts, os.path.join(os.path.dirname(os.path.abspath(args.out)), "communication.png"))
  for name, r in cuts.items():
    print(table(name, r))
  print(f"\n{timer():.0f} s; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
