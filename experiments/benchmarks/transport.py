"""What the network costs: split learning over loopback gRPC against the same run in process.

Per demo model (digits, batch 32, Adam 2e-3, one client; the client driver is the same in both):

  wire / payload      bytes written to the TCP connection (HTTP/2 frames and headers, gRPC
                      framing, the request/response maps, Commit calls; measured by a counting
                      proxy between client and server) over the payload: the exact bytes of the
                      SmashedData and CutGradient messages (`len(sljax.to_bytes(m))`). Target: <= 1.02.
  grpc / in-process   steps per second of training over loopback gRPC (the server in another
                      process, `sljax serve`), over the same steps over `InProcessTransport` (the
                      server's handler called in this process, still on bytes); timed side by side
                      (see `common.py`).
  latency             one whole step (forward, Forward call, backward, Commit call) over gRPC, timed
                      one at a time: median and p99; and the round trip of an empty call (Status).

No checkpoints are written by either server, so the ratio is the transport's alone.

Usage:
  .venv/bin/python experiments/benchmarks/transport.py [--json] [--rounds N] [--latency-steps N]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
from common import chunk_steps, compare, emit, environment, interleave

import sljax
from sljax import transport as T
from sljax.transport import demo

TARGET_WIRE_RATIO = 1.02
TOKEN = "benchmark-token"
BATCH = 32
MODELS = (("MLP", "mlp", "128,128"), ("CNN", "cnn", ""))
STEPS_PER_TURN = 10**7  # one turn that never ends: no handovers while timing


class CountingProxy:
  """A TCP relay on 127.0.0.1 that counts the bytes going each way."""

  def __init__(self, upstream_port: int):
    self.up = self.down = 0
    self._lock = threading.Lock()
    self._listener = socket.create_server(("127.0.0.1", 0))
    self.port = self._listener.getsockname()[1]
    self._upstream = upstream_port
    self._sockets: list[socket.socket] = []
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self):
    while True:
      try:
        downstream, _ = self._listener.accept()
      except OSError:
        return
      upstream = socket.create_connection(("127.0.0.1", self._upstream))
      for s in (downstream, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      self._sockets += [downstream, upstream]
      threading.Thread(target=self._pump, args=(downstream, upstream, "up"), daemon=True).start()
      threading.Thread(target=self._pump, args=(upstream, downstream, "down"), daemon=True).start()

  def _pump(self, source: socket.socket, sink: socket.socket, direction: str):
    try:
      while data := source.recv(1 << 16):
        with self._lock:
          setattr(self, direction, getattr(self, direction) + len(data))
        sink.sendall(data)
    except OSError:
      pass

  def reset(self):
    with self._lock:
      self.up = self.down = 0

  def close(self):
    self._listener.close()
    for s in self._sockets:
      s.close()


def _start_server(model: str, hidden: str, workdir: str) -> tuple[subprocess.Popen, int]:
  tokens = os.path.join(workdir, "tokens.txt")
  with open(tokens, "w") as f:
    f.write(f"0 {TOKEN}\n")
  port_file = os.path.join(workdir, f"port-{model}")
  cmd = [sys.executable, "-m", "sljax.cli", "serve", "--port", "0", "--port-file", port_file, "--token-file", tokens,
         "--model", model, "--num-clients", "1", "--rounds", "1", "--local-steps", str(STEPS_PER_TURN),
         "--batch-size", str(BATCH)]
  if hidden:
    cmd += ["--hidden", hidden]
  process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(1200):
    if os.path.exists(port_file) or process.poll() is not None:
      break
    time.sleep(0.05)
  if not os.path.exists(port_file):
    process.kill()
    raise RuntimeError(f"sljax serve did not start: {' '.join(cmd)}")
  with open(port_file) as f:
    return process, int(f.read())


class _Trainer:
  """Steps of client 0's one turn against one server; `run(n)` is a variant for `common.interleave`."""

  def __init__(self, session: T.Session):
    self.session = session
    self.half = T.fetch_half(session, 0)
    self.step = 0
    self.payload = 0

  def one(self) -> None:
    self.half, _, metrics = T.train_step(self.session, self.half, 0, self.step)
    self.step += 1
    self.payload += metrics["bytes_up"] + metrics["bytes_down"]

  def run(self, n: int) -> None:
    for _ in range(n):
      self.one()
    jax.block_until_ready(self.half)


