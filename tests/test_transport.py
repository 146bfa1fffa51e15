"""Split learning over the network: gRPC equals in process bit for bit and the fused simulation
within 1e-6; bad input is refused with the right status and changes nothing; a killed server
resumes exactly; a client that drops mid-step loses only that step; TLS and mutual TLS.

Set-up shared by the tests: the demo MLP (digits, 64 -> 32 | -> 10, dropout) with Adam, two clients with
an iid split of digits, 2 rounds of 2 steps per turn with batches of 16. Every server listens on
127.0.0.1 on a port the OS picks; every process started here is stopped with a timeout.
"""

import datetime
import ipaddress
import json
import re
import signal
import subprocess
import sys
import threading

import chex
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import sljax
from sljax import messages as msgs
from sljax import simulation
from sljax import transport as T
from sljax.algorithms import RoundInputs, ScheduleConfig, sequential_sl
from sljax.transport import client as transport_client
from sljax.transport import demo, wire
from sljax.transport import schedule as sched
from transport_helpers import Clock, CrashesAfterCommit, KillAfter, assert_bitwise, client_data, run_in_threads

HIDDEN = (32,)
DROPOUT = 0.25  # so that every step key matters
LR = 2e-3
SEED = 0
SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=2, batch_size=16)
TOKENS = {0: "token-zero", 1: "token-one"}
NAMES = {"client-0": 0, "client-1": 1}
PROCESS_TIMEOUT = 120


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=HIDDEN, dropout=DROPOUT, lr=LR)


def _parts(setup):
  return sljax.data.iid(setup.dataset.y_train, num_clients=SCHEDULE.num_clients, seed=0)


def _client_data(setup, k):
  return client_data(setup, k, SCHEDULE.num_clients)


def _server(setup, schedule=SCHEDULE, **kw):
  return T.SplitServer(setup.model, setup.sl, schedule=schedule, input_spec=sljax.ArraySpec.of(setup.dataset.x_train),
                       key=jax.random.key(SEED), tokens={t: k for k, t in TOKENS.items()}, certificate_names=NAMES,
                       **kw)


def _simulate(setup, schedule=SCHEDULE, inputs=None):
  """The fused in-process simulation of the same run (one jitted program per round)."""
  opt = optax.adam(LR)
  algo = sequential_sl(sljax.vanilla(setup.model, client_optimizer=opt, server_optimizer=opt),
                       ScheduleConfig(num_clients=schedule.num_clients, batch_size=schedule.batch_size,
                                      local_steps=schedule.local_steps))
  data = sljax.data.stack_clients(setup.dataset.x_train, setup.dataset.y_train, _parts(setup))
  state = algo.init(jax.random.key(SEED), data)
  round_fn = jax.jit(algo.round)
  for _ in range(schedule.rounds):
    state, _ = round_fn(state, data, inputs)
  return state


def _run_clients(setup, transports):
  """Runs `connect` and `run` for every client in its own thread; returns their results."""

  def work(k):
    x, y = _client_data(setup, k)
    return T.run(T.connect(transports[k], setup.model, setup.sl, client=k, x=x, y=y))

  return run_in_threads(work, transports, timeout=PROCESS_TIMEOUT)


def _halves(state):
  return {"server": (state.server.params, state.server.opt_state),
          "client": (state.client_half.params, state.client_half.opt_state)}


@pytest.fixture(scope="module")
def in_process(setup):
  """The reference: the same run, the same legs and keys, over InProcessTransport."""
  server = _server(setup)
  results = _run_clients(setup, {k: T.InProcessTransport(server.handle, token=TOKENS[k]) for k in TOKENS})
  return server, results


