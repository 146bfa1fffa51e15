"""What vertical splitting costs per training step, and what each party sends per sample.

Per number of parties (2, 4) and batch size (64, 512), on synthetic tabular data (16 columns per
party), every party an MLP bottom (64 ReLU -> 32), a concat merge and an MLP top (64 ReLU -> 2),
Adam (1e-3) everywhere, all variants timed side by side (see `common.py`):

  fused / centralized   `jax.jit(vertical_sl(...).step)`, every party's leg and the label
                        party's step as one program (a Python loop over the parties inside jit),
                        over `jax.jit(vertical_centralized(...).step)`, the composed model trained
                        in one place on the joined columns. The same math (the equivalence tests
                        hold them to it): the price of the split structure. Target: at most 1.1.
  vectorized / central  `vertical_sl(..., vectorize=True)`: the parties' legs as one `vmap` over
                        their stacked states (possible here: every party runs the same bottom on
                        inputs of one shape) instead of the loop. "meets" when the better of the
                        two fused steps is within the target.

Bytes: per sample, per party, per direction, from the step's static byte counts (float32 smashed
data up, its gradient down; msgpack framing included, so a little above 4 x 32 bytes).

The network (loopback gRPC) part of issue 11 is not measured here: vertical SL has no network
protocol yet.

Usage:
  .venv/bin/python experiments/benchmarks/vertical.py [--json] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

import sljax
from common import Run, chunk_steps, compare, emit, environment, interleave

TARGET = 1.1  # fused vertical / centralized, from the issue
PARTIES = (2, 4)
BATCH_SIZES = (64, 512)
COLUMNS = 16  # per party
NUM_BATCHES = 8


def _bottom():
  return sljax.sequential(*sljax.models.mlp(hidden=(64,), num_classes=32))


def _top():
  return sljax.sequential(*sljax.models.mlp(hidden=(64,), num_classes=2))


def _batches(parties: int, batch: int, *, seed: int):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(NUM_BATCHES):
    xs = tuple(rng.normal(size=(batch, COLUMNS)).astype(np.float32) for _ in range(parties))
    y = (xs[0][:, 0] + xs[-1][:, 1] > 0).astype(np.int32)
    out.append(jax.device_put((xs, y)))
  return jax.block_until_ready(out)


def _step_run(step: Callable, state, batches, keys) -> Run:
  def run(n: int) -> None:
    nonlocal state
    for i in range(n):
      state, _ = step(state, batches[i % len(batches)], keys[i % len(keys)])
    jax.block_until_ready(state)

  return run


def measure(parties: int, batch: int, *, rounds: int, chunk_seconds: float) -> dict:
  names = [f"p{i}" for i in range(parties)]
  model = sljax.vertical_model([_bottom() for _ in names], sljax.merges.concat(), _top(), names=names)
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-3), top_optimizer=optax.adam(1e-3))
  central = sljax.vertical_centralized(model, optimizer=optax.adam(1e-3))
  batches = _batches(parties, batch, seed=batch + parties)
  keys = list(jax.random.split(jax.random.key(1), NUM_BATCHES))
  xs0 = batches[0][0]
  sl_state = sl.init(jax.random.key(0), xs0)
  c_state = central.init(jax.random.key(0), xs0)
  vec = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-3), top_optimizer=optax.adam(1e-3), vectorize=True)
  fused = jax.jit(sl.step)
  runs = {
      "fused": _step_run(fused, sl_state, batches, keys),
      "centralized": _step_run(jax.jit(central.step), c_state, batches, keys),
      "vectorized": _step_run(jax.jit(vec.step), sl_state, batches, keys),
  }
  start = time.perf_counter()
  for run in runs.values():
    run(2)
  compile_seconds = time.perf_counter() - start
  steps = chunk_steps(runs, chunk_seconds=chunk_seconds)
  t = interleave(runs, rounds=rounds, steps=steps)
  fused_vs_central = compare(t["fused"], t["centralized"])
  vectorized_vs_central = compare(t["vectorized"], t["centralized"])
  _, metrics = jax.eval_shape(sl.step, sl_state, batches[0], keys[0])
  return {
      "parties": parties,
      "batch": batch,
      "fused_us": 1e6 * float(np.median(t["fused"])),
      "centralized_us": 1e6 * float(np.median(t["centralized"])),
      "vectorized_us": 1e6 * float(np.median(t["vectorized"])),
      "fused_steps_per_s": 1 / float(np.median(t["fused"])),
      "centralized_steps_per_s": 1 / float(np.median(t["centralized"])),
      "fused_over_centralized": fused_vs_central["ratio"],
      "fused_over_centralized_paired_iqr": [fused_vs_central["paired_q1"], fused_vs_central["paired_q3"]],
      "vectorized_over_centralized": vectorized_vs_central["ratio"],
      "vectorized_steps_per_s": 1 / float(np.median(t["vectorized"])),
      "meets_target": min(fused_vs_central["ratio"], vectorized_vs_central["ratio"]) <= TARGET,
      "bytes_per_sample": {name: {d: metrics[f"bytes_{d}_{name}"] / batch for d in ("up", "down")} for name in names},
      "steps_per_chunk": steps,
      "rounds": rounds,
      "compile_seconds": compile_seconds,
  }


def _print_table(result: dict) -> None:
  env = result["environment"]
  print(f"vertical step: MLP bottoms 16->64->32 per party, concat, top 64->2, Adam; jax {env['jax']} on "
        f"{env['devices']} {env['backend']} device(s), {env['cpus']} CPUs, load {env['load_1min']:.1f}")
  print(f"{'parties':>7} {'batch':>5} {'fused us':>9} {'central us':>10} {'fused/central':>13} {'[paired IQR]':>13} "
        f"{'vectorized/central':>18} {'steps/s fused':>13} {'B/sample/party up':>17} {'down':>6}  target <= {TARGET}")
  for r in result["rows"]:
    fc = r["fused_over_centralized_paired_iqr"]
    per_party = r["bytes_per_sample"]["p0"]
    print(f"{r['parties']:7d} {r['batch']:5d} {r['fused_us']:9.1f} {r['centralized_us']:10.1f} "
          f"{r['fused_over_centralized']:13.3f} {f'[{fc[0]:.2f}, {fc[1]:.2f}]':>13} "
          f"{r['vectorized_over_centralized']:18.3f} {r['fused_steps_per_s']:13.0f} {per_party['up']:17.2f} "
          f"{per_party['down']:6.2f}  {'meets' if r['meets_target'] else 'MISSES'}")
  print(f"medians per step over {result['rows'][0]['rounds']} interleaved rounds; ratios of medians, [paired IQR] "
        f"the quartiles of the per-round ratios. Every party sends the same bytes here (equal widths). "
        f"total {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per setup")
  parser.add_argument("--chunk-ms", type=float, default=60.0, help="about how long one timed chunk lasts")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  env = environment()
  rows = [measure(p, b, rounds=args.rounds, chunk_seconds=args.chunk_ms / 1e3) for p in PARTIES for b in BATCH_SIZES]
  result = {"benchmark": "vertical", "target": TARGET, "environment": env, "rows": rows,
            "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
