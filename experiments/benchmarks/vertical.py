"""What vertical splitting costs per training step, and what each party sends per sample.

Per number of parties (2, 4) and batch size (64, 256, 1024), on synthetic tabular data (16 columns
per party), every party an MLP bottom (64 ReLU -> 32), a concat merge and an MLP top (64 ReLU -> 2),
Adam (1e-3) everywhere, all variants timed side by side (see `common.py`), each step run two ways:

  dispatched            one jitted call per step from a Python loop (a hand-written training loop);
                        the time also holds JAX's per-call work (flattening the state's pytree,
                        one buffer per leaf in and out), on this CPU more than the step itself at
                        batch 64.
  scanned               8 steps per jitted call under `lax.scan`, as `sljax.fit` runs an epoch: the
                        compiled program alone, per step.

  fused / centralized   `jax.jit(vertical_sl(...).step)`, every party's leg and the label
                        party's step as one program (a Python loop over the parties inside jit),
                        over `jax.jit(vertical_centralized(...).step)`, the composed model trained
                        in one place on the joined columns. The same math (the equivalence tests
                        hold them to it): the price of the split structure. Target: at most 1.1.
  vectorized / central  `vertical_sl(..., vectorize=True)`: the parties' legs as one `vmap` over
                        their stacked states (possible here: every party runs the same bottom on
                        inputs of one shape) instead of the loop.

fused/central is the median of the per-round (paired) ratios, with their quartiles; "meets" when
that of the fused step, scanned, is within the target; the dispatched ratios are printed next to it.

Bytes: per sample, per party, per direction, from the step's static byte counts (float32 smashed
data up, its gradient down; msgpack framing included, so a little above 4 x 32 bytes).

Over loopback gRPC (`sljax.transport.VerticalServer` in this process, each party a thread running
`run_party` over its own `GrpcTransport` to 127.0.0.1; the same model, every party a client, the
label party holding only the labels): steps per second of whole runs (`--grpc-rounds` epochs of
`--grpc-steps` steps, after a warm-up run that compiles), against the same runs over
`InProcessTransport` (the handler called directly, still on bytes); and bytes per sample per party
per direction on the wire (HTTP/2 and gRPC framing, the request and response maps, Forward and
Commit calls: counted by a TCP relay between each party and the server, `transport.CountingProxy`,
on the warm-up run, whose steps are timed apart), next to the payload (the SmashedData and
CutGradient messages alone).

Usage:
  .venv/bin/python experiments/benchmarks/vertical.py [--json] [--rounds N] [--grpc-rounds N] [--grpc-steps N]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

import sljax
from common import Run, chunk_steps, compare, emit, environment, interleave

TARGET = 1.1  # fused vertical / centralized, from the issue
PARTIES = (2, 4)
STEP_BATCH_SIZES = (64, 256, 1024)  # the step rows
BATCH_SIZES = (64, 512)  # the gRPC rows
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


def _scan_run(step: Callable, state, batches, keys) -> Run:
  """`len(batches)` steps per jitted call under `lax.scan` (as `sljax.fit` runs an epoch); `run(n)` with `n` a
  multiple of `len(batches)`."""
  stacked = jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *batches)
  keys = jax.numpy.stack(keys)
  steps = jax.jit(lambda state: jax.lax.scan(lambda s, inputs: step(s, *inputs), state, (stacked, keys)))

  def run(n: int) -> None:
    nonlocal state
    for _ in range(n // len(batches)):
      state, _ = steps(state)
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
      "fused_scanned": _scan_run(sl.step, sl_state, batches, keys),
      "centralized_scanned": _scan_run(central.step, c_state, batches, keys),
      "vectorized_scanned": _scan_run(vec.step, sl_state, batches, keys),
  }
  start = time.perf_counter()
  for run in runs.values():
    run(NUM_BATCHES)
  compile_seconds = time.perf_counter() - start
  steps = NUM_BATCHES * max(1, round(chunk_steps(runs, chunk_seconds=chunk_seconds) / NUM_BATCHES))
  t = interleave(runs, rounds=rounds, steps=steps)
  fused_vs_central = compare(t["fused"], t["centralized"])
  vectorized_vs_central = compare(t["vectorized"], t["centralized"])
  scanned = compare(t["fused_scanned"], t["centralized_scanned"])
  vectorized_scanned = compare(t["vectorized_scanned"], t["centralized_scanned"])
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
      "fused_over_centralized_paired_median": fused_vs_central["paired_median"],
      "vectorized_over_centralized": vectorized_vs_central["ratio"],
      "vectorized_steps_per_s": 1 / float(np.median(t["vectorized"])),
      "fused_scanned_us": 1e6 * float(np.median(t["fused_scanned"])),
      "centralized_scanned_us": 1e6 * float(np.median(t["centralized_scanned"])),
      "scanned_fused_over_centralized": scanned["ratio"],
      "scanned_fused_over_centralized_paired_iqr": [scanned["paired_q1"], scanned["paired_q3"]],
      "scanned_fused_over_centralized_paired_median": scanned["paired_median"],
      "scanned_vectorized_over_centralized": vectorized_scanned["ratio"],
      "meets_target": scanned["paired_median"] <= TARGET,
      "bytes_per_sample": {name: {d: metrics[f"bytes_{d}_{name}"] / batch for d in ("up", "down")} for name in names},
      "steps_per_chunk": steps,
      "rounds": rounds,
      "compile_seconds": compile_seconds,
  }


def _party_runs(sl, server, links: list, *, connected=lambda: None, timeout: float = 600.0) -> tuple[float, list]:
  """Every party's `run_party` in a thread over `links[p]`, once every party has connected (then
  `connected()` is called); the seconds from the first step to the last, and each party's history."""
  from sljax.transport import vertical  # noqa: PLC0415

  sessions = [vertical.connect_party(link, sl, party=sl.model.names[p], x=server.bench_columns[p])
              for p, link in enumerate(links)]
  histories: list = [None] * len(sessions)
  errors: list = []

  def one(p):
    try:
      histories[p] = vertical.run_party(sessions[p]).history
    except BaseException as e:  # noqa: BLE001 -- re-raised below
      errors.append(e)

  threads = [threading.Thread(target=one, args=(p,)) for p in range(len(sessions))]
  connected()
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)
  seconds = time.perf_counter() - start
  if errors:
    raise errors[0]
  return seconds, histories