def test_in_process_run_follows_the_schedule_and_matches_the_simulation(setup, in_process):
  server, results = in_process
  for k, result in results.items():
    assert [(h["round"], h["step"]) for h in result.history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(h["client"] == k for h in result.history)
    assert_bitwise(result.half.params, server.state.client_half.params)
  sim = _simulate(setup)
  # Not bitwise: the simulation fuses the round into one program, XLA may fuse differently.
  chex.assert_trees_all_close(server.state.server.params, sim.server.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(server.state.client_half.params, sim.clients.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(server.state.client_half.opt_state, sim.clients.opt_state, atol=1e-6, rtol=0)
  assert int(server.state.round) == SCHEDULE.rounds and bool(server.state.last_completed.all())
  # Collaborative inference over the transport equals the fused predict.
  transport = T.InProcessTransport(server.handle, token=TOKENS[0])
  session = T.connect(transport, setup.model, setup.sl, client=0, x=setup.dataset.x_train[:20],
                      y=setup.dataset.y_train[:20])
  logits = T.predict(session, results[0].half, setup.dataset.x_test, batch_size=128)
  state = sljax.SplitState(server.state.client_half, server.state.server, jnp.zeros((), jnp.int32))
  expected, _ = setup.sl.predict(state, setup.dataset.x_test)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def _token_file(tmp_path):
  path = tmp_path / "tokens.txt"
  path.write_text("# client id, token\n" + "".join(f"{k} {t}\n" for k, t in TOKENS.items()))
  return str(path)


def _cli(*args):
  return [sys.executable, "-m", "sljax.cli", *args, "--hidden", ",".join(map(str, HIDDEN)), "--lr", str(LR),
          "--dropout", str(DROPOUT), "--num-clients", str(SCHEDULE.num_clients)]


def _stop(process, sig=signal.SIGTERM):
  if process.poll() is None:
    process.send_signal(sig)
    try:
      process.wait(timeout=20)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait(timeout=20)


def test_grpc_with_two_client_processes_equals_in_process_bitwise(setup, in_process, tmp_path):
  server = _server(setup)
  running = T.serve(server.handle, address="127.0.0.1:0")
  tokens = _token_file(tmp_path)
  clients = [subprocess.Popen(_cli("client", "--target", f"127.0.0.1:{running.port}", "--client-id", str(k),
                                   "--token-file", tokens, "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in TOKENS]
  try:
    outputs = [c.communicate(timeout=PROCESS_TIMEOUT) for c in clients]
  finally:
    for c in clients:
      _stop(c, signal.SIGKILL)
    running.stop()
  for c, (out, err) in zip(clients, outputs, strict=True):
    assert c.returncode == 0, err[-3000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["steps"] == SCHEDULE.rounds * SCHEDULE.local_steps and 0 <= row["test_accuracy"] <= 1
  assert_bitwise(_halves(server.state), _halves(in_process[0].state))


def _start_server(tmp_path, port, name):
  port_file = tmp_path / f"port-{name}"
  r = SCHEDULE
  with open(tmp_path / f"{name}.log", "w") as log:
    process = subprocess.Popen(
        _cli("serve", "--port", str(port), "--port-file", str(port_file), "--token-file", _token_file(tmp_path),
             "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2", "--rounds", str(r.rounds),
             "--local-steps", str(r.local_steps), "--batch-size", str(r.batch_size), "--seed", str(SEED)),
        stdout=subprocess.DEVNULL, stderr=log)
  return process, port_file


def test_server_killed_mid_training_resumes_exactly(setup, in_process, tmp_path, caplog):
  caplog.set_level("WARNING", logger="sljax")
  first, port_file = _start_server(tmp_path, 0, "first")
  second, transports = None, {}
  try:
    for _ in range(600):
      if port_file.exists() or first.poll() is not None:
        break
      threading.Event().wait(0.1)
    assert port_file.exists(), (tmp_path / "first.log").read_text()[-3000:]
    port = int(port_file.read_text())
    # The 6th Forward is client 0's second step of round 1: its first step is committed but not yet
    # checkpointed (every 2 commits), so the client must roll back one step and replay.
    shared = {"lock": threading.Lock(), "forwards": 0, "kill_at": 6, "process": first, "killed": threading.Event()}
    transports = {k: KillAfter(T.GrpcTransport(f"127.0.0.1:{port}", token=t, retries=400, backoff=0.05,
                                                max_backoff=0.25, deadline=30), shared) for k, t in TOKENS.items()}
    outcome = {}
    clients = threading.Thread(target=lambda: outcome.update(_run_clients(setup, transports)))
    clients.start()
    assert shared["killed"].wait(PROCESS_TIMEOUT) and first.returncode == -signal.SIGKILL
    second, _ = _start_server(tmp_path, port, "second")
    clients.join(PROCESS_TIMEOUT)
    assert set(outcome) == set(TOKENS), (tmp_path / "second.log").read_text()[-3000:]
  finally:
    for t in transports.values():
      t.inner.close()
    _stop(first, signal.SIGKILL)
    if second is not None:
      _stop(second)
  assert "rolling back" in caplog.text
  for result in outcome.values():  # every step once, in order, despite the replay
    assert [(h["round"], h["step"]) for h in result.history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  manager = simulation.checkpoint_manager(tmp_path / "ckpt")
  try:
    restored = simulation.restore(manager, in_process[0].state)
  finally:
    manager.close()
  assert_bitwise(_halves(restored), _halves(in_process[0].state))
  assert_bitwise(outcome[1].half.params, in_process[0].state.client_half.params)


def test_client_dropping_after_forward_loses_that_step_and_the_next_client_proceeds(setup):
  schedule = SCHEDULE._replace(rounds=1)
  clock = Clock()
  server = _server(setup, schedule=schedule, lease_seconds=60.0, clock=clock)
  running = T.serve(server.handle, address="127.0.0.1:0")
  initial = (server.state.server, server.state.client_half)
  links = {k: T.GrpcTransport(f"127.0.0.1:{running.port}", token=t, retries=0) for k, t in TOKENS.items()}
  try:
    sessions = {k: T.connect(links[k], setup.model, setup.sl, client=k, x=_client_data(setup, k)[0],
                             y=_client_data(setup, k)[1]) for k in TOKENS}
    s0 = sessions[0]
    half = T.fetch_half(s0, 0)
    k_client = s0.client_key(s0.run_key, 0, 0, 0)
    rows = np.asarray(s0.rows(0))
    up, _ = s0.forward(half, s0.x[rows], s0.y[rows], k_client)
    transport_client.call(s0.transport, "Forward", {"client": 0, "round": 0, "step": 0, "message": msgs.to_bytes(up)})
    assert server.s.volatile.staged
    links[0].close()  # client 0 is gone before its Commit
    clock.offset += 120.0  # its lease runs out: the next call ends its turn
    assert T.status(sessions[1])["turn"] == 1 and not server.s.volatile.staged
    assert_bitwise((server.state.server, server.state.client_half), initial)  # no trace of client 0's step
    result = T.run(sessions[1])
  finally:
    for link in links.values():
      link.close()
    running.stop()
  assert not bool(server.state.last_completed[0]) and int(server.state.last_steps[0]) == 0
  assert [h["step"] for h in result.history] == [0, 1]
  # Client 0's turn left no trace: client 1 started from the initial halves.
  dropped = np.zeros((schedule.local_steps, schedule.num_clients), bool)
  dropped[0, 0] = True
  sim = _simulate(setup, schedule, RoundInputs(jnp.ones(schedule.num_clients, bool), jnp.asarray(dropped)))
  chex.assert_trees_all_close(server.state.server.params, sim.server.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(result.half.params, sim.clients.params, atol=1e-6, rtol=0)


class _Poisoned:
  """A transport whose Forward responses carry a cut gradient full of NaN."""

  def __init__(self, inner):
    self.inner = inner

  def call(self, method, request, *, timeout=None):
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Forward":
      fields = wire.decode(method, response, response=True)
      grad = np.full((SCHEDULE.batch_size, HIDDEN[0]), np.nan, np.float32)
      response = wire.encode({**fields, "message": msgs.to_bytes(msgs.CutGradient(grad))})
    return response


def test_client_refuses_a_cut_gradient_with_nan(setup):
  server = _server(setup)
  x, y = _client_data(setup, 0)
  session = T.connect(_Poisoned(T.InProcessTransport(server.handle, token=TOKENS[0])), setup.model, setup.sl,
                      client=0, x=x, y=y)
  half = T.fetch_half(session, 0)
  with pytest.raises(T.TransportError, match=r"Forward response: field grad holds 512 NaN or infinite") as e:
    T.train_step(session, half, 0, 0)
  assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert int(server.state.step) == 0  # nothing committed


@pytest.fixture(scope="module")
def served(setup):
  server = _server(setup, max_message_bytes=200_000)
  running = T.serve(server.handle, address="127.0.0.1:0", max_message_bytes=200_000)
  yield server, running
  running.stop()


def _raw_call(channel, method, request, token):
  metadata = () if token is None else (("authorization", f"Bearer {token}"),)
  try:
    return grpc.StatusCode.OK, channel.unary_unary(wire.method_path(method))(request, metadata=metadata, timeout=30)
  except grpc.RpcError as e:
    return e.code(), e.details()


def _smashed(activations=None, labels=None):
  b = SCHEDULE.batch_size
  a = np.zeros((b, HIDDEN[0]), np.float32) if activations is None else activations
  return msgs.to_bytes(msgs.SmashedData(a, np.zeros((b,), np.int32) if labels is None else labels))


def _forward(message, client=0, round_=0, step=0):
  return wire.encode({"client": client, "round": round_, "step": step, "message": message})


def _handshake(**override):
  fields = {"protocol": msgs.PROTOCOL_VERSION, "client": 0, "cut_shape": [HIDDEN[0]], "cut_dtype": "float32",
            "uplink": {"name": "identity"}, "downlink": {"name": "identity"}, "samples": 100}
  return wire.encode({**fields, **override})


def _bad_requests(setup, server):
  b, nan = SCHEDULE.batch_size, np.full((SCHEDULE.batch_size, HIDDEN[0]), np.nan, np.float32)
  good = _smashed()
  half = jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype) if np.issubdtype(a.dtype, np.floating) else a,
                      jax.device_get(sched.to_message(server.state.client_half)))
  inner_v2 = bytearray(good)
  inner_v2[inner_v2.index(b"sljax") + 5] = 2  # the envelope's version field, a positive fixint
  code = grpc.StatusCode
  return [
      # (method, request, token, code, what the details must say)
      ("Status", wire.encode({"client": 0}), None, code.UNAUTHENTICATED, "no credentials"),
      ("Forward", _forward(good), "forged", code.UNAUTHENTICATED, "not one of this server's"),
      ("Forward", _forward(good, client=1), TOKENS[0], code.PERMISSION_DENIED, "credentials are client 0's"),
      ("Handshake", _handshake(protocol=99), TOKENS[0], code.FAILED_PRECONDITION,
       "protocol version: expected 1, got 99"),
      ("Handshake", _handshake(cut_shape=[31]), TOKENS[0], code.FAILED_PRECONDITION,
       r"signature.*\(B, 32\) float32.*\(B, 31\) float32"),
      ("Handshake", _handshake(cut_dtype="float16"), TOKENS[0], code.FAILED_PRECONDITION, r"\(B, 32\) float16"),
      ("Handshake", _handshake(downlink={"name": "quantize", "bits": 8}), TOKENS[0], code.FAILED_PRECONDITION,
       'codec configuration differs: downlink: the server\'s is {"name":"identity"}, the client\'s is '
       '{"bits":8,"name":"quantize"}$'),
      ("Handshake", _handshake(uplink="identity"), TOKENS[0], code.INVALID_ARGUMENT, "'uplink' must be dict"),
      ("Handshake", _handshake(samples=0), TOKENS[0], code.INVALID_ARGUMENT, r"'samples' must be an int in \[1, "),
      ("Forward", _forward(_smashed(np.zeros((b, 31), np.float32))), TOKENS[0], code.INVALID_ARGUMENT,
       r"field activations: expected shape \(16, 32\) float32, got \(16, 31\) float32"),
      ("Forward", _forward(_smashed(np.zeros((b, 32), np.float64))), TOKENS[0], code.INVALID_ARGUMENT,
       r"got \(16, 32\) float64"),
      ("Forward", _forward(_smashed(labels=np.zeros((b,), np.float32))), TOKENS[0], code.INVALID_ARGUMENT,
       r"field labels: expected shape \(16,\) int32"),
      ("Forward", _forward(_smashed(nan)), TOKENS[0], code.INVALID_ARGUMENT, "activations.*NaN or infinite"),
      ("Forward", _forward(_smashed(np.full((b, 32), np.inf, np.float32))), TOKENS[0], code.INVALID_ARGUMENT,
       "NaN or infinite"),
      ("Forward", _forward(good)[:-40], TOKENS[0], code.INVALID_ARGUMENT, "malformed or truncated"),
      ("Forward", _forward(good[:-40]), TOKENS[0], code.INVALID_ARGUMENT, "malformed or truncated"),
      ("Forward", b"\x00\x01 not msgpack at all", TOKENS[0], code.INVALID_ARGUMENT, "malformed or truncated"),
      ("Forward", serialization.msgpack_serialize([1, 2]), TOKENS[0], code.INVALID_ARGUMENT, "expected a map"),
      ("Forward", _forward(msgs.to_bytes(msgs.CutGradient(np.zeros((b, 32), np.float32)))), TOKENS[0],
       code.INVALID_ARGUMENT, "expected kind SmashedData"),
      ("Forward", _forward(bytes(inner_v2)), TOKENS[0], code.INVALID_ARGUMENT, "protocol version 2"),
      ("Forward", _forward(good) + b"\x00" * 250_000, TOKENS[0], code.RESOURCE_EXHAUSTED, ""),
      ("Forward", _forward(good, client=1), TOKENS[1], code.FAILED_PRECONDITION, "has not begun"),
      ("Forward", _forward(good, step=1), TOKENS[0], code.FAILED_PRECONDITION, "not the next step"),
      ("Forward", wire.encode({"client": 0, "round": 0, "step": True, "message": good}), TOKENS[0],
       code.INVALID_ARGUMENT, "'step' must be int"),
      ("Forward", wire.encode({"client": 0, "round": 0, "step": 0, "message": good, "x": 1}), TOKENS[0],
       code.INVALID_ARGUMENT, "expected a map with fields"),
      ("Commit", wire.encode({"client": 0, "round": 0, "step": 1}), TOKENS[0], code.ABORTED, "not staged"),
      ("Handover", wire.encode({"client": 0, "round": 0, "op": "put", "steps": 2, "wait": 0.0,
                                "message": msgs.to_bytes(half)}), TOKENS[0], code.INVALID_ARGUMENT,
       "Handover put.*NaN or infinite"),
      ("Handover", wire.encode({"client": 0, "round": 0, "op": "steal", "steps": 0, "wait": 0.0, "message": None}),
       TOKENS[0], code.INVALID_ARGUMENT, "'get', 'put' or 'leave'"),
      ("Predict", wire.encode({"client": 0, "batch": 0, "message": good}), TOKENS[0], code.INVALID_ARGUMENT,
       r"'batch' must be in \[1, 4096\]"),
      ("Predict", wire.encode({"client": 0, "batch": 8, "message": good}), TOKENS[0], code.INVALID_ARGUMENT,
       r"expected shape \(8, 32\) float32, got \(16, 32\) float32"),
      ("Steal", b"", TOKENS[0], code.UNIMPLEMENTED, ""),
  ]


def test_bad_input_gets_its_status_and_leaves_the_server_unchanged(setup, served):
  server, running = served
  channel = grpc.insecure_channel(f"127.0.0.1:{running.port}",
                                  options=[("grpc.max_send_message_length", 1 << 24)])
  links = {t: T.InProcessTransport(server.handle, token=t) for t in (*TOKENS.values(), None, "forged")}
  try:
    # Client 0's turn, with its first step staged: bad requests must not disturb it either.
    assert _raw_call(channel, "Handover", wire.encode({"client": 0, "round": 0, "op": "get", "steps": 0, "wait": 1.0,
                                                      "message": None}), TOKENS[0])[0] == grpc.StatusCode.OK
    assert _raw_call(channel, "Forward", _forward(_smashed()), TOKENS[0])[0] == grpc.StatusCode.OK
    before = server.snapshot()
    for method, request, token, code, match in _bad_requests(setup, server):
      got_code, details = _raw_call(channel, method, request, token)
      assert got_code == code, (method, match, got_code, details)
      assert re.search(match, details), (method, details)
      assert server.snapshot() == before, (method, match)
      # The same refusal in process (gRPC itself enforces the size limit and the method names).
      with pytest.raises(T.TransportError) as e:
        links[token].call(method, request)
      assert e.value.code == code and re.search(match, e.value.details), (method, e.value)
      assert server.snapshot() == before
    # The server kept serving: the staged step commits.
    code, response = _raw_call(channel, "Commit", wire.encode({"client": 0, "round": 0, "step": 0}), TOKENS[0])
    assert code == grpc.StatusCode.OK and wire.decode("Commit", response, response=True)["step"] == 1
    assert server.snapshot() != before
  finally:
    channel.close()


def test_handshake_refuses_wrong_token_model_and_codec(setup, served):
  _, running = served
  x, y = _client_data(setup, 0)

  def connect(token=TOKENS[0], model=setup):
    link = T.GrpcTransport(f"127.0.0.1:{running.port}", token=token, retries=0)
    try:
      return T.connect(link, model.model, model.sl, client=0, x=x, y=y)
    finally:
      link.close()

  with pytest.raises(T.TransportError, match="UNAUTHENTICATED") as e:
    connect(token="forged")
  assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
  other = demo.digits_setup(model="mlp", hidden=(24,), lr=LR)
  with pytest.raises(T.TransportError, match=r"FAILED_PRECONDITION.*\(B, 32\) float32.*\(B, 24\) float32"):
    connect(model=other)
  opt = optax.adam(LR)
  top_k = setup._replace(sl=sljax.vanilla(setup.model, client_optimizer=opt, server_optimizer=opt,
                                          uplink=sljax.codecs.top_k(k=8)))
  with pytest.raises(T.TransportError, match='FAILED_PRECONDITION: codec configuration differs: uplink: the '
                                             'server\'s is {"name":"identity"}, the client\'s is {.*"name":"top_k"'):
    connect(model=top_k)


def _certificates():
  """A CA, a server certificate for 127.0.0.1 and client certificates named client-0 and client-7."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)

  def make(name, issuer=None, *, ca=False, san=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
      builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), pem_key

  ca = make("sljax test CA", ca=True)
  server = make("sljax server", ca[:2], san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                             x509.DNSName("localhost")])
  return {"ca": ca[2], "server": server[2:], "client-0": make("client-0", ca[:2])[2:],
          "client-7": make("client-7", ca[:2])[2:]}


def test_tls_with_tokens_and_mutual_tls(served):
  server, _ = served
  certs = _certificates()
  status = wire.encode({"client": 0})
  tls = T.serve(server.handle, address="127.0.0.1:0", credentials=T.server_credentials(*certs["server"]))
  mtls = T.serve(server.handle, address="127.0.0.1:0",
                 credentials=T.server_credentials(*certs["server"], client_ca=certs["ca"]))
  opened = []

  def link(port, **kw):
    opened.append(T.GrpcTransport(f"127.0.0.1:{port}", retries=0, deadline=20, **kw))
    return opened[-1]

  try:
    # TLS, the client identified by its token
    ok = link(tls.port, token=TOKENS[0], root_certificates=certs["ca"])
    assert wire.decode("Status", ok.call("Status", status), response=True)["round"] == 0
    with pytest.raises(T.TransportError) as e:
      link(tls.port, token="forged", root_certificates=certs["ca"]).call("Status", status)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(T.TransportError) as e:  # a plaintext client cannot talk to a TLS server
      link(tls.port, token=TOKENS[0]).call("Status", status)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    # Mutual TLS, the client identified by its certificate's name, no token
    key_0, chain_0 = certs["client-0"][1], certs["client-0"][0]
    mutual = link(mtls.port, root_certificates=certs["ca"], private_key=key_0, certificate_chain=chain_0)
    hello = wire.decode("Handshake", mutual.call("Handshake", _handshake()), response=True)
    assert hello["client"] == 0 and hello["num_clients"] == 2
    with pytest.raises(T.TransportError) as e:  # client 0's certificate does not make it client 1
      mutual.call("Status", wire.encode({"client": 1}))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(T.TransportError) as e:
      link(mtls.port, root_certificates=certs["ca"], private_key=certs["client-7"][1],
           certificate_chain=certs["client-7"][0]).call("Status", status)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "client-7" in e.value.details
    with pytest.raises(T.TransportError) as e:  # no client certificate: the TLS handshake fails
      link(mtls.port, root_certificates=certs["ca"], token=TOKENS[0]).call("Status", status)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
  finally:
    for t in opened:
      t.close()
    tls.stop()
    mtls.stop()


def test_each_client_reads_its_batches_in_the_simulation_order():
  counts, batch_size, key = (5, 3), 4, jax.random.key(7)  # client 1 has fewer rows than a batch
  data = sljax.data.stack_clients([np.arange(c, dtype=np.int32) for c in counts],
                                  [np.zeros(c, np.int32) for c in counts])
  expected = jax.jit(lambda step: sljax.data.client_batches(data, step, batch_size=batch_size, key=key)[0])
  for k, count in enumerate(counts):
    rows = sched.row_order(client=k, count=count, batch_size=batch_size, run_key=np.asarray(jax.random.key_data(key)))
    for step in range(5):
      np.testing.assert_array_equal(np.asarray(rows(step)), np.asarray(expected(step)[k]))


def test_client_half_round_trips_through_bytes(in_process):
  half = sched.to_message(in_process[0].state.client_half)
  data = msgs.to_bytes(half)
  assert_bitwise(msgs.from_bytes(msgs.spec_of(half), data), jax.device_get(half))
  assert len(data) == msgs.wire_size(half)


def test_collaborative_inference_goes_through_the_uplink_codec(setup):
  """With a codec on the cut, `predict` over the transport sends the encoded smashed data (fewer
  bytes) and equals `Vanilla.predict` of the same halves, which encodes it the same way."""
  opt = optax.adam(LR)
  q8 = sljax.vanilla(setup.model, client_optimizer=opt, server_optimizer=opt,
                     uplink=sljax.codecs.quantize(bits=8, stochastic=False))
  server = T.SplitServer(setup.model, q8, schedule=SCHEDULE, input_spec=sljax.ArraySpec.of(setup.dataset.x_train),
                         key=jax.random.key(SEED), tokens={TOKENS[0]: 0})
  sent = []

  class Counting:
    def call(self, method, request, *, timeout=None):
      sent.append((method, len(request)))
      return server.handle(method, request, metadata={"authorization": f"Bearer {TOKENS[0]}"})

  session = T.connect(Counting(), setup.model, q8, client=0, x=setup.dataset.x_train[:20],
                      y=setup.dataset.y_train[:20])
  half = T.fetch_half(session, 0)
  x = setup.dataset.x_test[:100]
  logits = T.predict(session, half, x, batch_size=100)
  expected, _ = q8.predict(sljax.SplitState(half, server.state.server, jnp.zeros((), jnp.int32)), x)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
  plain, _ = setup.sl.predict(sljax.SplitState(half, server.state.server, jnp.zeros((), jnp.int32)), x)
  assert not np.allclose(logits, plain, atol=1e-6)  # the codec made a difference
  predict_bytes = [n for method, n in sent if method == "Predict"]
  assert predict_bytes and predict_bytes[0] < 100 * HIDDEN[0] * 4 / 3  # 8-bit payload, not float32


def test_client_restarted_mid_turn_from_its_checkpoint_ends_as_the_uninterrupted_run(setup, in_process, tmp_path):
  server = _server(setup)
  first = CrashesAfterCommit(T.InProcessTransport(server.handle, token=TOKENS[0]), 1, 0)
  done, errors = {}, []

  def client(k, transport, key):
    try:
      x, y = _client_data(setup, k)
      done[key] = T.run(T.connect(transport, setup.model, setup.sl, client=k, x=x, y=y),
                        checkpoint_dir=tmp_path / f"client-{k}")
    except SystemExit:
      pass
    except BaseException as e:  # noqa: BLE001 -- re-raised below
      errors.append(e)

  threads = [threading.Thread(target=client, args=(0, first, "first")),
             threading.Thread(target=client, args=(1, T.InProcessTransport(server.handle, token=TOKENS[1]), 1))]
  for t in threads:
    t.start()
  assert first.crashed.wait(PROCESS_TIMEOUT)
  threads[0].join(PROCESS_TIMEOUT)
  restarted = threading.Thread(target=client, args=(0, T.InProcessTransport(server.handle, token=TOKENS[0]), 0))
  restarted.start()
  for t in (threads[1], restarted):
    t.join(PROCESS_TIMEOUT)
  assert not errors, errors
  assert set(done) == {0, 1}
  assert [(h["round"], h["step"]) for h in done[0].history] == [(1, 1)]  # resumed its turn of round 1 at step 1
  assert_bitwise(_halves(server.state), _halves(in_process[0].state))
  assert_bitwise(done[0].half.params, in_process[1][0].half.params)
