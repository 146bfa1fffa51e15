"""How the multi-client algorithms scale with the number of clients K, against Python loops.

The digits MLP cut after its first layer (client 64->128 ReLU, server 128->128 ReLU->10), Adam
(1e-3) on every party, batch 32 per client. Every variant runs the same rounds of `local_steps`
steps (more steps per round at small K, so that one timed call does enough work), and reports
samples/s = K * 32 * local_steps / seconds per round. The variants, timed side by side (see
`common.py`):

  parallel_sl/<executor>  `sljax.algorithms.parallel_sl`, the jitted round, under `vmap()`,
  splitfed_v1/<executor>  `chunked_vmap(min(K, 64))` and `lax_map()`; and SplitFed v1.
  parallel_sl/server_chunk  `parallel_sl(server_chunk=min(K, 256))`: each step runs 256 clients
                          at a time through client, server and back, summing the server gradient
                          and writing the clients' new state in place: the memory-bounded round.
  centralized             `centralized_baseline`: one step on the K*32 samples of a step pooled.
                          All jitted rounds donate their state, as `sljax.simulation.run` does.
  jax_loop                a Python loop over clients of jitted legs, with parallel-SL semantics:
                          `jit(client_forward)` per client, ONE `jit(server_step)` on all clients'
                          smashed data concatenated (each client's gradient slice scaled by K, the
                          gradient of its own mean loss, as parallel_sl sends), `jit(client_backward)`
                          per client. Compared with parallel_sl/vmap.
  jax_loop_fused          how FedJAX runs clients by default: a Python loop calling one jitted
                          per-client `jit(vanilla(...).step)`, each client with its own copy of the
                          server half, then a jitted FedAvg accumulation per client at the end of
                          the round: SplitFed v1 semantics. Compared with splitfed_v1/vmap.
  torch_loop              PyTorch written the way public split-learning code is: a loop over
                          clients, each with its own nn.Module and Adam; `smashed.detach()
                          .requires_grad_()` at the cut; one server module and Adam updated once
                          per step on all clients' smashed data concatenated; each client then
                          backpropagates its gradient slice (times K, as above) and steps its own
                          optimizer. `torch.set_num_threads(2)`. Compared with parallel_sl/vmap.
  torch_loop_1thread      the same with one thread. The JAX / PyTorch ratio with a target is taken
                          against the faster of the two in each round. Both run with
                          OMP_WAIT_POLICY=PASSIVE (unless set): with OpenMP's default spinning,
                          torch_loop on a loaded 2-core machine ran 10-90x slower (50 s a round at
                          K=4096); passive waiting bounds that, but costs torch_loop a wake-up per
                          parallel op, so on a quiet machine it is ~3x slower than one thread.

The jitted rounds draw each client's batch inside the program (`client_batches`); the loops get
a few batches drawn the same way beforehand and already on the device, so they are not charged
for sampling.

Memory: for the largest K, fresh subprocesses each compile one round, reset the peak RSS (after
handing freed memory back to the OS), build the state, run two rounds, and report the peak RSS
above that baseline, against the bytes of the state itself: K x one client's params, optimizer
state and model state, plus the server's (K copies of it in SplitFed v1). Next to it, XLA's own
plan for the round (`compiled.memory_analysis()`): arguments + outputs not aliased to a donated
argument + temporaries. The data is built before the baseline, so it is not counted in the RSS.

Usage:
  .venv/bin/python experiments/benchmarks/clients.py [--quick] [--ks 1,8,64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

# Before torch loads OpenMP: its idle threads then sleep instead of spinning. With the default
# policy, on 2 cores shared with other jobs, torch with 2 threads ran 10-90x slower than with
# one (each small op waits at a barrier for a thread that is spinning or descheduled).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
  Run,
  compare,
  emit,
  environment,
  interleave,
  peak_rss_bytes,
  plan_chunks,
  reset_peak_rss,
  rss_bytes,
  time_chunk,
)

import sljax

KS = (1, 8, 64, 512, 4096)
QUICK_KS = (1, 8, 64)
BATCH = 32
LR = 1e-3
STEP_SAMPLES = 256 * BATCH  # local_steps = max(1, 256 // K): a round holds >= 8192 samples
NUM_BATCHES = 4  # distinct pre-drawn batches per client that the loops cycle through
LAX_MAP_MAX_K = 512  # lax_map above this K is left out to bound the run (--lax-map-max-k)
MEMORY_VARIANTS = (  # (algorithm, executor, donate) at the largest K; simulation.run donates by default
    ("parallel_sl", "vmap", True),
    ("parallel_sl", "vmap", False),
    ("parallel_sl", "chunked_vmap", True),
    ("parallel_sl", "server_chunk", True),
    ("splitfed_v1", "vmap", True),
)
SERVER_CHUNK = 256  # clients per chunk of parallel_sl(server_chunk=...): the memory-bounded round
TARGETS = {
    "parallel_sl_over_centralized": (0.8, "at K=512"),
    "jax_over_torch": (5.0, "at K>=64"),
    "jax_over_jax_loop": (8.0, "at K>=64"),
    "peak_over_state": (1.5, "at K=4096"),
}


def local_steps(k: int) -> int:
  return max(1, STEP_SAMPLES // (BATCH * k))


def model() -> sljax.SplitModel:
  return sljax.cut(sljax.models.mlp(hidden=(128, 128)), 1)


def client_data(k: int) -> sljax.data.ClientData:
  """Digits (flat) split IID over k clients; tiled first when k clients would hold < BATCH each."""
  ds = sljax.data.load_digits(seed=0, image=False)
  reps = -(-BATCH * k // len(ds.x_train))
  x, y = np.tile(ds.x_train, (reps, 1)), np.tile(ds.y_train, reps)
  return sljax.data.stack_clients(x, y, sljax.data.iid(y, num_clients=k, seed=0))


def executor(name: str, k: int) -> sljax.execution.Executor:
  ex = sljax.execution
  return {"vmap": ex.vmap, "chunked_vmap": lambda: ex.chunked_vmap(min(k, 64)), "lax_map": ex.lax_map,
          "server_chunk": ex.vmap}[name]()


def _server_chunk(executor_name: str, k: int) -> int | None:
  """`parallel_sl(server_chunk=...)` of the "server_chunk" variant: whole chunks of SERVER_CHUNK clients."""
  return min(k, SERVER_CHUNK) if executor_name == "server_chunk" else None


def algorithm(name: str, k: int, executor_name: str = "vmap") -> sljax.algorithms.Algorithm:
  config = sljax.algorithms.ScheduleConfig(num_clients=k, batch_size=BATCH, local_steps=local_steps(k),
                                           executor=executor(executor_name, k))
  if name == "centralized":
    return sljax.algorithms.centralized_baseline(sljax.centralized(model(), optimizer=optax.adam(LR)), config)
  sl = sljax.vanilla(model(), client_optimizer=optax.adam(LR), server_optimizer=optax.adam(LR))
  if name == "parallel_sl":
    return sljax.algorithms.parallel_sl(sl, config, server_chunk=_server_chunk(executor_name, k))
  return sljax.algorithms.splitfed(sl, config, version=1)


def _round_run(algo: sljax.algorithms.Algorithm, data: sljax.data.ClientData) -> Run:
  """A variant that runs the jitted round, as `sljax.simulation.run` does (the state donated)."""
  state = algo.init(jax.random.key(0), data)
  round_fn = jax.jit(algo.round, donate_argnums=0)

  def run(n: int) -> None:
    nonlocal state
    for _ in range(n):
      state, _ = round_fn(state, data)
    jax.block_until_ready(state)

  return run


def _loop_batches(data: sljax.data.ClientData, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """NUM_BATCHES steps of every client's batch, x (K, B, 64) and y (K, B), drawn as the rounds draw them."""
  draw = jax.jit(sljax.data.client_batches, static_argnames="batch_size")
  key = jax.random.key(1)
  return [tuple(np.asarray(a) for a in draw(data, s, batch_size=BATCH, key=key)[:2]) for s in range(NUM_BATCHES)]