def measure_grpc(parties: int, batch: int, *, rounds: int, steps: int) -> dict:
  """Vertical SL over loopback gRPC and over InProcessTransport: whole runs, steps per second; wire bytes."""
  from sljax import transport as T  # noqa: PLC0415
  from transport import CountingProxy  # noqa: PLC0415 -- experiments/benchmarks/transport.py

  names = [f"p{i}" for i in range(parties)]
  model = sljax.vertical_model([_bottom() for _ in names], sljax.merges.concat(), _top(), names=names)
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-3), top_optimizer=optax.adam(1e-3))
  rng = np.random.default_rng(batch + parties)
  n = batch * steps
  xs = tuple(rng.normal(size=(n, COLUMNS)).astype(np.float32) for _ in names)
  y = (xs[0][:, 0] + xs[-1][:, 1] > 0).astype(np.int32)
  tokens = {f"token-{p}": p for p in range(parties)}

  def server(rounds_: int):
    s = T.VerticalServer(sl, labels=y, input_specs=tuple(sljax.ArraySpec.of(x) for x in xs), key=jax.random.key(0),
                         rounds=rounds_, batch_size=batch, tokens=tokens, lease_seconds=600.0)
    s.bench_columns = xs
    return s

  # warm-up (compiles every leg), on the wire through counting relays: the bytes of every call
  warm = server(1)
  running = T.serve(warm.handle, address="127.0.0.1:0", max_workers=parties + 8)
  proxies = [CountingProxy(running.port) for _ in names]
  links = [T.GrpcTransport(f"127.0.0.1:{proxy.port}", token=f"token-{p}") for p, proxy in enumerate(proxies)]
  try:
    # the connections' bytes (handshake, the initial bottom) are left out: training only
    _, histories = _party_runs(sl, warm, links, connected=lambda: [proxy.reset() for proxy in proxies])
    wire = [(proxy.up, proxy.down) for proxy in proxies]
  finally:
    for link in links:
      link.close()
    running.stop()
    for proxy in proxies:
      proxy.close()
  rates = {}
  for kind in ("grpc", "in_process"):
    timed = server(rounds)
    running = T.serve(timed.handle, address="127.0.0.1:0", max_workers=parties + 8) if kind == "grpc" else None
    links = [T.GrpcTransport(f"127.0.0.1:{running.port}", token=f"token-{p}") if running else
             T.InProcessTransport(timed.handle, token=f"token-{p}") for p in range(parties)]
    try:
      seconds, _ = _party_runs(sl, timed, links)
    finally:
      if running:
        for link in links:
          link.close()
        running.stop()
    rates[kind] = rounds * steps / seconds
  samples = steps * batch  # of the warm-up run, one epoch
  return {
      "parties": parties,
      "batch": batch,
      "grpc_steps_per_s": rates["grpc"],
      "in_process_steps_per_s": rates["in_process"],
      "grpc_over_in_process_time": rates["in_process"] / rates["grpc"],
      "wire_bytes_per_sample": {name: {"up": w[0] / samples, "down": w[1] / samples} for name, w in zip(names, wire)},
      "payload_bytes_per_sample": {name: {d: sum(r[f"bytes_{d}"] for r in h) / samples for d in ("up", "down")}
                                   for name, h in zip(names, histories)},
      "steps": rounds * steps,
  }


