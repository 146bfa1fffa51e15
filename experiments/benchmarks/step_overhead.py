"""What splitting costs per training step, on the demo models and digits.

Two ratios per model and batch size, all variants timed side by side (see `common.py`):

  fused / centralized   `jax.jit(vanilla(...).step)`, the whole exchange as one program, over
                        `jax.jit(centralized(...).step)` on the composed model. Both do the same
                        math (the equivalence tests hold them to it), so this is the price of the
                        split structure itself. Target: at most 1.05.
  three-call / fused    `client_forward`, `server_step` and `client_backward` each jitted and
                        called one after another from Python, as a deployment runs them (minus the
                        network), over the fused step: the price of three dispatches and of the
                        cut activations, residuals and gradients leaving and re-entering XLA.

Batches are drawn from the digits training set and put on the device before timing, so no host
transfer is timed. Adam (1e-3) on every party. `--donate` donates the state to every jitted call
(both sides alike) to see whether buffer reuse changes the ratios.

On XLA:CPU, small programs are sensitive to how the runtime schedules their thunks: when more than
8 thunks are ready at once, half of them are handed to the intra-op thread pool, which costs a
cross-thread hand-off per step (tens of us on a loaded 2-core machine). A few extra scalar ops or
outputs can cross that line, so at the smallest sizes the ratios can reflect the scheduler rather
than the work; see README.md.

Usage:
  .venv/bin/python experiments/benchmarks/step_overhead.py [--json] [--donate] [--rounds N]
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

TARGET = 1.05  # fused split / centralized, from the issue

# (name, layers, cut, image): the models of `sljax demo`.
SETUPS = (
    ("MLP", lambda: sljax.models.mlp(hidden=(128, 128)), 1, False),
    ("CNN", lambda: sljax.models.cnn(), 2, True),
)
BATCH_SIZES = (32, 256)
NUM_BATCHES = 8  # distinct batches cycled through, all on the device before timing


def _device_batches(ds: sljax.data.Dataset, batch: int, *, seed: int) -> list[tuple[jax.Array, jax.Array]]:
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(NUM_BATCHES):
    idx = rng.choice(len(ds.x_train), batch, replace=False)
    batches.append(jax.device_put((ds.x_train[idx], ds.y_train[idx])))
  return jax.block_until_ready(batches)


def _step_run(step: Callable, state, batches, keys) -> Run:
  """A variant that runs a jitted `step(state, batch, key) -> (state, metrics)`."""

  def run(n: int) -> None:
    nonlocal state
    for i in range(n):
      state, _ = step(state, batches[i % len(batches)], keys[i % len(keys)])
    jax.block_until_ready(state)

  return run


def _three_call_run(sl: sljax.protocol.Vanilla, state: sljax.SplitState, batches, keys, *, donate: bool) -> Run:
  """A variant that runs the three legs as separate jitted calls, the way a deployment does."""
  client_forward = jax.jit(sl.client_forward)
  server_step = jax.jit(sl.server_step, donate_argnums=0 if donate else ())
  # Only the client state is donated: the pullback residuals in `pending` cannot alias any output.
  client_backward = jax.jit(sl.client_backward, donate_argnums=0 if donate else ())
  # The fused step splits its key into (client, server) the same way; done here outside the timing.
  key_pairs = [tuple(jax.random.split(k)) for k in keys]
  client, server = state.client, state.server

  def run(n: int) -> None:
    nonlocal client, server
    for i in range(n):
      x, labels = batches[i % len(batches)]
      k_client, k_server = key_pairs[i % len(key_pairs)]
      up, pending = client_forward(client, x, labels, k_client)
      server, down, _ = server_step(server, up, k_server)
      client = client_backward(client, pending, down)
    jax.block_until_ready((client, server))

  return run


def measure(name: str, model: sljax.SplitModel, ds: sljax.data.Dataset, batch: int, *, rounds: int,
            chunk_seconds: float, donate: bool) -> dict:
  """Times the three variants on one model and batch size; returns per-step medians and ratios."""
  donate_argnums = 0 if donate else ()
  sl = sljax.vanilla(model, client_optimizer=optax.adam(1e-3), server_optimizer=optax.adam(1e-3))
  central = sljax.centralized(model, optimizer=optax.adam(1e-3))
  batches = _device_batches(ds, batch, seed=batch)
  keys = list(jax.random.split(jax.random.key(1), NUM_BATCHES))
  init_key, x0 = jax.random.key(0), batches[0][0]
  runs = {
      "fused": _step_run(jax.jit(sl.step, donate_argnums=donate_argnums), sl.init(init_key, x0), batches, keys),
      "centralized": _step_run(jax.jit(central.step, donate_argnums=donate_argnums), central.init(init_key, x0),
                               batches, keys),
      "three_call": _three_call_run(sl, sl.init(init_key, x0), batches, keys, donate=donate),
  }
  start = time.perf_counter()
  for run in runs.values():
    run(2)  # compile and warm up
  compile_seconds = time.perf_counter() - start
  steps = chunk_steps(runs, chunk_seconds=chunk_seconds)
  t = interleave(runs, rounds=rounds, steps=steps)
  fused_vs_central = compare(t["fused"], t["centralized"])
  three_vs_fused = compare(t["three_call"], t["fused"])
  return {
      "model": name,
      "batch": batch,
      "fused_us": 1e6 * float(np.median(t["fused"])),
      "centralized_us": 1e6 * float(np.median(t["centralized"])),
      "three_call_us": 1e6 * float(np.median(t["three_call"])),
      "fused_over_centralized": fused_vs_central["ratio"],
      "fused_over_centralized_paired_iqr": [fused_vs_central["paired_q1"], fused_vs_central["paired_q3"]],
      "three_call_over_fused": three_vs_fused["ratio"],
      "three_call_over_fused_paired_iqr": [three_vs_fused["paired_q1"], three_vs_fused["paired_q3"]],
      "meets_target": fused_vs_central["ratio"] <= TARGET,
      "steps_per_chunk": steps,
      "rounds": rounds,
      "compile_seconds": compile_seconds,
  }


def _print_table(result: dict) -> None:
  env = result["environment"]
  print(f"step overhead: digits, Adam, jax {env['jax']} on {env['devices']} {env['backend']} device(s), "
        f"{env['cpus']} CPUs, load {env['load_1min']:.1f}; {'donated' if result['donate'] else 'no donation'}")
  print(f"{'model':5} {'batch':>5} {'fused us':>9} {'central us':>10} {'fused/central':>13} {'[paired IQR]':>13} "
        f"{'3-call us':>9} {'3-call/fused':>12} {'[paired IQR]':>13}  target <= {TARGET}")
  for r in result["rows"]:
    fc, tf = r["fused_over_centralized_paired_iqr"], r["three_call_over_fused_paired_iqr"]
    print(f"{r['model']:5} {r['batch']:5d} {r['fused_us']:9.1f} {r['centralized_us']:10.1f} "
          f"{r['fused_over_centralized']:13.3f} {f'[{fc[0]:.2f}, {fc[1]:.2f}]':>13} {r['three_call_us']:9.1f} "
          f"{r['three_call_over_fused']:12.2f} {f'[{tf[0]:.2f}, {tf[1]:.2f}]':>13}  "
          f"{'meets' if r['meets_target'] else 'MISSES'}")
  print(f"medians per step over {result['rows'][0]['rounds']} interleaved rounds; ratios are ratios of medians, "
        f"[paired IQR] the quartiles of the per-round ratios. total {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--donate", action="store_true", help="donate the state to every jitted step")
  parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per model and batch size")
  parser.add_argument("--chunk-ms", type=float, default=60.0, help="about how long one timed chunk lasts")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  env = environment()
  rows = []
  for name, layers, k, image in SETUPS:
    ds = sljax.data.load_digits(seed=0, image=image)
    for batch in BATCH_SIZES:
      rows.append(measure(name, sljax.cut(layers(), k), ds, batch, rounds=args.rounds,
                          chunk_seconds=args.chunk_ms / 1e3, donate=args.donate))
  result = {"benchmark": "step_overhead", "target": TARGET, "donate": args.donate, "environment": env, "rows": rows,
            "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