def measure(name: str, model: str, hidden: str, *, rounds: int, chunk_seconds: float, latency_steps: int,
            workdir: str) -> dict:
  setup = demo.digits_setup(model=model, hidden=tuple(int(h) for h in hidden.split(",") if h) or (128, 128))
  x, y = setup.dataset.x_train, setup.dataset.y_train
  process, port = _start_server(model, hidden, workdir)
  proxy = CountingProxy(port)
  links = []
  try:
    direct = T.GrpcTransport(f"127.0.0.1:{port}", token=TOKEN)
    counted = T.GrpcTransport(f"127.0.0.1:{proxy.port}", token=TOKEN)
    links += [direct, counted]
    grpc_trainer = _Trainer(T.connect(direct, setup.model, setup.sl, client=0, x=x, y=y))
    server = T.SplitServer(setup.model, setup.sl, schedule=T.Schedule(1, 1, STEPS_PER_TURN, BATCH),
                           input_spec=sljax.ArraySpec.of(x), key=jax.random.key(0), tokens={TOKEN: 0})
    local = _Trainer(T.connect(T.InProcessTransport(server.handle, token=TOKEN), setup.model, setup.sl, client=0,
                               x=x, y=y))
    runs = {"grpc": grpc_trainer.run, "in_process": local.run}
    for run in runs.values():
      run(3)  # compile and warm up
    steps = chunk_steps(runs, chunk_seconds=chunk_seconds)
    t = interleave(runs, rounds=rounds, steps=steps)
    speed = compare(t["in_process"], t["grpc"])  # seconds per step in process / over gRPC = gRPC steps/s ratio

    # Wire bytes: the same client, the same server, through the counting proxy.
    wired = _Trainer.__new__(_Trainer)
    wired.session, wired.half, wired.step, wired.payload = (grpc_trainer.session._replace(transport=counted),
                                                            grpc_trainer.half, grpc_trainer.step, 0)
    wired.run(3)  # the connection is set up and its header tables warm
    proxy.reset()
    wired.payload = 0
    wired.run(100)
    wire_up, wire_down, payload = proxy.up, proxy.down, wired.payload
    grpc_trainer.half, grpc_trainer.step = wired.half, wired.step

    latencies, rpc = [], []
    status = T.wire.encode({"client": 0})
    for _ in range(latency_steps):
      start = time.perf_counter()
      grpc_trainer.run(1)
      latencies.append(time.perf_counter() - start)
      start = time.perf_counter()
      direct.call("Status", status)
      rpc.append(time.perf_counter() - start)
  finally:
    for link in links:
      link.close()
    proxy.close()
    process.terminate()
    process.wait(timeout=30)
  return {
      "model": name,
      "batch": BATCH,
      "grpc_ms": 1e3 * float(np.median(t["grpc"])),
      "in_process_ms": 1e3 * float(np.median(t["in_process"])),
      "grpc_steps_per_s": 1.0 / float(np.median(t["grpc"])),
      "in_process_steps_per_s": 1.0 / float(np.median(t["in_process"])),
      "grpc_over_in_process_steps_per_s": speed["ratio"],
      "paired_iqr": [speed["paired_q1"], speed["paired_q3"]],
      "payload_bytes_per_step": payload / 100,
      "wire_bytes_per_step": (wire_up + wire_down) / 100,
      "wire_over_payload": (wire_up + wire_down) / payload,
      "meets_wire_target": (wire_up + wire_down) / payload <= TARGET_WIRE_RATIO,
      "step_latency_ms_median": 1e3 * float(np.median(latencies)),
      "step_latency_ms_p99": 1e3 * float(np.percentile(latencies, 99)),
      "status_rtt_ms_median": 1e3 * float(np.median(rpc)),
      "status_rtt_ms_p99": 1e3 * float(np.percentile(rpc, 99)),
      "latency_steps": latency_steps,
      "steps_per_chunk": steps,
      "rounds": rounds,
  }


def _print_table(result: dict) -> None:
  env = result["environment"]
  print(f"transport: digits, batch {BATCH}, one client, loopback gRPC (server in another process) vs in process; "
        f"jax {env['jax']}, {env['cpus']} CPUs, load {env['load_1min']:.1f}")
  print(f"{'model':5} {'payload B':>9} {'wire B':>8} {'wire/payload':>12} {'grpc st/s':>9} {'in-proc st/s':>12} "
        f"{'grpc/in-proc':>12} {'[paired IQR]':>13} {'step ms p50':>11} {'p99':>7} {'Status ms p50':>13} {'p99':>6}")
  for r in result["rows"]:
    iqr = r["paired_iqr"]
    print(f"{r['model']:5} {r['payload_bytes_per_step']:9.0f} {r['wire_bytes_per_step']:8.0f} "
          f"{r['wire_over_payload']:12.4f} {r['grpc_steps_per_s']:9.1f} {r['in_process_steps_per_s']:12.1f} "
          f"{r['grpc_over_in_process_steps_per_s']:12.3f} {f'[{iqr[0]:.2f}, {iqr[1]:.2f}]':>13} "
          f"{r['step_latency_ms_median']:11.2f} {r['step_latency_ms_p99']:7.2f} {r['status_rtt_ms_median']:13.3f} "
          f"{r['status_rtt_ms_p99']:6.2f}")
  print(f"wire/payload target <= {TARGET_WIRE_RATIO}; steps/s are medians over {result['rows'][0]['rounds']} "
        f"interleaved rounds; latencies over {result['rows'][0]['latency_steps']} single steps. "
        f"total {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per model")
  parser.add_argument("--chunk-ms", type=float, default=200.0, help="about how long one timed chunk lasts")
  parser.add_argument("--latency-steps", type=int, default=200, help="single steps timed for the latency")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  env = environment()
  with tempfile.TemporaryDirectory() as workdir:
    rows = [measure(name, model, hidden, rounds=args.rounds, chunk_seconds=args.chunk_ms / 1e3,
                    latency_steps=args.latency_steps, workdir=workdir) for name, model, hidden in MODELS]
  result = {"benchmark": "transport", "target_wire_over_payload": TARGET_WIRE_RATIO, "environment": env,
            "rows": rows, "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
