"""What a deployment costs: parallel SL and SplitFed v1 over loopback gRPC, in process, and fused.

Per algorithm (parallel SL, SplitFed v1) and number of clients K, the same training run three ways
(the demo MLP `cut(mlp((128, 128)), 1)` on digits split iid, Adam 2e-3 on both sides, batch 32):

  grpc          K client threads in this process (`sljax.transport.connect` + `run`), the server in
                another process (`sljax serve --algorithm A --num-clients K`) over loopback gRPC;
  in_process    the same client threads against a `ConcurrentServer` in this process
                (`InProcessTransport`: the server's handler called on the client's thread, on bytes);
  simulation    the fused simulation of the same run: `parallel_sl` / `splitfed(version=1|2)`, one jitted
                `round` per round, compiled beforehand.

The timed window leaves out process start-up, compilation and the handshakes. Every client
connects first (its legs compile in `connect`), then the `run` calls start together at a
barrier. The servers compile their steps on first use, inside the run: about 1 s, which would be
most of a short run. So each run has `--warmup-rounds` extra rounds first (default 1), and the
window starts when round `warmup` begins (the first client to hear of it through `Handover get`),
and ends when every client's `run` has returned. The simulation runs the same rounds, also
timing only the rounds after the warm-up ones.

Whole runs cannot be interleaved at a finer grain. So each configuration runs `--repeats` times,
one run of each variant per repeat, in the order of `common.round_order` (rotated, reversed every
other pass). It reports medians and quartiles of steps/s, where steps = K x rounds x local_steps
client steps in the window. Ratios come from the medians; `[paired IQR]` gives the quartiles of
the per-repeat ratios. Also reported:

  rtt           per step, the client's `Forward` + `Commit` calls, median over clients, steps and
                repeats. In parallel SL it includes the wait at the step's barrier for the others.
  bitwise       every gRPC and in-process run ends with the same client params, bit for bit
                (the same computation, so the timings compare like with like).
  sim |d|       the largest |difference| between those params and the simulation's (not bitwise:
                XLA fuses the whole round differently).
  parts         where a client's time in the window goes, per step of a round: inside Forward,
                Commit and Handover calls, and outside calls ("client": data order, legs, msgpack,
                waiting for the CPU or the GIL); and an empty gRPC call (Status) for scale.

Requests and the ends of calls are recorded by a pass-through transport (two clock reads per call).

Then, per algorithm, the server restart (`restarts`): one run of K = min(--ks) client threads
against `sljax serve --checkpoint-dir ... --compilation-cache ...`, the server killed (SIGKILL)
and started again every 10 commits of client 0: seconds from the new process's start until it
listens, and until a client's first step after it is served (a `Commit` returns); the restarts
with a warm compilation cache against the target of 5 s, one without the cache for scale.
See README.md for how to read the numbers.

Usage:
  .venv/bin/python experiments/benchmarks/deployment.py [--json] [--quick] [--ks 2,4] [--rounds 3]
      [--warmup-rounds 1] [--local-steps 10] [--repeats 6] [--algorithms parallel_sl,splitfed_v1]
      [--restarts 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from common import compare, emit, environment, quartiles, round_order

import sljax
from sljax import transport as T
from sljax.transport import schedule as sched
from sljax.transport import demo, wire

ALGORITHMS = T.ALGORITHMS  # every algorithm that runs over the network
DEFAULT_ALGORITHMS = ("parallel_sl", "splitfed_v1")
VARIANTS = ("grpc", "in_process", "simulation")
MODEL, HIDDEN, LR, SEED = "mlp", (128, 128), 2e-3, 0  # `sljax serve`'s defaults, but for --hidden
START_SECONDS = 300.0  # a server that is not up by then failed
STATUS_CALLS = 50  # per gRPC run, timed one at a time after it
STEPS_BETWEEN_KILLS = 10  # client 0's commits between two kills of the server (restart measurement)
RESTART_RETRIES = 40  # of each call; the pauses are `sljax client`'s (0.1 s doubling, at most 5 s)
RESTART_TARGET_SECONDS = 5.0


class Config(NamedTuple):
  """One run: the schedule the server is started with, and the rounds not timed."""

  algorithm: str
  num_clients: int
  rounds: int  # timed rounds
  warmup: int  # rounds before them, not timed
  local_steps: int
  batch_size: int

  @property
  def schedule(self) -> T.Schedule:
    return T.Schedule(self.num_clients, self.warmup + self.rounds, self.local_steps, self.batch_size)

  @property
  def steps(self) -> int:
    """Client steps in the timed window."""
    return self.num_clients * self.rounds * self.local_steps


class Run(NamedTuple):
  """What one run of a variant gives."""

  seconds: float  # the timed window
  params: list  # final client params, per client
  rtt: list[float]  # seconds, Forward + Commit per timed step of every client
  parts: dict[str, float]  # seconds in the window, summed over clients: in Forward, Commit, Handover calls, and
                           # outside calls ("client": batches, the client's legs, encoding)
  status_rtt: tuple[float, ...] = ()  # seconds, empty calls (Status) one at a time after the run (gRPC only)


class _Recorder:
  """A transport that passes calls through and notes when each ended and how long it took.

  Requests are kept as bytes and decoded after the run (`calls`), so that recording costs the
  client two clock reads and an append per call.
  """

  def __init__(self, inner):
    self.inner = inner
    self._calls: list[tuple[str, bytes, float, float]] = []  # method, request, end, seconds

  def call(self, method: str, request: bytes, *, timeout: float | None = None) -> bytes:
    start = time.perf_counter()
    response = self.inner.call(method, request, timeout=timeout)
    end = time.perf_counter()
    self._calls.append((method, request, end, end - start))
    return response

  def reset(self) -> None:
    self._calls.clear()

  def calls(self) -> list[tuple[str, dict, float, float]]:
    """(method, request fields, end, seconds) of each call of the run (Forward, Commit, Handover)."""
    return [(method, wire.decode(method, request), end, seconds) for method, request, end, seconds in self._calls
            if method in ("Forward", "Commit", "Handover")]

  def close(self) -> None:
    self.inner.close()


def _tokens(k: int) -> dict[int, str]:
  return {c: f"benchmark-token-{c}" for c in range(k)}


def _cuts(num_clients: int) -> list[int]:
  """heterogeneous_parallel_sl: clients cut the demo MLP alternately after its first and its second layer."""
  return [1 + k % 2 for k in range(num_clients)]


def _legs(algorithm: str, setup: demo.DigitsSetup, num_clients: int, client: int = 0):
  """(model, protocol, options) of client `client` (and of the server, client 0's) in `algorithm`:
  U-shaped parallel SL cuts the demo MLP in three as `sljax serve --u-shaped` does; heterogeneous
  parallel SL cuts it at the client's own cut (`_cuts`)."""
  layers = setup.model.client.layers + setup.model.server.layers
  opt = optax.adam(LR)
  if algorithm == "parallel_sl_u":
    model = sljax.cut(layers, 1, 2)
    return model, sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt), {}
  if algorithm == "heterogeneous_parallel_sl":
    cuts = _cuts(num_clients)
    model = sljax.cut(layers, cuts[client])
    return model, sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt), {"cuts": cuts}
  return setup.model, sljax.vanilla(setup.model, client_optimizer=opt, server_optimizer=opt), {}


