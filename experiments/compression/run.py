"""Compression on the cut: test accuracy against bytes for every codec in sljax.codecs, as a frontier.

The settings and the training run are the codecs benchmark's (experiments/benchmarks/codecs.py:
its `SETUPS`, `settings`, `train` and `summarize`; vanilla SL on digits, one client, Adam 2e-3,
batch 32, the MLP for 20 epochs and the CNN for 10), plus a few settings that reach the codecs and
bit widths the benchmark leaves out: 1-bit and 2-bit quantization both ways, float16, top-1% on the
uplink and top-10% on the downlink (the cut gradient). Every codec of `sljax.codecs` appears:
identity (no codec), cast, quantize (1, 2, 4, 8 bits; per row and per tensor), top_k (with and
without error feedback, exact and straight-through gradient), random_k, clip, chain.

Per setting: test accuracy (mean ± sample std over seeds) against the exact wire bytes per epoch,
up + down (labels and msgpack framing included). The frontier is the settings that no other
setting beats on both: fewer bytes and at least the accuracy.

Zheng, Chen, Lyu & Yao ("Reducing Communication for Split Learning by Randomized Top-k
Sparsification", IJCAI 2023, arXiv:2305.18469) compare cut-size reduction, top-k, quantization and
L1 on the cut and find that, at the same compression level, sparsification with some randomness
beats plain top-k and quantization at strong compression; at mild compression (8 bits) every
method is close to no compression. The shape of this frontier is what to compare.

Usage:
  .venv/bin/python experiments/compression/run.py [--quick] [--seeds 3] [--models mlp,cnn] [--out results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, EXPERIMENTS)
sys.path.insert(1, os.path.join(EXPERIMENTS, "benchmarks"))  # the benchmark imports its `common`
import studies  # noqa: E402
import sljax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _benchmark():
  """experiments/benchmarks/codecs.py as a module (its file name would shadow the standard `codecs`)."""
  spec = importlib.util.spec_from_file_location("codecs_benchmark", os.path.join(EXPERIMENTS, "benchmarks",
                                                                                 "codecs.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _benchmark()


def extra_settings() -> list:
  """Settings beyond the benchmark's, so that every codec and bit width is on the frontier plot."""
  c, Setting = sljax.codecs, bench.Setting
  q1, q2, fp16 = c.quantize(bits=1), c.quantize(bits=2), c.cast(dtype=jnp.float16)
  return [
      Setting("fp16", "fp16", "fp16", fp16, fp16),
      Setting("q2", "q2", "q2", q2, q2),
      Setting("q1 up", "q1", "-", q1, None),
      Setting("top1% up", "top1%", "-", c.top_k(fraction=0.01), None),
      Setting("top10% down", "-", "top10%", None, c.top_k(fraction=0.1)),
      Setting("identity", "id", "id", c.identity(), c.identity()),
  ]


def settings(setup, *, quick: bool) -> list:
  if quick:
    return bench.settings(setup, quick=True)
  return bench.settings(setup, quick=False) + extra_settings()


def frontier(rows: list[dict]) -> list[str]:
  """The settings not dominated: no other has fewer or equal bytes and a higher mean accuracy."""
  best, names = -np.inf, []
  for row in sorted(rows, key=lambda r: (r["bytes_up_per_epoch"] + r["bytes_down_per_epoch"], -r["accuracy_mean"])):
    if row["accuracy_mean"] > best:
      best = row["accuracy_mean"]
      names.append(row["setting"])
  return names


def study(model_names, seeds, *, quick: bool, epochs: int | None = None, only=None, log=lambda _: None) -> dict:
  """Per model: the benchmark's summary row per setting, and the frontier. `only`: setting names to keep."""
  out = {}
  for model_name in model_names:
    setup = bench.SETUPS[model_name]
    if epochs is not None:
      setup = setup._replace(epochs=epochs)
    data = {seed: sljax.data.load_digits(seed=seed, image=setup.image) for seed in seeds}
    chosen = [s for s in settings(setup, quick=quick) if only is None or s.name in only]
    rows, reference = [], None
    for setting in chosen:
      runs = [bench.train(setup, setting, data[seed], seed) for seed in seeds]
      reference = reference or runs  # the first setting is "none": the paired deltas are against it
      rows.append(bench.summarize(setup, setting, runs, reference))
      log(f"{setup.name} {setting.name}: {rows[-1]['accuracy_mean']:.2f} % at "
          f"{(rows[-1]['bytes_up_per_epoch'] + rows[-1]['bytes_down_per_epoch']) / 1e3:.1f} kB/epoch")
    out[model_name] = {"model": setup.name, "epochs": setup.epochs, "rows": rows, "frontier": frontier(rows)}
  return out