def _jax_loop_run(batches, k: int) -> Run:
  """Parallel SL as a Python loop over clients of jitted legs (see the module docstring)."""
  sl = sljax.vanilla(model(), client_optimizer=optax.adam(LR), server_optimizer=optax.adam(LR))
  x_SxK = [jax.device_put(list(x_KxBxD)) for x_KxBxD, _ in batches]
  y_SxK = [jax.device_put(list(y_KxB)) for _, y_KxB in batches]
  state = sl.init(jax.random.key(0), x_SxK[0][0])
  clients, server = [state.client] * k, state.server  # tied at the start, as in parallel_sl
  keys = list(jax.random.split(jax.random.key(2), k))
  server_key = jax.random.key(3)
  client_forward, client_backward = jax.jit(sl.client_forward), jax.jit(sl.client_backward)

  @jax.jit
  def server_step(server, h_NxD, y_N, key):
    server, down, _ = sl.server_step(server, sljax.SmashedData(h_NxD, y_N), key)
    # The mean over K*B rows is the mean of the clients' mean losses; K times its gradient is
    # the gradient of each client's own mean loss, which parallel_sl sends.
    return server, (k * down.grad).reshape(k, BATCH, -1)

  steps_done = 0

  def run(n: int) -> None:
    nonlocal clients, server, steps_done
    for _ in range(n * local_steps(k)):
      xs, ys = x_SxK[steps_done % NUM_BATCHES], y_SxK[steps_done % NUM_BATCHES]
      ups, pending = zip(*(client_forward(clients[i], xs[i], ys[i], keys[i]) for i in range(k)))
      # The server gathers the K messages and splits its gradient into K (one call each: a jitted
      # function of K inputs or outputs takes minutes to compile at K=4096).
      h_NxD = jnp.concatenate([up.activations for up in ups])
      y_N = jnp.concatenate([up.labels for up in ups])
      server, g_KxBxD = server_step(server, h_NxD, y_N, server_key)
      clients = [client_backward(clients[i], pending[i], sljax.CutGradient(g_BxD)) for i, g_BxD in enumerate(g_KxBxD)]
      steps_done += 1
    jax.block_until_ready((clients, server))

  return run