def _print_table(result: dict) -> None:
  env = result["environment"]
  print(f"vertical step: MLP bottoms 16->64->32 per party, concat, top 64->2, Adam; jax {env['jax']} on "
        f"{env['devices']} {env['backend']} device(s), {env['cpus']} CPUs, load {env['load_1min']:.1f}")
  print(f"{'':13} {'scanned (as fit runs it)':^50} | {'dispatched (one call per step)':^50}")
  print(f"{'parties':>7} {'batch':>5} {'fused us':>9} {'central us':>10} {'fused/central':>13} {'[paired IQR]':>13} "
        f"{'vect./c.':>8} | {'fused us':>9} {'central us':>10} {'fused/central':>13} {'[paired IQR]':>13} "
        f"{'vect./c.':>8} | {'B/sample/party up':>17} {'down':>6}  target <= {TARGET}")
  for r in result["rows"]:
    sc, fc = r["scanned_fused_over_centralized_paired_iqr"], r["fused_over_centralized_paired_iqr"]
    per_party = r["bytes_per_sample"]["p0"]
    print(f"{r['parties']:7d} {r['batch']:5d} {r['fused_scanned_us']:9.1f} {r['centralized_scanned_us']:10.1f} "
          f"{r['scanned_fused_over_centralized_paired_median']:13.3f} {f'[{sc[0]:.2f}, {sc[1]:.2f}]':>13} "
          f"{r['scanned_vectorized_over_centralized']:8.3f} | {r['fused_us']:9.1f} {r['centralized_us']:10.1f} "
          f"{r['fused_over_centralized_paired_median']:13.3f} {f'[{fc[0]:.2f}, {fc[1]:.2f}]':>13} "
          f"{r['vectorized_over_centralized']:8.3f} | {per_party['up']:17.2f} {per_party['down']:6.2f}  "
          f"{'meets' if r['meets_target'] else 'MISSES'}")
  print(f"medians per step over {result['rows'][0]['rounds']} interleaved rounds; fused/central: the median of the "
        f"per-round (paired) ratios, [paired IQR] their quartiles; vect./c.: ratio of medians; meets: the scanned "
        f"fused step's paired median. Every party sends the same bytes here (equal widths). "
        f"total {result['seconds']:.0f} s")
  if not result.get("grpc_rows"):
    return
  print("\nover loopback gRPC (every party a thread with its own channel, the server in this process): whole runs")
  print(f"{'parties':>7} {'batch':>5} {'steps/s gRPC':>12} {'in-process':>10} {'gRPC/in-process time':>20} "
        f"{'wire B/sample/party up':>22} {'down':>6} {'payload up':>10} {'down':>6}")
  for r in result["grpc_rows"]:
    wire, payload = r["wire_bytes_per_sample"]["p0"], r["payload_bytes_per_sample"]["p0"]
    print(f"{r['parties']:7d} {r['batch']:5d} {r['grpc_steps_per_s']:12.1f} {r['in_process_steps_per_s']:10.1f} "
          f"{r['grpc_over_in_process_time']:20.2f} {wire['up']:22.1f} {wire['down']:6.1f} {payload['up']:10.1f} "
          f"{payload['down']:6.1f}")
  print(f"steps/s over {result['grpc_rows'][0]['steps']} steps per run; bytes of party p0 (every party sends the same)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per setup")
  parser.add_argument("--chunk-ms", type=float, default=60.0, help="about how long one timed chunk lasts")
  parser.add_argument("--grpc-rounds", type=int, default=3, help="epochs of each timed run over gRPC (0: none)")
  parser.add_argument("--grpc-steps", type=int, default=20, help="steps per epoch of the runs over gRPC")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  env = environment()
  rows = [measure(p, b, rounds=args.rounds, chunk_seconds=args.chunk_ms / 1e3)
          for p in PARTIES for b in STEP_BATCH_SIZES]
  grpc_rows = [measure_grpc(p, b, rounds=args.grpc_rounds, steps=args.grpc_steps)
               for p in PARTIES for b in BATCH_SIZES] if args.grpc_rounds else []
  result = {"benchmark": "vertical", "target": TARGET, "environment": env, "rows": rows, "grpc_rows": grpc_rows,
            "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