def plot(result: dict, path: str) -> None:
  fig = studies.figure(figsize=(5.6 * len(result), 4.4), layout="constrained")
  for i, (model_name, r) in enumerate(result.items()):
    ax = fig.add_subplot(1, len(result), i + 1)
    rows = r["rows"]
    total = np.array([row["bytes_up_per_epoch"] + row["bytes_down_per_epoch"] for row in rows]) / 1e3
    acc = np.array([row["accuracy_mean"] for row in rows])
    std = np.array([row["accuracy_std"] for row in rows])
    on = np.array([row["setting"] in r["frontier"] for row in rows])
    ax.errorbar(total[~on], acc[~on], yerr=std[~on], fmt="o", color="tab:gray", ms=4, capsize=2, label="dominated")
    ax.errorbar(total[on], acc[on], yerr=std[on], fmt="o", color="tab:blue", ms=5, capsize=2, label="frontier")
    order = np.argsort(total[on])
    ax.step(total[on][order], acc[on][order], where="post", color="tab:blue", lw=1)
    for x, y, row in zip(total, acc, rows):
      ax.annotate(row["setting"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("wire bytes per epoch, up + down (kB)")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(max(0, acc.min() - 5), min(100, acc.max() + 2))
    ax.set_title(f"{r['model']} on digits, {r['epochs']} epochs: accuracy against bytes", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
  fig.savefig(path, dpi=120)


def table(result: dict) -> str:
  lines = []
  for r in result.values():
    lines += [f"\n{r['model']} ({r['epochs']} epochs): frontier = {', '.join(r['frontier'])}",
              "| setting | up | down | test acc % | delta pt | kB/epoch up + down | x fewer | frontier |",
              "|---|---|---|---|---|---|---|---|"]
    for row in sorted(r["rows"], key=lambda row: -(row["bytes_up_per_epoch"] + row["bytes_down_per_epoch"])):
      total = (row["bytes_up_per_epoch"] + row["bytes_down_per_epoch"]) / 1e3
      lines.append(f"| {row['setting']} | {row['uplink']} | {row['downlink']} | {row['accuracy_mean']:.2f} ± "
                   f"{row['accuracy_std']:.2f} | {row['delta_mean']:+.2f} | {total:.1f} | {row['ratio_total']:.2f} | "
                   f"{'yes' if row['setting'] in r['frontier'] else ''} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the MLP, 1 seed, 5 epochs, the benchmark's quick settings")
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1")
  parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
  parser.add_argument("--epochs", type=int, default=None, help="instead of the benchmark's (MLP 20, CNN 10)")
  parser.add_argument("--settings", default=None, help="comma-separated setting names to run (default: all)")
  parser.add_argument("--out", default=os.path.join(HERE, "results.json"), help="the JSON file; the plot goes "
                      "next to it (compression.png)")
  args = parser.parse_args(argv)
  model_names, seeds, epochs = args.models.split(","), list(range(args.seeds)), args.epochs
  only = None if args.settings is None else set(args.settings.split(","))
  if args.quick:
    model_names, seeds, epochs = ["mlp"], [0], 5
  timer = studies.Timer()
  with tempfile.TemporaryDirectory(prefix="sljax-compression-") as cache:
    bench._share_compilations(cache)  # the same programs for every seed of a setting
    result = study(model_names, seeds, quick=args.quick, epochs=epochs, only=only,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
  out = {"study": "compression", "quick": args.quick, "seeds": seeds, "batch_size": bench.BATCH_SIZE,
         "learning_rate": bench.LEARNING_RATE, "models": result, "environment": studies.environment(timer())}
  studies.write_json(args.out, out)
  plot(result, os.path.join(os.path.dirname(os.path.abspath(args.out)), "compression.png"))
  print(table(result))
  print(f"\n{timer():.0f} s; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