def _jax_loop_fused_run(batches, data: sljax.data.ClientData, k: int) -> Run:
  """SplitFed v1 the FedJAX way: a loop of jitted per-client vanilla steps, then FedAvg."""
  sl = sljax.vanilla(model(), client_optimizer=optax.adam(LR), server_optimizer=optax.adam(LR))
  x_SxK = [jax.device_put(list(x_KxBxD)) for x_KxBxD, _ in batches]
  y_SxK = [jax.device_put(list(y_KxB)) for _, y_KxB in batches]
  states = [sl.init(jax.random.key(0), x_SxK[0][0])] * k
  keys = list(jax.random.split(jax.random.key(2), k))
  weights = list(jax.device_put(np.asarray(data.count, np.float32) / float(np.sum(data.count))))
  step = jax.jit(sl.step)

  @jax.jit
  def accumulate(total, state, weight):
    params = (state.client.params, state.server.params)
    return jax.tree.map(lambda t, p: t + weight * p, total, params)

  steps_done = 0

  def run(n: int) -> None:
    nonlocal states, steps_done
    for _ in range(n):
      for _ in range(local_steps(k)):
        xs, ys = x_SxK[steps_done % NUM_BATCHES], y_SxK[steps_done % NUM_BATCHES]
        states = [step(states[i], (xs[i], ys[i]), keys[i])[0] for i in range(k)]
        steps_done += 1
      total = jax.tree.map(jnp.zeros_like, (states[0].client.params, states[0].server.params))
      for i in range(k):
        total = accumulate(total, states[i], weights[i])
      client_avg, server_avg = total
      states = [s.replace(client=s.client.replace(params=client_avg), server=s.server.replace(params=server_avg))
                for s in states]
    jax.block_until_ready(states)

  return run


