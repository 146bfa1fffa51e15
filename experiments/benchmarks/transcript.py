"""What recording a transcript costs: `sljax.fit` epochs with and without `transcript=`.

Variants, timed side by side (see `common.py`), each a whole epoch of `sljax.fit` on digits with the
demo models (vanilla SL, Adam 1e-3), compiled before timing:

  plain       fit(...) as usual: the epoch is one jitted program, metrics to the host after it.
  recorded    fit(..., transcript=Recorder(path)): the same epoch returning every message too; the
              messages come to the host once per epoch and a writer thread serializes, checksums and
              writes them (bounded queue) while the next epoch runs.
  recorded+truth  also the trained batches ("truth" records, for scoring reconstruction attacks).

Reported: seconds per epoch (medians), recorded / plain, the bytes written per epoch and the write
rate. Each timed chunk waits for its recorder to be closed (every record on disk), so the time of
the writer is counted, not hidden behind the clock. Files go to a temporary directory.

With `--algorithms a,b,...`: multi-client simulations instead, `sljax.simulation.run` of each
algorithm of `sljax.algorithms.REGISTRY` named (the demo MLP (64 -> 128 | -> 128 -> 10; U-shaped cut
at 1 and 2; heterogeneous cuts 1 and 2 alternating), Adam 1e-3, `--clients` clients, 4 local steps of
32 rows, `--sim-rounds` rounds per run), plain and with `transcript=path`; reported per run and per
message: (recorded - plain) / the records written (each run's initial or final client halves too).

Usage:
  .venv/bin/python experiments/benchmarks/transcript.py [--json] [--rounds N] [--models mlp,cnn]
  .venv/bin/python experiments/benchmarks/transcript.py --algorithms parallel_sl,sequential_sl [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import numpy as np
import optax

import sljax
from common import compare, emit, environment, interleave
from sljax.privacy.transcript import Recorder


def _variants(name: str, directory: str, batch_size: int):
  ds = sljax.data.load_digits(image=name == "cnn")
  layers = sljax.models.mlp(hidden=(128, 128)) if name == "mlp" else sljax.models.cnn()
  sl = sljax.vanilla(sljax.cut(layers, 1), client_optimizer=optax.adam(1e-3), server_optimizer=optax.adam(1e-3))
  state0 = sl.init(jax.random.key(0), ds.x_train[:batch_size])
  counter = iter(range(10**9))
  sizes: dict[str, list[int]] = {"recorded": [], "recorded+truth": []}

  def make(variant: str):
    def run(n: int) -> None:
      for _ in range(n):
        if variant == "plain":
          state, _ = sljax.fit(sl, state0, ds.x_train, ds.y_train, key=jax.random.key(1), epochs=1,
                               batch_size=batch_size)
          jax.block_until_ready(state)
          continue
        path = os.path.join(directory, f"{next(counter)}.sljt")
        with Recorder(path, truth=variant == "recorded+truth") as rec:
          state, _ = sljax.fit(sl, state0, ds.x_train, ds.y_train, key=jax.random.key(1), epochs=1,
                               batch_size=batch_size, transcript=rec)
          jax.block_until_ready(state)
        sizes[variant].append(os.path.getsize(path))
        os.remove(path)

    return run

  runs = {v: make(v) for v in ("plain", "recorded", "recorded+truth")}
  for run in runs.values():
    run(1)  # compile
  return runs, sizes, len(ds.x_train) // batch_size


def _simulations(name: str, directory: str, *, clients: int, rounds: int):
  """`simulation.run` of algorithm `name`, plain and recorded; returns the runs and the records written per run."""
  from sljax.privacy import transcript
  from sljax.transport import schedule as sched

  ds = sljax.data.load_digits(image=False)
  opt = optax.adam(1e-3)
  layers = sljax.models.mlp(hidden=(128, 128))
  protocol = sljax.u_shaped if name.endswith("_u") else sljax.vanilla
  sl = protocol(sljax.cut(layers, *((1, 2) if name.endswith("_u") else (1,))), client_optimizer=opt,
                server_optimizer=opt)
  options = {"cuts": [1 + k % 2 for k in range(clients)]} if name == "heterogeneous_parallel_sl" else {}
  schedule = sched.Schedule(num_clients=clients, rounds=rounds, local_steps=4, batch_size=32)
  algo = sched.algorithm(name, sl, schedule, sljax.ArraySpec.of(ds.x_train), **options)
  data = sljax.data.stack_clients(ds.x_train, ds.y_train, sljax.data.iid(ds.y_train, num_clients=clients, seed=0))
  state0 = algo.init(jax.random.key(0), data)
  counter = iter(range(10**9))
  records: list[int] = []

  def make(variant: str):
    def run(n: int) -> None:
      for _ in range(n):
        if variant == "plain":
          jax.block_until_ready(sljax.simulation.run(algo, state0, data, rounds=rounds, donate=False)[0])
          continue
        path = os.path.join(directory, f"{next(counter)}.sljt")
        jax.block_until_ready(sljax.simulation.run(algo, state0, data, rounds=rounds, donate=False,
                                                   transcript=path)[0])  # the recorder is closed: all on disk
        if not records:  # counted once, untimed after the first (compiling) run
          records.append(sum(r.direction in ("up", "down") for r in transcript.read(path)))
        os.remove(path)

    return run

  runs = {v: make(v) for v in ("plain", "recorded")}
  for run in runs.values():
    run(1)  # compile
  return runs, records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--algorithms", default="", help="multi-client simulations of these algorithms instead")
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--sim-rounds", type=int, default=5)
  args = parser.parse_args(argv)
  rows = []
  if args.algorithms:
    with tempfile.TemporaryDirectory() as directory:
      for name in args.algorithms.split(","):
        runs, records = _simulations(name, directory, clients=args.clients, rounds=args.sim_rounds)
        times = interleave(runs, rounds=args.rounds, steps=1)
        plain, recorded = float(np.median(times["plain"])), float(np.median(times["recorded"]))
        count = records[0]
        rows.append({"algorithm": name, "clients": args.clients, "rounds_per_run": args.sim_rounds,
                     "plain_s_per_run": plain, "recorded_s_per_run": recorded, "messages_per_run": count,
                     "ms_per_message": 1e3 * (recorded - plain) / count,
                     **{f"overhead_{k}": v for k, v in compare(times["recorded"], times["plain"]).items()}})

    def sim_table(result):
      print(f"{'algorithm':26} {'plain s/run':>11} {'recorded s/run':>14} {'ratio':>6} {'messages':>8} "
            f"{'ms/message':>10}")
      for r in result["rows"]:
        print(f"{r['algorithm']:26} {r['plain_s_per_run']:11.4f} {r['recorded_s_per_run']:14.4f} "
              f"{r['overhead_ratio']:6.2f} {r['messages_per_run']:8d} {r['ms_per_message']:10.3f}")

    return emit({"rows": rows, "environment": environment()}, as_json=args.json, print_table=sim_table)
  with tempfile.TemporaryDirectory() as directory:
    for name in args.models.split(","):
      runs, sizes, steps = _variants(name, directory, args.batch_size)
      times = interleave(runs, rounds=args.rounds, steps=1)
      for variant in ("recorded", "recorded+truth"):
        written = float(np.median(sizes[variant]))
        rows.append({
            "model": name, "variant": variant, "steps_per_epoch": steps,
            "plain_s_per_epoch": float(np.median(times["plain"])),
            "recorded_s_per_epoch": float(np.median(times[variant])),
            **{f"overhead_{k}": v for k, v in compare(times[variant], times["plain"]).items()},
            "bytes_per_epoch": int(written),
            "write_mb_per_s": written / 1e6 / float(np.median(times[variant])),
        })

  def table(result):
    print(f"{'model':5} {'variant':15} {'plain s/epoch':>13} {'recorded s/epoch':>16} {'ratio':>6} "
          f"{'paired IQR':>13} {'MB/epoch':>9} {'MB/s':>7}")
    for r in result["rows"]:
      print(f"{r['model']:5} {r['variant']:15} {r['plain_s_per_epoch']:13.4f} {r['recorded_s_per_epoch']:16.4f} "
            f"{r['overhead_ratio']:6.2f} {r['overhead_paired_q1']:6.2f}-{r['overhead_paired_q3']:<6.2f} "
            f"{r['bytes_per_epoch'] / 1e6:9.2f} {r['write_mb_per_s']:7.1f}")

  return emit({"rows": rows, "environment": environment()}, as_json=args.json, print_table=table)


if __name__ == "__main__":
  sys.exit(main())