def _serve_flags(algorithm: str, num_clients: int) -> tuple[str, ...]:
  """The `sljax serve` flags that give `_legs`'s set-up."""
  if algorithm == "parallel_sl_u":
    return ("--u-shaped",)
  if algorithm == "heterogeneous_parallel_sl":
    return ("--cuts", ",".join(map(str, _cuts(num_clients))))
  return ()


def _connect(link, algorithm: str, setup: demo.DigitsSetup, num_clients: int, k: int, data) -> T.Session:
  model, sl, options = _legs(algorithm, setup, num_clients, k)
  return T.connect(link, model, sl, client=k, x=data[k][0], y=data[k][1], options=options)


def _client_data(setup: demo.DigitsSetup, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
  x, y = setup.dataset.x_train, setup.dataset.y_train
  return [(x[part], y[part]) for part in sljax.data.iid(y, num_clients=k, seed=0)]


def _run_clients(cfg: Config, setup: demo.DigitsSetup, transports: list) -> Run:
  """Connects every client, then times their `run` calls, started together."""
  data = _client_data(setup, cfg.num_clients)
  recorders = [_Recorder(t) for t in transports]
  sessions = [_connect(r, cfg.algorithm, setup, cfg.num_clients, k, data) for k, r in enumerate(recorders)]
  for r in recorders:
    r.reset()  # the handshakes
  results, errors = {}, []
  barrier = threading.Barrier(cfg.num_clients + 1)

  def client(k):
    try:
      barrier.wait()
      results[k] = T.run(sessions[k])
    except BaseException as e:  # noqa: BLE001 -- re-raised below
      errors.append(e)

  threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(cfg.num_clients)]
  for t in threads:
    t.start()
  gc.collect()
  gc.disable()
  try:
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
      t.join(START_SECONDS)
    end = time.perf_counter()
  finally:
    gc.enable()
  if errors:
    raise errors[0]
  if len(results) != cfg.num_clients:
    raise RuntimeError(f"{cfg}: a client did not finish within {START_SECONDS:.0f} s")
  calls = [r.calls() for r in recorders]
  if cfg.warmup:  # the window starts when the first timed round begins
    start = min(end_ for client in calls for method, req, end_, _ in client
                if method == "Handover" and req["op"] == "get" and req["round"] == cfg.warmup)
  rtt, parts = [], dict.fromkeys(("Forward", "Commit", "Handover", "client"), 0.0)
  for client in calls:
    forward = {(req["round"], req["step"]): s for method, req, _, s in client if method == "Forward"}
    rtt += [forward[(req["round"], req["step"])] + s for method, req, _, s in client
            if method == "Commit" and req["round"] >= cfg.warmup]
    in_window = [(method, min(s, end_ - start)) for method, _, end_, s in client if end_ > start]
    for method, s in in_window:
      parts[method] += s
    parts["client"] += (end - start) - sum(s for _, s in in_window)
  assert len(rtt) == cfg.steps, (len(rtt), cfg)
  return Run(end - start, [jax.device_get(results[k].half.params) for k in range(cfg.num_clients)], rtt, parts)