def _torch_loop_run(batches, k: int, *, threads: int) -> Run:
  """Parallel SL in PyTorch, written as public split-learning code writes it."""
  import torch
  from torch import nn
  from torch.nn import functional as F

  torch.manual_seed(0)
  clients = [nn.Sequential(nn.Linear(64, 128), nn.ReLU()) for _ in range(k)]
  client_opts = [torch.optim.Adam(c.parameters(), lr=LR) for c in clients]
  server = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
  server_opt = torch.optim.Adam(server.parameters(), lr=LR)
  x_SxK = [list(torch.from_numpy(np.array(x_KxBxD, np.float32))) for x_KxBxD, _ in batches]
  y_SxK = [list(torch.from_numpy(y_KxB.astype(np.int64))) for _, y_KxB in batches]
  steps_done = 0

  def run(n: int) -> None:
    nonlocal steps_done
    torch.set_num_threads(threads)  # the two torch variants share the process's thread pool
    for _ in range(n * local_steps(k)):
      xs, ys = x_SxK[steps_done % NUM_BATCHES], y_SxK[steps_done % NUM_BATCHES]
      acts, smashed = [], []
      for i in range(k):
        client_opts[i].zero_grad()
        h = clients[i](xs[i])
        acts.append(h)
        smashed.append(h.detach().requires_grad_())
      server_opt.zero_grad()
      loss = F.cross_entropy(server(torch.cat(smashed)), torch.cat(ys))
      loss.backward()
      server_opt.step()
      for i in range(k):
        acts[i].backward(k * smashed[i].grad)
        client_opts[i].step()
      steps_done += 1

  return run


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def measure(k: int, *, budget_seconds: float, chunk_seconds: float, min_rounds: int, max_rounds: int,
            lax_map_max_k: int, torch_available: bool) -> dict:
  """Times every variant at k clients, interleaved; returns per-variant medians and the ratios."""
  data = client_data(k)
  batches = _loop_batches(data, k)
  builders: dict[str, Callable[[], Run]] = {}
  skipped = {}
  for algo in ("parallel_sl", "splitfed_v1"):
    for ex in ("vmap", "chunked_vmap", "lax_map") + (("server_chunk",) if algo == "parallel_sl" else ()):
      name = f"{algo}/{ex}"
      if ex == "lax_map" and k > lax_map_max_k:
        skipped[name] = f"lax_map left out above K={lax_map_max_k} (--lax-map-max-k) to bound the run"
      else:
        builders[name] = lambda algo=algo, ex=ex: _round_run(algorithm(algo, k, ex), data)
  builders["centralized"] = lambda: _round_run(algorithm("centralized", k), data)
  builders["jax_loop"] = lambda: _jax_loop_run(batches, k)
  builders["jax_loop_fused"] = lambda: _jax_loop_fused_run(batches, data, k)
  for name, threads in (("torch_loop", 2), ("torch_loop_1thread", 1)):
    if torch_available:
      builders[name] = lambda threads=threads: _torch_loop_run(batches, k, threads=threads)
    else:
      skipped[name] = "torch is not installed"

  runs, compile_seconds, probe = {}, {}, {}
  for name, build in builders.items():
    start = time.perf_counter()
    runs[name] = build()
    runs[name](1)  # compile and warm up
    compile_seconds[name] = time.perf_counter() - start
    probe[name] = time_chunk(runs[name], 1)
  # At least 9 rounds for a stable median, unless one round of every variant takes seconds (K=4096).
  min_rounds = min_rounds if sum(probe.values()) > 4.0 else max(min_rounds, 9)
  steps, rounds = plan_chunks(probe, chunk_seconds=chunk_seconds, budget_seconds=budget_seconds,
                              min_rounds=min_rounds, max_rounds=max_rounds, per_variant=True)
  _progress(f"K={k}: built and compiled {len(runs)} variants in {sum(compile_seconds.values()):.0f} s; timing "
            f"{rounds} interleaved rounds of {min(steps.values())} to {max(steps.values())} calls of "
            f"{local_steps(k)} steps (about {rounds * sum(steps[n] * probe[n] for n in probe):.0f} s)")
  t = interleave(runs, rounds=rounds, steps=steps)
  samples = k * BATCH * local_steps(k)
  variants = {name: {"seconds_per_round": float(np.median(s)), "samples_per_second": samples / float(np.median(s)),
                     "seconds_iqr": [float(q) for q in np.percentile(s, [25, 75])],
                     "compile_seconds": compile_seconds[name]} for name, s in t.items()}

  def speedup(fast: str, slow: str) -> dict | None:
    """Throughput of `fast` over `slow`: their seconds per round inverted."""
    return compare(t[slow], t[fast]) if fast in t and slow in t else None

  vmap_psl = "parallel_sl/vmap"
  if "torch_loop" in t:  # per round, the faster torch configuration: the ratio that does not flatter JAX
    t["torch_best"] = np.minimum(t["torch_loop"], t["torch_loop_1thread"])
  ratios = {
      "parallel_sl_over_centralized": speedup(vmap_psl, "centralized"),
      "jax_over_torch": speedup(vmap_psl, "torch_best"),
      "jax_over_torch_loop": speedup(vmap_psl, "torch_loop"),
      "jax_over_torch_loop_1thread": speedup(vmap_psl, "torch_loop_1thread"),
      "jax_over_jax_loop": speedup(vmap_psl, "jax_loop"),
      "splitfed_v1_over_jax_loop_fused": speedup("splitfed_v1/vmap", "jax_loop_fused"),
  }
  return {"K": k, "local_steps": local_steps(k), "samples_per_round": samples, "max_client_samples": int(data.x.shape[1]),
          "variants": variants, "ratios": {n: r for n, r in ratios.items() if r is not None}, "skipped": skipped,
          "rounds_per_chunk": steps, "rounds": rounds}


