"""Simulated wall time and idle time of the multi-client algorithms under named device profiles.

SIMULATED, NOT MEASURED. Nothing here times anything: `sljax.network` turns the FLOPs of the real
step functions (XLA's cost analysis) and the exact bytes of their messages (`wire_size`) into
seconds, with the assumptions listed in `sljax/network.py` and the preset profiles there
(microcontroller on BLE, phone on LTE, hospital on fibre; a data-centre GPU server). The figures
are as good as those assumptions: use them to compare schedules, not to promise a run time.

For the digits MLP (`cut(mlp(hidden=(128, 128)), 1)`) and CNN (`cut(cnn(), 2)`), batch 32 per
client, K in {4, 16}, `--local-steps` steps per round, every client taking part, it reports per
algorithm (sequential SL, parallel SL, SplitFed v1/v2, local-loss SL, FedAvg):

  s/round     simulated seconds per round
  s/epoch     per pass over the 1,438 digits training examples (a round consumes K x steps x 32)
  srv busy    the server's seconds computing per round, and the fraction of the round it waits
  cli idle    mean (and max) fraction of the round a client waits: for the server, for the other
              clients, for the network's latency, or for the round to end
  compute/comm  a client's seconds computing and transmitting per round (mean)

Usage:
  .venv/bin/python experiments/benchmarks/clock.py [--json] [--local-steps 4] [--scenarios phone_lte,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax.numpy as jnp

import sljax
from common import emit, environment
from sljax import network

NOTE = ("SIMULATED: a model of compute and network time (XLA FLOP counts of the step functions, exact message "
        "bytes, the preset device profiles in sljax/network.py), not a measurement")

BATCH = 32
KS = (4, 16)
# (name, layers, cut, image)
MODELS = (
    ("MLP", lambda: sljax.models.mlp(hidden=(128, 128)), 1, False),
    ("CNN", lambda: sljax.models.cnn(), 2, True),
)


def _homogeneous(profile):
  return lambda k: [profile] * k


def _one_straggler(profile, *, slowdown, delay_s):
  return lambda k: [profile] * (k - 1) + [profile.straggling(slowdown=slowdown, delay_s=delay_s)]


# name -> (description, clients(K), server)
SCENARIOS = {
    "microcontroller_ble": ("microcontrollers on BLE", _homogeneous(network.MICROCONTROLLER_BLE), network.GPU_SERVER),
    "microcontroller_lora": ("microcontrollers on LoRa", _homogeneous(network.MICROCONTROLLER_LORA),
                             network.GPU_SERVER),
    "phone_lte": ("phones on LTE", _homogeneous(network.PHONE_LTE), network.GPU_SERVER),
    "phone_lte_straggler": ("phones on LTE, the last one 4x slower and +0.25 s per step",
                            _one_straggler(network.PHONE_LTE, slowdown=4.0, delay_s=0.25), network.GPU_SERVER),
    "hospital_fibre": ("hospitals on 1 Gbit/s fibre", _homogeneous(network.HOSPITAL_FIBRE), network.GPU_SERVER),
}
DEFAULT_SCENARIOS = ("microcontroller_ble", "phone_lte", "phone_lte_straggler", "hospital_fibre")


def run(*, local_steps: int, scenarios: list[str]) -> dict:
  costs, rows = {}, []
  for name, layers, cut, image in MODELS:
    ds = sljax.data.load_digits(seed=0, image=image)
    n_train = int(ds.x_train.shape[0])
    c = network.step_costs(sljax.cut(layers(), cut), example_x=jnp.asarray(ds.x_train[:1]), batch_size=BATCH)
    costs[name] = c._asdict()
    for k in KS:
      for scenario in scenarios:
        _, clients, server = SCENARIOS[scenario]
        for row in network.compare(c, clients=clients(k), server=server, local_steps=local_steps):
          rows.append({"model": name, "clients": k, "scenario": scenario, **row,
                       "epoch_s": row["wall_s"] * n_train / row["examples"]})
  return {"costs": costs, "rows": rows, "train_examples": n_train}


def _seconds(s: float) -> str:
  """Seconds with a unit that keeps 3-4 significant digits readable."""
  if s < 1e-3:
    return f"{s * 1e6:.0f}us"
  if s < 1:
    return f"{s * 1e3:.1f}ms"
  if s < 600:
    return f"{s:.2f}s"
  if s < 36000:
    return f"{s / 60:.1f}min"
  return f"{s / 3600:.1f}h"


def _print_table(result: dict) -> None:
  print(f"# {NOTE}.")
  print(f"# digits, batch {BATCH} per client, {result['local_steps']} local steps per round, every client taking "
        f"part; server: gpu_server ({network.GPU_SERVER.flops_per_s:.0e} FLOP/s, 10 Gbit/s).")
  for name, c in result["costs"].items():
    print(f"# {name}: client fwd {c['client_forward_flops'] / 1e6:.2f} MFLOP, "
          f"bwd {c['client_backward_flops'] / 1e6:.2f}, server step {c['server_step_flops'] / 1e6:.2f}, "
          f"local-loss client step {c['local_loss_step_flops'] / 1e6:.2f}, "
          f"whole-model step {c['model_step_flops'] / 1e6:.2f} MFLOP; "
          f"smashed {c['smashed_bytes'] / 1e3:.1f} kB, cut grad {c['cut_gradient_bytes'] / 1e3:.1f} kB, "
          f"client half {c['client_weights_bytes'] / 1e3:.1f} kB, whole model {c['model_weights_bytes'] / 1e3:.1f} kB")
  for scenario in result["scenarios"]:
    print(f"# {scenario}: {SCENARIOS[scenario][0]}")
  header = (f"{'model':5} {'K':>3} {'scenario':20} {'algorithm':14} {'s/round':>9} {'s/epoch':>9} {'srv busy':>9} "
            f"{'srv idle':>8} {'cli idle':>8} {'(max)':>6} {'compute':>9} {'comm':>9} {'up/round':>9}")
  print(header)
  previous = None
  for r in result["rows"]:
    group = (r["model"], r["clients"], r["scenario"])
    if previous is not None and group != previous:
      print()
    previous = group
    print(f"{r['model']:5} {r['clients']:3d} {r['scenario']:20} {r['algorithm']:14} {_seconds(r['wall_s']):>9} "
          f"{_seconds(r['epoch_s']):>9} {_seconds(r['server_busy_s']):>9} {r['server_idle_fraction']:8.2%} "
          f"{r['mean_client_idle_fraction']:8.1%} {r['max_client_idle_fraction']:6.0%} "
          f"{_seconds(r['mean_client_compute_s']):>9} {_seconds(r['mean_client_comm_s']):>9} "
          f"{r['bytes_up_per_client'] / 1e3:7.0f}kB")
  print(f"# {NOTE}. total {result['seconds']:.1f} s (FLOP counting only)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--local-steps", type=int, default=4, help="steps per round (default 4)")
  parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                      help=f"comma-separated, from {','.join(SCENARIOS)}")
  args = parser.parse_args(argv)
  scenarios = [s for s in args.scenarios.split(",") if s]
  unknown = sorted(set(scenarios) - set(SCENARIOS))
  if unknown:
    parser.error(f"--scenarios: unknown {unknown}; expected some of {list(SCENARIOS)}")
  start = time.perf_counter()
  result = {"benchmark": "clock", "note": NOTE, "batch_size": BATCH, "local_steps": args.local_steps,
            "scenarios": scenarios, "environment": environment(),
            "profiles": {name: dataclasses.asdict(p) for name, p in network.PRESETS.items()},
            **run(local_steps=args.local_steps, scenarios=scenarios)}
  result["seconds"] = time.perf_counter() - start
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