def _start_server(cfg: Config, workdir: str, name: str, *, port: int = 0,
                  extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
  """`sljax serve` for `cfg` on `port` (0: a free one) with the `extra` flags, once it listens."""
  tokens = os.path.join(workdir, "tokens.txt")
  with open(tokens, "w") as f:
    f.writelines(f"{c} {t}\n" for c, t in _tokens(cfg.num_clients).items())
  port_file, log_file = os.path.join(workdir, f"port-{name}"), os.path.join(workdir, f"{name}.log")
  s = cfg.schedule
  cmd = [sys.executable, "-m", "sljax.cli", "serve", "--algorithm", cfg.algorithm, "--num-clients", str(s.num_clients),
         "--model", MODEL, "--hidden", ",".join(map(str, HIDDEN)), "--lr", str(LR), "--seed", str(SEED),
         "--rounds", str(s.rounds), "--local-steps", str(s.local_steps), "--batch-size", str(s.batch_size),
         "--port", str(port), "--port-file", port_file, "--token-file", tokens,
         *_serve_flags(cfg.algorithm, s.num_clients), *extra]
  env = dict(os.environ)
  if jax.config.jax_compilation_cache_dir:  # the server shares this process's cache
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(jax.config.jax_persistent_cache_min_compile_time_secs)
  with open(log_file, "w") as log:
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
  deadline = time.monotonic() + START_SECONDS
  while not os.path.exists(port_file) and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  if not os.path.exists(port_file):
    process.kill()
    process.wait()
    with open(log_file) as f:
      raise RuntimeError(f"sljax serve did not start: {' '.join(cmd)}\n{f.read()[-3000:]}")
  with open(port_file) as f:
    return process, int(f.read())


def grpc_run(cfg: Config, setup: demo.DigitsSetup, workdir: str, name: str) -> Run:
  """One run against a fresh `sljax serve` process."""
  process, port = _start_server(cfg, workdir, name)
  links = []
  try:
    links = [T.GrpcTransport(f"127.0.0.1:{port}", token=t) for t in _tokens(cfg.num_clients).values()]
    run = _run_clients(cfg, setup, links)
    status, rtt = wire.encode({"client": 0}), []
    for _ in range(STATUS_CALLS):
      start = time.perf_counter()
      links[0].call("Status", status)
      rtt.append(time.perf_counter() - start)
    return run._replace(status_rtt=tuple(rtt))
  finally:
    for link in links:
      link.close()
    process.terminate()
    process.wait(timeout=60)


def in_process_run(cfg: Config, setup: demo.DigitsSetup) -> Run:
  """One run against a fresh `ConcurrentServer` in this process."""
  model, sl, options = _legs(cfg.algorithm, setup, cfg.num_clients)
  server = T.ConcurrentServer(model, sl, algorithm=cfg.algorithm, schedule=cfg.schedule,
                              input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(SEED),
                              tokens={t: c for c, t in _tokens(cfg.num_clients).items()}, options=options)
  return _run_clients(cfg, setup, [T.InProcessTransport(server.handle, token=t)
                                   for t in _tokens(cfg.num_clients).values()])


def simulation(cfg: Config, setup: demo.DigitsSetup):
  """`run() -> Run` of the fused simulation, its round compiled and the warm-up rounds run beforehand."""
  _, sl, options = _legs(cfg.algorithm, setup, cfg.num_clients)
  algo = sched.algorithm(cfg.algorithm, sl, cfg.schedule, sljax.ArraySpec.of(setup.dataset.x_train),
                         **options)  # the registry's
  x, y = setup.dataset.x_train, setup.dataset.y_train
  data = sljax.data.stack_clients(x, y, sljax.data.iid(y, num_clients=cfg.num_clients, seed=0))
  round_fn = jax.jit(algo.round)
  state = algo.init(jax.random.key(SEED), data)
  for _ in range(cfg.warmup):
    state, _ = round_fn(state, data, None)
  jax.block_until_ready(round_fn(state, data, None))  # compiled (already, if warmup > 0)
  warm = state

  def run() -> Run:
    state = warm
    gc.collect()
    gc.disable()
    try:
      start = time.perf_counter()
      for _ in range(cfg.rounds):
        state, _ = round_fn(state, data, None)
      jax.block_until_ready(state)
      seconds = time.perf_counter() - start
    finally:
      gc.enable()
    view = algo.schedule.clients  # where the clients differ, client k's party
    parties = [jax.tree.map(lambda a, k=k: a[k], state.clients) if view is None else view.party(state, k)
               for k in range(cfg.num_clients)]
    return Run(seconds, [jax.device_get(p.params) for p in parties], [], {})

  return run


class _Commits:
  """A transport that passes calls through and notes when each successful `Commit` returned."""

  def __init__(self, inner):
    self.inner = inner
    self.ends: list[float] = []

  def call(self, method: str, request: bytes, *, timeout: float | None = None) -> bytes:
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Commit":
      self.ends.append(time.perf_counter())
    return response

  def close(self) -> None:
    self.inner.close()


def _wait_for(condition, what: str, errors: list) -> None:
  deadline = time.monotonic() + START_SECONDS
  while not condition():
    if errors:
      raise errors[0]
    if time.monotonic() > deadline:
      raise RuntimeError(f"restart: {what} did not happen within {START_SECONDS:.0f} s")
    time.sleep(0.005)


def restarts(algorithm: str, num_clients: int, setup: demo.DigitsSetup, workdir: str, *, warm: int,
             cache: str) -> dict[str, Any]:
  """A restarted `sljax serve`: seconds from starting it again to serving, and to the first step served.

  One training run of `num_clients` client threads (`GrpcTransport`'s default backoff, as `sljax
  client`'s, with more retries) against `sljax serve --checkpoint-dir ... --compilation-cache CACHE`.
  Every `STEPS_BETWEEN_KILLS` commits of client 0 the server is killed (SIGKILL) and started again
  on the same port: `first`, the first restart, with the cache as a fresh server left it; `warm`
  times with the cache as restarted servers left it; then once with `--no-compilation-cache`
  (`cold`). (A sequential SL server restored from a checkpoint holds arrays placed by orbax, and
  its steps lower to other programs than a fresh server's, which its first restart compiles; the
  concurrent servers hold NumPy state and hit the cache from the first restart.) Per restart, from
  the moment the new process is started: `serving`, the port file is written (imports, checkpoint
  restore, the steps compiled or loaded, listening); `first_step`, the first `Commit` of any
  client returns (the clients' retries go out as soon as their channel connects again, within
  about a second of the server listening; in parallel SL every client must be back).
  """
  plan = ["first"] + ["warm"] * warm + ["cold"]
  cfg = Config(algorithm, num_clients, rounds=len(plan) + 1, warmup=1, local_steps=STEPS_BETWEEN_KILLS,
               batch_size=32)
  ckpt = os.path.join(workdir, f"restart-{algorithm}-{num_clients}-ckpt")
  flags = ("--checkpoint-dir", ckpt, "--compilation-cache", cache)
  name = f"restart-{algorithm}-{num_clients}"
  process, port = _start_server(cfg, workdir, f"{name}-0", extra=flags)
  links, threads, errors = [], [], []
  measured: dict[str, dict[str, list[float]]] = {kind: {"serving_s": [], "first_step_s": []} for kind in set(plan)}
  try:
    links = [_Commits(T.GrpcTransport(f"127.0.0.1:{port}", token=t, retries=RESTART_RETRIES))
             for t in _tokens(num_clients).values()]
    data = _client_data(setup, num_clients)
    sessions = [_connect(link, algorithm, setup, num_clients, k, data) for k, link in enumerate(links)]

    def client(k):
      try:
        T.run(sessions[k])
      except BaseException as e:  # noqa: BLE001 -- re-raised by _wait_for or below
        errors.append(e)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(num_clients)]
    for t in threads:
      t.start()
    for i, kind in enumerate(plan, 1):
      _wait_for(lambda i=i: len(links[0].ends) >= i * STEPS_BETWEEN_KILLS, f"commit {i * STEPS_BETWEEN_KILLS}", errors)
      process.kill()
      process.wait()
      start = time.perf_counter()
      cache_flags = ("--no-compilation-cache",) if kind == "cold" else ("--compilation-cache", cache)
      process, _ = _start_server(cfg, workdir, f"{name}-{i}", port=port, extra=(*flags[:2], *cache_flags))
      serving = time.perf_counter() - start
      _wait_for(lambda start=start: any(e > start for link in links for e in link.ends), "a step after the restart",
                errors)
      first = min(e for link in links for e in link.ends if e > start) - start
      measured[kind]["serving_s"].append(serving)
      measured[kind]["first_step_s"].append(first)
    for t in threads:
      t.join(START_SECONDS)
    if errors:
      raise errors[0]
  finally:
    for link in links:
      link.close()
    process.terminate()
    process.wait(timeout=60)
  warm_first = measured["warm"]["first_step_s"]
  return {"algorithm": algorithm, "num_clients": num_clients, "steps_between_kills": STEPS_BETWEEN_KILLS,
          **measured, "first_step_s_median": float(np.median(warm_first)) if warm_first else None}