def _tree_bytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def memory_child(algo_name: str, executor_name: str, k: int, *, donate: bool, rounds: int = 2) -> dict:
  """Peak RSS of running rounds above the RSS before the state exists (run in a fresh process)."""
  data = client_data(k)
  algo = algorithm(algo_name, k, executor_name)
  key = jax.random.key(0)
  abstract = jax.eval_shape(algo.init, key, data)
  round_fn = jax.jit(algo.round, donate_argnums=0 if donate else ()).lower(abstract, data).compile()
  plan = round_fn.memory_analysis()  # XLA's own buffer plan for one round
  jax.block_until_ready(data)
  exact = reset_peak_rss()
  base = rss_bytes()
  state = jax.block_until_ready(algo.init(key, data))
  after_init = rss_bytes()
  for _ in range(rounds):
    state, metrics = round_fn(state, data)
    jax.block_until_ready((state, metrics))
  peak = peak_rss_bytes()
  one_client = jax.tree.map(lambda a: a[0], state.clients)
  one_server = jax.tree.map(lambda a: a[0], state.server) if algo.client_axes.server else state.server
  server_copies = k if algo.client_axes.server else 1
  expected = k * _tree_bytes(one_client) + server_copies * _tree_bytes(one_server)
  ex_name = executor(executor_name, k).name if executor_name != "server_chunk" else f"server_chunk({_server_chunk(executor_name, k)})"
  return {"algorithm": algo_name, "executor": ex_name, "K": k, "donate": donate,
          "client_state_bytes": _tree_bytes(one_client), "server_state_bytes": _tree_bytes(one_server),
          "server_copies": server_copies, "expected_bytes": expected, "live_state_bytes": _tree_bytes(state),
          "init_rss_delta_bytes": after_init - base, "peak_rss_delta_bytes": peak - base,
          "peak_over_state": (peak - base) / expected, "peak_reset": exact,
          # Arguments (state and data) + outputs not aliased to a donated argument + temporaries.
          "xla_plan_bytes": (plan.argument_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes
                             + plan.temp_size_in_bytes),
          "xla_temp_bytes": plan.temp_size_in_bytes}


