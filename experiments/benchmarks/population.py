"""Population-scale simulation: per-round time and memory with M participants out of N clients.

`sljax.population.Population` runs each round on its M participants only: it gathers their data
from a host `ClientStore` (prefetched while the previous round runs) and their per-client state
from a host store, runs the algorithm's jitted round on M clients, and writes their state back.
So a round should cost what M clients cost, whatever N. This benchmark measures that, for

  parallel_sl   `sljax.algorithms.parallel_sl` (a client half per client: kept in the host store)
  splitfed_v1   `sljax.algorithms.splitfed(version=1)` (client halves averaged every round)
  fedavg        `sljax.algorithms.fedavg` (the whole model, averaged every round)

with M = 64 participants (batch 8, 2 local steps) out of N = 64, 10^3, 10^4, 10^5 clients (and
10^6 for SplitFed v1 and FedAvg, which keep nothing per client with plain SGD), on
`sljax.data.federated_synthetic` populations (32 features, 10 classes, sizes from the capped power
law of `power_law_sizes`: 2 to 64 samples, exponent 1, label skew Dir(0.5)), with the MLP
`cut(models.mlp(hidden=(64, 64)), 1)` and SGD(0.1) on every party. Side by side:

  population/N  `Population(algorithm built for M, store)`: a round on the M participants.
  masked/N      the same algorithm built for all N clients with participation M/N, the data of
                all N clients stacked on the device (padded to the largest): today's formulation,
                which computes all N clients and masks the absent ones. Run where it fits in time
                (`--masked-ns`).

Timing (see `common.py`): every variant of an algorithm is built and its first round compiled
(the programs of the population variants are the same for every N: a temporary persistent
compilation cache spares compiling them again), then `--early` rounds are timed one by one
(`early ms`, their median: what the first rounds cost), then chunks of `--rounds-per-chunk`
rounds of the population variants run interleaved, the order rotated from chunk to chunk; a chunk
blocks until the device is done. Per-round medians of the chunks (`round ms`), and the ratio of
each N's median to N = 64's with the quartiles of the paired ratios (target: N = 10^5 within 1.2x
of N = 64). The masked variants, 10 to 1000 times slower at large N, are timed after them, round
by round (their 3 early rounds and 4 more; `round ms` is the median of those 7, and their ratio to
population/64 is a ratio of medians, unpaired).

Memory, per variant, measured while the variant is built and its early rounds run (the others idle):
`device`: the largest sum of `nbytes` over `jax.live_arrays()` after a round, above what was live
before the variant existed (its state on the device, and the next round's prefetched data);
`device.memory_stats()` where the backend has it (not on CPU); `store`: the bytes of the client
data store on the host; `state`: the bytes of the host per-client state store that the rounds
touched (rows written; the rest are untouched zero pages); `rss`: the growth of the process's RSS
over building the variant and its early rounds (compilation included).

FedJAX (`--fedjax-python PATH`, a Python with `fedjax` installed, in its own virtual environment):
`fedjax_fedavg.py` runs FedJAX's FedAvg in a subprocess on the same store (saved to disk), the same
MLP (Haiku), batch, local steps and SGD, M clients per round, and reports client updates/s (a
participant's local training per second: M / seconds per round) next to sljax's FedAvg
(target: sljax >= 5x).

Usage:
  .venv/bin/python experiments/benchmarks/population.py [--quick] [--json] [--fedjax-python PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
from common import compare, emit, environment, interleave, quartiles, rss_bytes

import sljax
from sljax.population import ClientStore, Population

M, BATCH, LOCAL_STEPS, FEATURES, CLASSES, HIDDEN, LR = 64, 8, 2, 32, 10, (64, 64), 0.1
ALGORITHMS = ("parallel_sl", "splitfed_v1", "fedavg")
NS = {"parallel_sl": (64, 1_000, 10_000, 100_000), "splitfed_v1": (64, 1_000, 10_000, 100_000, 1_000_000),
      "fedavg": (64, 1_000, 10_000, 100_000, 1_000_000)}
QUICK_NS = (64, 1_000, 100_000)
MASKED_NS, QUICK_MASKED_NS = (64, 1_000, 10_000), (64, 1_000)
HERE = os.path.dirname(os.path.abspath(__file__))


def make_algorithm(name: str, config: sljax.algorithms.ScheduleConfig):
  model = sljax.cut(sljax.models.mlp(hidden=HIDDEN, num_classes=CLASSES), 1)
  if name == "fedavg":
    return sljax.algorithms.fedavg(sljax.centralized(model, optimizer=optax.sgd(LR)), config)
  sl = sljax.vanilla(model, client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(LR))
  if name == "parallel_sl":
    return sljax.algorithms.parallel_sl(sl, config)
  return sljax.algorithms.splitfed(sl, config, version=1)


def make_store(n: int) -> ClientStore:
  return sljax.data.federated_synthetic(num_clients=n, num_features=FEATURES, num_classes=CLASSES, seed=0)


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def memory_stats() -> dict | None:
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else {k: int(v) for k, v in stats.items() if k in ("bytes_in_use", "peak_bytes_in_use")}


class Variant:
  """One algorithm over one population, either formulation: `run(n)` does n rounds and blocks."""

  def __init__(self, algorithm: str, n: int, store: ClientStore, *, masked: bool, early: int, prefetch: bool = True):
    gc.collect()
    base_live, base_rss = live_bytes(), rss_bytes()
    config = sljax.algorithms.ScheduleConfig(num_clients=M, batch_size=BATCH, local_steps=LOCAL_STEPS)
    self.masked, self.population = masked, None
    if masked:
      algo = make_algorithm(algorithm, config if n == M else
                            sljax.algorithms.ScheduleConfig(num_clients=n, batch_size=BATCH, local_steps=LOCAL_STEPS,
                                                            participation=M / n))
      self.data = jax.device_put(store.gather(np.arange(n)))
      self.state = algo.init(jax.random.key(0), self.data)
      round_ = jax.jit(algo.round, donate_argnums=0)
      self._step = lambda state: round_(state, self.data)[0]
      self._block = lambda: jax.block_until_ready(self.state)
    else:
      self.population = Population(make_algorithm(algorithm, config), store, prefetch=prefetch)
      self.state = self.population.init(jax.random.key(0))
      self._step = lambda state: self.population.round(state)[0]
      self._block = lambda: jax.block_until_ready(self.state.sim)
    start = time.perf_counter()
    self.run(1)  # compiles
    self.compile_seconds = time.perf_counter() - start
    peak, self.early = live_bytes() - base_live, []
    for _ in range(early):
      start = time.perf_counter()
      self.run(1)
      self.early.append(time.perf_counter() - start)
      peak = max(peak, live_bytes() - base_live)
    self.device_bytes, self.rss_growth = peak, rss_bytes() - base_rss
    self.memory_stats = memory_stats()
    self.store_bytes = 0 if masked else store.x.nbytes + store.y.nbytes + store.offsets.nbytes
    self.state_bytes = self._touched_state_bytes()

  def _touched_state_bytes(self) -> int:
    if self.population is None:
      return 0
    seen = int(self.state.seen.sum())
    return sum(seen * a[0].nbytes for a in self.state.store)

  def run(self, rounds: int) -> None:
    for _ in range(rounds):
      self.state = self._step(self.state)
    self._block()

  def close(self) -> None:
    if self.population is not None:
      self.population.close()


def common_time(run) -> float:
  start = time.perf_counter()
  run(1)
  return time.perf_counter() - start


def measure(algorithm: str, stores: dict, ns, masked_ns, *, rounds: int, rounds_per_chunk: int, early: int,
            masked_rounds: int, prefetch: bool) -> dict:
  variants = {}
  for n in ns:
    variants[f"population/{n}"] = Variant(algorithm, n, stores[n], masked=False, early=early, prefetch=prefetch)
  for n in masked_ns:
    variants[f"masked/{n}"] = Variant(algorithm, n, stores[n], masked=True, early=min(early, 3))
  # the population variants interleaved; the masked ones (10 to 1000x slower at large N, and hard on the caches
  # of whatever runs next) after them, one round at a time
  population = {name: v.run for name, v in variants.items() if not v.masked}
  times = interleave(population, rounds=rounds, steps=rounds_per_chunk)
  for name, v in variants.items():
    if v.masked:
      times[name] = np.array(v.early + [common_time(v.run) for _ in range(masked_rounds)])
  out = {}
  base = times[f"population/{ns[0]}"]
  for name, v in variants.items():
    kind, n = name.split("/")
    q1, q2, q3 = quartiles(times[name])
    out[name] = {"kind": kind, "n": int(n), "round_ms": 1e3 * q2, "round_ms_q1": 1e3 * q1, "round_ms_q3": 1e3 * q3,
                 "client_updates_per_s": M / q2,
                 "vs_population_64": compare(times[name], base) if kind == "population" else
                 {"ratio": q2 / float(np.median(base)), "paired_q1": float("nan"), "paired_q3": float("nan")},
                 "device_bytes": v.device_bytes, "memory_stats": v.memory_stats, "store_bytes": v.store_bytes,
                 "state_bytes_touched": v.state_bytes, "rss_growth_bytes": v.rss_growth,
                 "compile_seconds": v.compile_seconds, "early_round_ms": [1e3 * t for t in v.early],
                 "early_round_ms_median": 1e3 * float(np.median(v.early)),
                 "max_count": int(stores[int(n)].max_count)}
    v.close()
  return out


def run_fedjax(python: str, store: ClientStore, *, rounds: int, warmup: int) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    store.save(directory)
    command = [python, "-W", "ignore", os.path.join(HERE, "fedjax_fedavg.py"), "--store", directory, "--clients",
               str(M), "--batch-size", str(BATCH), "--local-steps", str(LOCAL_STEPS), "--learning-rate", str(LR),
               "--hidden", ",".join(map(str, HIDDEN)), "--num-classes", str(CLASSES), "--rounds", str(rounds),
               "--warmup", str(warmup)]
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
      return {"error": f"{type(e).__name__}: {e}"}
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if not lines:
    return {"error": f"exit code {done.returncode}, no result; stderr: {done.stderr[-2000:]}"}
  result = json.loads(lines[-1])
  if "round_seconds" in result:
    seconds = float(np.median(result["round_seconds"]))
    result.update(round_ms=1e3 * seconds, client_updates_per_s=M / seconds)
  return result


def _print_table(result: dict) -> None:
  print(f"M = {M} participants per round, batch {BATCH}, {LOCAL_STEPS} local steps, MLP {FEATURES}->"
        f"{'->'.join(map(str, HIDDEN))}->{CLASSES} cut after layer 1, SGD({LR}); load at start "
        f"{result['environment']['load_1min']:.1f}")
  header = (f"{'algorithm':12} {'variant':10} {'N':>9} {'max n':>5} {'early ms':>8} {'round ms':>9} {'[IQR]':>15} "
            f"{'vs N=64':>8} {'[paired IQR]':>14} {'upd/s':>7} {'device MB':>9} {'store MB':>8} {'state MB':>8} "
            f"{'RSS+ MB':>8}")
  print(header)
  for algorithm, rows in result["algorithms"].items():
    for row in rows.values():
      c = row["vs_population_64"]
      print(f"{algorithm:12} {row['kind']:10} {row['n']:>9} {row['max_count']:>5} {row['early_round_ms_median']:8.1f} "
            f"{row['round_ms']:9.1f} "
            f"[{row['round_ms_q1']:6.1f}, {row['round_ms_q3']:6.1f}] {c['ratio']:8.2f} "
            f"[{c['paired_q1']:.2f}, {c['paired_q3']:.2f}] {row['client_updates_per_s']:7.0f} "
            f"{row['device_bytes'] / 1e6:9.2f} {row['store_bytes'] / 1e6:8.1f} {row['state_bytes_touched'] / 1e6:8.2f} "
            f"{row['rss_growth_bytes'] / 1e6:8.1f}")
  print()
  for line in result["checks"]:
    print(line)
  fj = result.get("fedjax")
  if fj is not None:
    if "error" in fj:
      print(f"FedJAX: did not run: {fj['error']}")
    else:
      print(f"FedJAX FedAvg (fedjax {fj['versions']['fedjax']}, jax {fj['versions']['jax']}) "
            f"at N = {fj['num_clients']}: "
            f"{fj['round_ms']:.1f} ms per round, {fj['client_updates_per_s']:.0f} client updates/s")


def _checks(result: dict) -> list[str]:
  lines = []
  for algorithm, rows in result["algorithms"].items():
    pops = {row["n"]: row for row in rows.values() if row["kind"] == "population"}
    if 100_000 in pops:
      ratio = pops[100_000]["vs_population_64"]["ratio"]
      verdict = "met" if ratio <= 1.2 else "missed"
      lines.append(f"{algorithm}: round at N=10^5 / N=64 = {ratio:.2f} (target <= 1.2: {verdict})")
    device = [row["device_bytes"] for row in pops.values()]
    lines.append(f"{algorithm}: device bytes over N = {sorted(pops)}: "
                 f"{min(device) / 1e6:.2f} to {max(device) / 1e6:.2f} MB")
  fj = result.get("fedjax")
  if fj is not None and "client_updates_per_s" in fj:
    ours = result["algorithms"]["fedavg"].get(f"population/{fj['num_clients']}")
    if ours is not None:
      ratio = ours["client_updates_per_s"] / fj["client_updates_per_s"]
      result["fedjax_ratio"] = ratio
      lines.append(f"fedavg: sljax / FedJAX client updates/s at N={fj['num_clients']} = {ratio:.1f} "
                   f"(target >= 5: {'met' if ratio >= 5 else 'missed'})")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"N in {QUICK_NS}, masked at {QUICK_MASKED_NS}, fewer rounds")
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of tables")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  parser.add_argument("--ns", type=lambda s: tuple(int(n) for n in s.split(",")),
                      help="populations N (first: the base)")
  parser.add_argument("--masked-ns", type=lambda s: tuple(int(n) for n in s.split(",") if n),
                      help="N at which to run the masked formulation too")
  parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (chunks per variant)")
  parser.add_argument("--rounds-per-chunk", type=int, default=5, help="population rounds per timed chunk")
  parser.add_argument("--early", type=int, default=None,
                      help="rounds timed one by one right after the compiling one (20; --quick 10)")
  parser.add_argument("--no-prefetch", action="store_true", help="Population(prefetch=False)")
  parser.add_argument("--fedjax-python", help="a Python with fedjax installed (its own venv): run FedJAX's FedAvg")
  parser.add_argument("--fedjax-n", type=int, default=None, help="the population FedJAX runs on (10^4; --quick 10^3)")
  parser.add_argument("--fedjax-rounds", type=int, default=None)
  args = parser.parse_args(argv)
  rounds = args.rounds or (9 if args.quick else 21)
  masked_ns = args.masked_ns if args.masked_ns is not None else (QUICK_MASKED_NS if args.quick else MASKED_NS)
  algorithms = [a for a in args.algorithms.split(",") if a]
  fedjax_n = args.fedjax_n or (1_000 if args.quick else 10_000)
  ns_of = {a: args.ns or (QUICK_NS if args.quick else NS[a]) for a in algorithms}
  result = {"environment": environment(), "prefetch": not args.no_prefetch, "m": M, "batch_size": BATCH,
            "local_steps": LOCAL_STEPS,
            "features": FEATURES, "hidden": list(HIDDEN), "algorithms": {}, "store_build_seconds": {}}
  start = time.perf_counter()
  cache = tempfile.TemporaryDirectory()  # the same round program at every N: compiled once
  jax.config.update("jax_compilation_cache_dir", cache.name)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  stores = {}
  needed = sorted({n for ns in ns_of.values() for n in ns} | set(masked_ns)
                  | ({fedjax_n} if args.fedjax_python else set()))
  for n in needed:
    t = time.perf_counter()
    stores[n] = make_store(n)
    result["store_build_seconds"][n] = time.perf_counter() - t
  for algorithm in algorithms:
    result["algorithms"][algorithm] = measure(algorithm, stores, ns_of[algorithm], [n for n in masked_ns],
                                              rounds=rounds, rounds_per_chunk=args.rounds_per_chunk,
                                              early=args.early or (10 if args.quick else 20),
                                              masked_rounds=2 if args.quick else 4, prefetch=not args.no_prefetch)
    gc.collect()
  if args.fedjax_python:
    result["fedjax"] = run_fedjax(args.fedjax_python, stores[fedjax_n], rounds=args.fedjax_rounds or
                                  (5 if args.quick else 10), warmup=2)
  result["checks"] = _checks(result)
  result["seconds"] = time.perf_counter() - start
  result["rss_end_bytes"] = rss_bytes()
  cache.cleanup()
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