def _share_compilations(directory: str) -> None:
  """A persistent compilation cache for this process and the servers it starts.

  Every run starts a fresh server, which compiles its steps again (in the warm-up round, so not
  timed); with the cache, the second and later servers load them instead, which roughly halves
  the untimed part of a gRPC run (4.6 -> 2.7 s). Both sides load the same programs, so results do
  not change. A cache the user configured is used as it is.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a),
                                                                               jax.tree.leaves(b), strict=True))


def _summary(seconds: np.ndarray, steps: int) -> dict[str, Any]:
  q1, q2, q3 = quartiles(steps / seconds)
  return {"steps_per_s": q2, "steps_per_s_iqr": [q1, q3], "seconds": seconds.tolist()}


def measure(cfg: Config, setup: demo.DigitsSetup, *, repeats: int, workdir: str) -> dict[str, Any]:
  sim = simulation(cfg, setup)
  runs: dict[str, list[Run]] = {v: [] for v in VARIANTS}
  variants = {"grpc": lambda r: grpc_run(cfg, setup, workdir, f"{cfg.algorithm}-{cfg.num_clients}-{r}"),
              "in_process": lambda r: in_process_run(cfg, setup), "simulation": lambda r: sim()}
  for r in range(repeats):
    for name in round_order(list(VARIANTS), r):
      runs[name].append(variants[name](r))
  seconds = {v: np.array([run.seconds for run in runs[v]]) for v in VARIANTS}
  reference = runs["in_process"][0].params
  rtt = {v: np.concatenate([run.rtt for run in runs[v]]) for v in ("grpc", "in_process")}
  # Per client step: where a client's time in the window went, mean over clients and repeats.
  parts = {v: {name: 1e3 * float(np.mean([run.parts[name] for run in runs[v]])) / cfg.steps
               for name in runs[v][0].parts} for v in ("grpc", "in_process")}
  return {
      "algorithm": cfg.algorithm, "num_clients": cfg.num_clients, "rounds": cfg.rounds, "warmup_rounds": cfg.warmup,
      "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "steps": cfg.steps, "repeats": repeats,
      **{v: _summary(seconds[v], cfg.steps) for v in VARIANTS},
      # seconds(in process) / seconds(gRPC) = steps/s(gRPC) / steps/s(in process)
      "grpc_over_in_process": compare(seconds["in_process"], seconds["grpc"]),
      "grpc_over_simulation": compare(seconds["simulation"], seconds["grpc"]),
      **{f"{v}_rtt_ms_median": 1e3 * float(np.median(rtt[v])) for v in rtt},
      **{f"{v}_rtt_ms_p90": 1e3 * float(np.percentile(rtt[v], 90)) for v in rtt},
      **{f"{v}_ms_per_step": parts[v] for v in parts},
      "grpc_status_rtt_ms_median": 1e3 * float(np.median(np.concatenate([run.status_rtt for run in runs["grpc"]]))),
      "bitwise_grpc_equals_in_process": all(_equal(run.params, reference) for run in runs["grpc"] + runs["in_process"]),
      "simulation_max_abs_diff": max(_max_abs_diff(run.params, runs["simulation"][0].params) for run in runs["grpc"]),
  }


def _iqr(pair: list[float], fmt: str = ".0f") -> str:
  return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def _print_table(result: dict) -> None:
  env, rows = result["environment"], result["rows"]
  r0 = rows[0]
  print(f"deployment: digits MLP (128, 128), batch {r0['batch_size']}, {r0['rounds']} timed rounds of "
        f"{r0['local_steps']} steps after {r0['warmup_rounds']} warm-up; client threads; server over loopback gRPC "
        f"(another process) / in process / fused simulation; jax {env['jax']}, {env['cpus']} CPUs, "
        f"load {env['load_1min']:.1f}")
  print(f"{'algorithm':11} {'K':>2} {'grpc st/s':>9} {'[IQR]':>12} {'in-proc st/s':>12} {'[IQR]':>12} {'sim st/s':>8} "
        f"{'[IQR]':>14} {'grpc/in-proc':>12} {'[paired IQR]':>12} {'grpc/sim':>8} {'[paired IQR]':>12} "
        f"{'rtt ms grpc':>11} {'in-proc':>7} {'bitwise':>7} {'sim |d|':>7}")
  for r in rows:
    g, i, s = r["grpc"], r["in_process"], r["simulation"]
    gi, gs = r["grpc_over_in_process"], r["grpc_over_simulation"]
    print(f"{r['algorithm']:11} {r['num_clients']:2d} {g['steps_per_s']:9.0f} {_iqr(g['steps_per_s_iqr']):>12} "
          f"{i['steps_per_s']:12.0f} {_iqr(i['steps_per_s_iqr']):>12} {s['steps_per_s']:8.0f} "
          f"{_iqr(s['steps_per_s_iqr']):>14} {gi['ratio']:12.3f} "
          f"{_iqr([gi['paired_q1'], gi['paired_q3']], '.2f'):>12} {gs['ratio']:8.3f} "
          f"{_iqr([gs['paired_q1'], gs['paired_q3']], '.3f'):>12} {r['grpc_rtt_ms_median']:11.2f} "
          f"{r['in_process_rtt_ms_median']:7.2f} {r['bitwise_grpc_equals_in_process']!s:>7} "
          f"{r['simulation_max_abs_diff']:7.1e}")
  print("st/s: client steps per second (K x rounds x local steps / seconds), median [quartiles] over "
        f"{r0['repeats']} repeats; ratios of medians of steps/s [quartiles of per-repeat ratios]; rtt: Forward + "
        "Commit per step, median.")
  print()
  print("where a client's time goes, ms per step of a round (mean over clients and repeats); the parts add up to "
        "the wall time per step. Status: an empty gRPC call, median")
  print(f"{'algorithm':11} {'K':>2} {'variant':10} {'Forward':>7} {'Commit':>7} {'Handover':>8} {'client':>7} "
        f"{'= wall':>7} {'Status':>7}")
  for r in rows:
    for v in ("grpc", "in_process"):
      p = r[f"{v}_ms_per_step"]
      status = f"{r['grpc_status_rtt_ms_median']:7.2f}" if v == "grpc" else ""
      print(f"{r['algorithm']:11} {r['num_clients']:2d} {v:10} {p['Forward']:7.2f} {p['Commit']:7.2f} "
            f"{p['Handover']:8.2f} {p['client']:7.2f} {sum(p.values()):7.2f} {status:>7}")
  if result["restarts"]:
    print()
    print("server restart: `sljax serve --checkpoint-dir` killed (SIGKILL) and started again; seconds from the new "
          "process's start to serving (port file) / to the first step served (a client's Commit returns). warm: "
          "median [min, max] of the restarts after the first; 1st: the first restart; no cache: one with "
          "--no-compilation-cache")
    print(f"{'algorithm':11} {'K':>2} {'warm: serving':>13} {'first step':>10} {'[min, max]':>14} "
          f"{'1st: serving':>12} {'first step':>10} {'no cache: serving':>17} {'first step':>10} {'target':>8}")
    for r in result["restarts"]:
      w, f, c = r["warm"], r["first"], r["cold"]
      met = "met" if r["first_step_s_median"] <= RESTART_TARGET_SECONDS else "missed"
      print(f"{r['algorithm']:11} {r['num_clients']:2d} {np.median(w['serving_s']):13.2f} "
            f"{r['first_step_s_median']:10.2f} {_iqr([min(w['first_step_s']), max(w['first_step_s'])], '.2f'):>14} "
            f"{f['serving_s'][0]:12.2f} {f['first_step_s'][0]:10.2f} "
            f"{c['serving_s'][0]:17.2f} {c['first_step_s'][0]:10.2f} "
            f"{f'<= {RESTART_TARGET_SECONDS:.0f} s':>8} {met}")
  print(f"total {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--quick", action="store_true", help="K = 2 only, 3 repeats, 2 warm restarts")
  parser.add_argument("--ks", default="2,4", help="numbers of clients, comma-separated")
  parser.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS), help="comma-separated subset of "
                      + ",".join(ALGORITHMS))
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds per run")
  parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds before the timed ones (server compiles)")
  parser.add_argument("--local-steps", type=int, default=10, help="steps per round")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=6, help="runs of each variant per configuration")
  parser.add_argument("--restarts", type=int, default=3,
                      help="warm server restarts per algorithm (after a first one, and before one without the "
                           "compilation cache); 0: no restart measurement")
  args = parser.parse_args(argv)
  ks = [2] if args.quick else [int(k) for k in args.ks.split(",") if k]
  repeats = 3 if args.quick else args.repeats
  algorithms = [a for a in args.algorithms.split(",") if a]
  if unknown := sorted(set(algorithms) - set(ALGORITHMS)):
    parser.error(f"--algorithms: expected names among {list(ALGORITHMS)}, got {unknown}")
  restart_count = 2 if args.quick else args.restarts
  if min(ks) < 1 or args.rounds < 1 or args.warmup_rounds < 0 or args.local_steps < 1 or repeats < 1:
    parser.error("--ks, --rounds, --local-steps, --repeats: expected positive ints; --warmup-rounds: >= 0")
  if restart_count < 0:
    parser.error(f"--restarts: expected an int >= 0, got {restart_count}")
  start = time.perf_counter()
  env = environment()
  setup = demo.digits_setup(model=MODEL, hidden=HIDDEN, lr=LR)
  rows, restart_rows = [], []
  with tempfile.TemporaryDirectory() as workdir:
    _share_compilations(os.path.join(workdir, "jax-cache"))
    cache = jax.config.jax_compilation_cache_dir  # the user's, if configured
    for algorithm in algorithms:
      for k in ks:
        cfg = Config(algorithm, k, args.rounds, args.warmup_rounds, args.local_steps, args.batch_size)
        rows.append(measure(cfg, setup, repeats=repeats, workdir=workdir))
      if restart_count:
        restart_rows.append(restarts(algorithm, min(ks), setup, workdir, warm=restart_count, cache=cache))
  result = {"benchmark": "deployment", "environment": env, "rows": rows, "restarts": restart_rows,
            "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