def memory(k: int) -> list[dict]:
  rows = []
  for algo_name, executor_name, donate in MEMORY_VARIANTS:
    _progress(f"memory at K={k}: {algo_name}/{executor_name}{', donated' if donate else ''}")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", f"{algo_name},{executor_name},{k},{int(donate)}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  return rows


def _fmt_ratio(r: dict | None) -> str:
  return "-" if r is None else f"{r['ratio']:.2f} [{r['paired_q1']:.2f},{r['paired_q3']:.2f}]"


def _print_table(result: dict) -> None:
  env = result["environment"]
  print(f"clients: digits MLP cut at 1, Adam, batch {BATCH}/client; jax {env['jax']} on {env['devices']} "
        f"{env['backend']} device(s), {env['cpus']} CPUs, load {env['load_1min']:.1f}; torch {result['torch']}")
  names = []
  for row in result["rows"]:
    names += [n for n in list(row["variants"]) + list(row["skipped"]) if n not in names]
  print("\nthousand samples/s (median over interleaved rounds; '-' skipped, see below)")
  print(f"{'variant':28}" + "".join(f"{'K=' + str(r['K']):>10}" for r in result["rows"]))
  print(f"{'(local steps)':28}" + "".join(f"{r['local_steps']:>10}" for r in result["rows"]))
  for name in names:
    cells = [f"{r['variants'][name]['samples_per_second'] / 1e3:10.1f}" if name in r["variants"] else f"{'-':>10}"
             for r in result["rows"]]
    print(f"{name:28}" + "".join(cells))
  print("\nthroughput ratios: ratio of medians [paired quartiles]")
  labels = {
      "parallel_sl_over_centralized": "parallel_sl/vmap / centralized",
      "jax_over_torch": "parallel_sl/vmap / faster torch loop",
      "jax_over_torch_loop": "parallel_sl/vmap / torch_loop",
      "jax_over_torch_loop_1thread": "parallel_sl/vmap / torch_loop_1thread",
      "jax_over_jax_loop": "parallel_sl/vmap / jax_loop",
      "splitfed_v1_over_jax_loop_fused": "splitfed_v1/vmap / jax_loop_fused",
  }
  print(f"{'ratio':40}" + "".join(f"{'K=' + str(r['K']):>21}" for r in result["rows"]) + "  target")
  for key, label in labels.items():
    cells = "".join(f"{_fmt_ratio(r['ratios'].get(key)):>21}" for r in result["rows"])
    target = f">= {TARGETS[key][0]} {TARGETS[key][1]}" if key in TARGETS else ""
    print(f"{label:40}{cells}  {target}")
  for verdict in result["verdicts"]:
    print(f"  {verdict}")
  if result["memory"]:
    print(f"\nmemory at K={result['memory'][0]['K']}: peak RSS of a fresh process above its RSS before the state "
          f"was built (round compiled beforehand), over the state's bytes; XLA plan = the round's arguments + "
          f"outputs (less donated) + temporaries, from `compiled.memory_analysis()`")
    print(f"{'algorithm/executor':28} {'donate':>6} {'client KB':>9} {'server KB':>9} {'state MB':>8} "
          f"{'XLA plan MB':>11} {'XLA temp MB':>11} {'peak-base MB':>12} {'peak/state':>10}")
    for m in result["memory"]:
      print(f"{m['algorithm'] + '/' + m['executor']:28} {m['donate']!s:>6} {m['client_state_bytes'] / 1e3:9.1f} "
            f"{m['server_state_bytes'] / 1e3:9.1f}{'xK' if m['server_copies'] > 1 else '  '}"
            f"{m['expected_bytes'] / 2**20:7.1f} {m['xla_plan_bytes'] / 2**20:11.1f} {m['xla_temp_bytes'] / 2**20:11.1f} "
            f"{m['peak_rss_delta_bytes'] / 2**20:12.1f} {m['peak_over_state']:10.2f}")
  skipped = {(n, why) for r in result["rows"] for n, why in r["skipped"].items()}
  for name, why in sorted(skipped):
    ks = [r["K"] for r in result["rows"] if name in r["skipped"]]
    print(f"skipped {name} at K={','.join(map(str, ks))}: {why}")
  print(f"total {result['seconds']:.0f} s")


def _verdicts(rows: list[dict], mem: list[dict]) -> list[str]:
  out = []

  def check(key, ks, label):
    target = TARGETS[key][0]
    for r in rows:
      if r["K"] in ks and key in r["ratios"]:
        v = r["ratios"][key]["ratio"]
        out.append(f"{label} at K={r['K']}: {v:.2f} {'meets' if v >= target else 'MISSES'} >= {target}")

  check("parallel_sl_over_centralized", (512,), "parallel_sl / centralized")
  check("jax_over_torch", tuple(r["K"] for r in rows if r["K"] >= 64), "JAX / PyTorch loop (the faster of 2 and 1 thread)")
  check("jax_over_jax_loop", tuple(r["K"] for r in rows if r["K"] >= 64), "JAX / jitted per-client loop")
  limit = TARGETS["peak_over_state"][0]
  for m in mem:
    if m["K"] == 4096:
      v = m["peak_over_state"]
      out.append(f"peak / state, {m['algorithm']}/{m['executor']}{' donated' if m['donate'] else ''}: {v:.2f} "
                 f"{'meets' if v <= limit else 'MISSES'} <= {limit}")
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"K in {QUICK_KS}, fewer rounds")
  parser.add_argument("--ks", type=lambda s: tuple(int(k) for k in s.split(",")), help="comma-separated K values")
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of tables")
  parser.add_argument("--seconds-per-k", type=float, default=None, help="timing budget per K (interleaved rounds)")
  parser.add_argument("--chunk-ms", type=float, default=200.0, help="about how long each timed chunk lasts")
  parser.add_argument("--lax-map-max-k", type=int, default=LAX_MAP_MAX_K, help="leave lax_map out above this K")
  parser.add_argument("--memory-k", type=int, default=None,
                      help="K of the peak-memory subprocesses (default: the largest K; none with --quick)")
  parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
  parser.add_argument("--memory-child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.memory_child:
    algo_name, executor_name, k, donate = args.memory_child.split(",")
    print(json.dumps(memory_child(algo_name, executor_name, int(k), donate=bool(int(donate)))))
    return 0

  start = time.perf_counter()
  ks = args.ks or (QUICK_KS if args.quick else KS)
  budget = args.seconds_per_k or (6.0 if args.quick else 15.0)
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  env = environment()
  rows = [measure(k, budget_seconds=budget, chunk_seconds=args.chunk_ms / 1e3, min_rounds=5,
                  max_rounds=15 if args.quick else 25, lax_map_max_k=args.lax_map_max_k,
                  torch_available=torch_version is not None) for k in ks]
  memory_k = args.memory_k or (None if args.quick else max(ks))
  mem = [] if args.no_memory or memory_k is None else memory(memory_k)
  result = {"benchmark": "clients", "batch": BATCH, "targets": {k: v[0] for k, v in TARGETS.items()},
            "environment": env, "torch": torch_version,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows, "memory": mem,
            "verdicts": _verdicts(rows, mem), "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
