"""Every malformed input gets INVALID_ARGUMENT saying what was expected, never INTERNAL, and
changes nothing; the handshake has no side effects (no state, no checkpoint, no lease)."""

import os
import threading
import time

import grpc
import jax
import msgpack
import numpy as np
import pytest

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.transport import demo, wire
from transport_helpers import raw_call

SCHEDULE = T.Schedule(num_clients=2, rounds=1, local_steps=1, batch_size=8)
TOKENS = {"token-zero": 0, "token-one": 1}
HIDDEN = 16


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(HIDDEN,), lr=1e-3)


def _server(setup, algorithm, **kw):
  common = dict(schedule=SCHEDULE, input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                tokens=TOKENS, **kw)
  if algorithm == "sequential_sl":
    return T.SplitServer(setup.model, setup.sl, **common)
  return T.ConcurrentServer(setup.model, setup.sl, algorithm=algorithm, **common)


@pytest.fixture(scope="module")
def servers(setup, tmp_path_factory):
  """One server per algorithm (built on first use), each checkpointing into its own directory."""
  built = {}

  def get(algorithm):
    if algorithm not in built:
      built[algorithm] = _server(setup, algorithm, checkpoint_dir=tmp_path_factory.mktemp(algorithm))
    return built[algorithm]

  yield get
  for server in built.values():
    server.close()


def _call(server, method, fields, token="token-zero"):
  response = T.InProcessTransport(server.handle, token=token).call(method, wire.encode(fields))
  return wire.decode(method, response, response=True)


def _refused(server, method, request, details, code=grpc.StatusCode.INVALID_ARGUMENT):
  """`request` (bytes) is refused with `code` and exactly `details`, and the server is unchanged."""
  before = server.snapshot()
  with pytest.raises(T.TransportError) as e:
    T.InProcessTransport(server.handle, token="token-zero").call(method, request)
  assert (e.value.code, e.value.details) == (code, details)
  assert server.snapshot() == before


def _envelope(activations, labels=None):
  return msgpack.packb({"body": {"activations": activations, "labels": labels}, "kind": "SmashedData", "sljax": 1})


def _nested(depth, leaf=1):
  for _ in range(depth):
    leaf = [leaf]
  return leaf


def _array(shape, dtype, data):
  return msgpack.ExtType(1, msgpack.packb([shape, dtype, data]))


# message bytes -> what the refusal of a Predict carrying them says after "Predict: SmashedData: " ({n}: their length)
MALFORMED_MESSAGES = {
    "ext type 2 holding []": (_envelope(msgpack.ExtType(2, msgpack.packb([]))),
                              "field activations: expected an array (msgpack ext type 1), got msgpack ext type 2"),
    "ext type 1 holding []": (_envelope(msgpack.ExtType(1, msgpack.packb([]))),
                              "malformed or truncated message ({n} bytes): an array (ext type 1) must hold [shape, "
                              "dtype, data], got []"),
    "chunked-array marker without a shape": (
        _envelope({"__msgpack_chunked_array__": True}),
        "field activations: expected an array (msgpack ext type 1), got dict"),
    "body nested 1000 deep": (_envelope(_nested(1000)),
                              "malformed or truncated message ({n} bytes): nested more than 64 levels deep"),
    "negative dimension": (_envelope(_array([-1], "float32", b"")),
                           "malformed or truncated message ({n} bytes): an array's shape must be a list of "
                           "non-negative ints, got [-1]"),
    "object dtype": (_envelope(_array([1], "object", b"12345678")),
                     "malformed or truncated message ({n} bytes): an array's dtype must be one of ['bfloat16', "
                     "'bool', 'float16', 'float32', 'float64', 'int16', 'int32', 'int64', 'int8', 'uint16', "
                     "'uint32', 'uint64', 'uint8'], got 'object'"),
    "data shorter than the shape": (_envelope(_array([8, 16], "float32", b"12")),
                                    "malformed or truncated message ({n} bytes): an array of shape (8, 16) float32 "
                                    "holds 512 bytes of data, got 2 bytes"),
    "version as an array": (msgpack.packb({"body": {}, "kind": "SmashedData",
                                           "sljax": _array([2], "int32", b"\x01\0\0\0\x01\0\0\0")}),
                            "protocol version array([1, 1], dtype=int32) is not supported; expected 1"),
}


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
@pytest.mark.parametrize("case", sorted(MALFORMED_MESSAGES))
def test_a_malformed_message_is_invalid_argument_and_changes_nothing(servers, algorithm, case):
  message, details = MALFORMED_MESSAGES[case]
  details = details.replace("{n}", str(len(message)))
  server = servers(algorithm)
  _refused(server, "Predict", wire.encode({"client": 0, "batch": 8, "message": message}),
           f"Predict: SmashedData: {details}")
  _refused(server, "Forward", wire.encode({"client": 0, "round": 0, "step": 0, "message": message}),
           f"Forward: SmashedData: {details}")


def _hello(setup, **override):
  return {"protocol": msgs.PROTOCOL_VERSION, "client": 0, "cut_shape": [HIDDEN], "cut_dtype": "float32",
          **wire.codec_fields(setup.sl), "samples": 100, **override}


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
def test_malformed_control_maps_are_invalid_argument(setup, servers, algorithm):
  server = servers(algorithm)
  _refused(server, "Handshake", msgpack.packb(_hello(setup, cut_shape=_nested(1000))),
           "Handshake request: nested more than 64 levels deep")
  _refused(server, "Handshake", wire.encode(_hello(setup, cut_shape=[[HIDDEN]])),
           "Handshake request: field 'cut_shape' must be an array of ints, got [[16]]")
  _refused(server, "Handshake", wire.encode(_hello(setup, cut_shape=[True])),
           "Handshake request: field 'cut_shape' must be an array of ints, got [true]")
  _refused(server, "Status", msgpack.packb({"client": _nested(1000)}),
           "Status request: nested more than 64 levels deep")
  for samples in (2**31, 2**64 - 1, -(2**63)):
    _refused(server, "Handshake", wire.encode(_hello(setup, samples=samples)),
             f"Handshake request: field 'samples' must be an int in [1, 2147483647] (max_samples), got {samples}")


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
def test_the_handshake_writes_no_state_and_no_checkpoint(setup, servers, algorithm):
  server = servers(algorithm)
  directory = server._manager.directory
  before, files = server.snapshot(), sorted(os.listdir(directory))
  for samples in (100, 7, 100):
    hello = _call(server, "Handshake", _hello(setup, samples=samples))
    assert hello["algorithm"] == algorithm
  assert server.snapshot() == before
  assert sorted(os.listdir(directory)) == files


def test_splitfed_records_the_sample_count_with_the_put_and_asks_for_it_again_after_a_restart(setup, tmp_path):
  """The sample count a handshake declares lives in memory until the client's `Handover put`, which
  checkpoints it; a server restarted in between asks the client to handshake again."""
  first = _server(setup, "splitfed_v1", checkpoint_dir=tmp_path)
  b = SCHEDULE.batch_size
  smashed = msgs.to_bytes(msgs.SmashedData(np.ones((b, HIDDEN), np.float32), np.zeros((b,), np.int32)))
  weights = msgs.to_bytes(msgs.ModelWeights(jax.device_get(first.state.average)))
  put = {"client": 0, "round": 0, "op": "put", "steps": 1, "wait": 0.0, "message": weights}
  _call(first, "Handshake", _hello(setup, samples=123))
  _call(first, "Forward", {"client": 0, "round": 0, "step": 0, "message": smashed})
  assert _call(first, "Commit", {"client": 0, "round": 0, "step": 0})["durable"] == 1
  assert int(first.state.samples[0]) == 0
  first.close()
  second = _server(setup, "splitfed_v1", checkpoint_dir=tmp_path)  # the restart forgot the declaration
  _refused(second, "Handover", wire.encode(put), "Handover put: client 0's sample count is unknown (the server "
           "restarted since its handshake): handshake again, then put", code=grpc.StatusCode.FAILED_PRECONDITION)
  _call(second, "Handshake", _hello(setup, samples=123))
  saved = second._manager.latest_step()
  assert _call(second, "Handover", put)["ready"]
  assert int(second.state.samples[0]) == 123 and bool(second.state.handed[0])
  assert second._manager.latest_step() == saved + 1  # checkpointed with the put
  second.close()


def test_a_token_without_tls_is_refused_off_this_machine_and_warned_about_on_it(caplog):
  caplog.set_level("WARNING", logger="sljax")
  for target in ("10.1.2.3:50051", "server.example:50051", "dns:///server.example:443", "[2001:db8::1]:50051"):
    with pytest.raises(ValueError, match=r"^token: would travel in clear to '.*', a host other than this machine, "
                                         r"over a channel without TLS; give root_certificates \(sljax client "
                                         r"--tls-ca\) to verify the server, or allow_plaintext_token=True "
                                         r"\(--allow-plaintext-token\) on a network you trust$"):
      T.GrpcTransport(target, token="s3cret")
  assert not caplog.records
  for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/sljax.sock"):
    T.GrpcTransport(target, token="s3cret").close()
    assert f"sending the bearer token to {target} without TLS" in caplog.records[-1].getMessage()
  T.GrpcTransport("10.1.2.3:50051", token="s3cret", allow_plaintext_token=True).close()
  assert "to 10.1.2.3:50051 without TLS" in caplog.records[-1].getMessage()
  count = len(caplog.records)
  T.GrpcTransport("10.1.2.3:50051").close()  # no token, nothing to leak
  T.GrpcTransport("10.1.2.3:50051", token="s3cret", root_certificates=b"a CA").close()
  assert len(caplog.records) == count


def test_credentials_are_checked_before_the_body_is_read(servers):
  server = servers("parallel_sl")
  served = []

  def handler(method, request, **kw):
    served.append(method)
    return server.handle(method, request, **kw)

  running = T.serve(handler, authenticate=server.authenticate_metadata, max_message_bytes=1 << 25)
  try:
    before = server.snapshot()
    big = wire.encode({"client": 0, "round": 0, "step": 0, "message": b"\0" * (8 << 20)})
    assert raw_call(running.port, "Forward", big, "forged") == (
        grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not one of this server's")
    assert raw_call(running.port, "Status", wire.encode({"client": 0}), None) == (
        grpc.StatusCode.UNAUTHENTICATED, "no credentials: send 'authorization: Bearer <token>' metadata or a client "
                                         "certificate")
    assert served == [] and server.snapshot() == before  # refused before the handler
    code, response = raw_call(running.port, "Status", wire.encode({"client": 0}), "token-zero")
    assert code == grpc.StatusCode.OK and wire.decode("Status", response, response=True)["round"] == 0
    assert served == ["Status"]
  finally:
    running.stop()
  # The refusal never asks gRPC for the request: a request-streaming handler that aborts at once.
  details = type("Details", (), {"method": wire.method_path("Forward"),
                                 "invocation_metadata": (("authorization", "Bearer forged"),)})()
  refusal = T.rpc._Authenticator(server.authenticate_metadata).intercept_service(
      lambda d: pytest.fail("a refused call reached the service"), details)
  assert refusal.request_streaming and not refusal.response_streaming

  class Context:
    def abort(self, code, text):
      raise RuntimeError(code, text)

  def unread():
    pytest.fail("the request was read")
    yield

  with pytest.raises(RuntimeError) as e:
    refusal.stream_unary(unread(), Context())
  assert e.value.args == (grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not one of this server's")


def test_calls_beyond_maximum_concurrent_rpcs_are_refused_at_once_and_retried():
  release, started = threading.Event(), threading.Semaphore(0)

  def handler(method, request, *, metadata, peer_names):
    del method, metadata, peer_names
    started.release()
    release.wait(20)
    return request

  def authenticate(metadata):
    if metadata.get("authorization") != "Bearer ok":
      raise T.TransportError(grpc.StatusCode.UNAUTHENTICATED, "not ok")

  running = T.serve(handler, max_workers=2, maximum_concurrent_rpcs=2, authenticate=authenticate)
  try:
    held = [threading.Thread(target=raw_call, args=(running.port, "Status", b"x", "ok")) for _ in range(2)]
    for t in held:
      t.start()
    assert started.acquire(timeout=20) and started.acquire(timeout=20)
    assert raw_call(running.port, "Status", b"y", "ok") == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                         "Concurrent RPC limit exceeded!")
    assert raw_call(running.port, "Status", b"y", "bad")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    link = T.GrpcTransport(f"127.0.0.1:{running.port}", token="ok", retries=20, backoff=0.05, max_backoff=0.2)
    threading.Timer(0.5, release.set).start()
    assert link.call("Status", b"z") == b"z"  # retried until the held calls were done
    link.close()
    for t in held:
      t.join(20)
  finally:
    release.set()
    running.stop()


def test_long_polls_cannot_starve_other_calls(servers):
  """Ten long polls of one client hold one worker: each ends the wait of the one before (ABORTED),
  so a server with a few workers still answers another client at once, and nothing changes."""
  server = servers("splitfed_v1")
  before = server.snapshot()
  running = T.serve(server.handle, max_workers=SCHEDULE.num_clients + 2)
  get = {"client": 0, "round": 1, "op": "get", "steps": 0, "wait": 2.0, "message": None}  # round 1 has not begun
  answers = []
  try:
    polls = [threading.Thread(target=lambda: answers.append(raw_call(running.port, "Handover", wire.encode(get),
                                                                 "token-zero"))) for _ in range(10)]
    for t in polls:
      t.start()
      time.sleep(0.02)
    start = time.monotonic()
    code, response = raw_call(running.port, "Status", wire.encode({"client": 1}), "token-one")
    assert code == grpc.StatusCode.OK and time.monotonic() - start < 1.0
    for t in polls:
      t.join(20)
  finally:
    running.stop()
  aborted = (grpc.StatusCode.ABORTED, "Handover: a newer call of client 0 waits in this one's place (a client has one "
                                      "waiting call at a time)")
  assert answers.count(aborted) == 9
  (last,) = [a for a in answers if a != aborted]
  assert last[0] == grpc.StatusCode.OK and not wire.decode("Handover", last[1], response=True)["ready"]
  assert server.snapshot() == before


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
def test_predict_runs_programs_for_power_of_two_buckets_without_the_lock(servers, algorithm):
  server = servers(algorithm)
  party = jax.device_get(server._predict_party(0))
  eval_ = server._server_eval
  held = []

  def unlocked(*args):  # the server's lock is free while inference runs: another thread can take it
    took = []

    def take():
      took.append(server._cond.acquire(blocking=False))
      if took[0]:
        server._cond.release()

    other = threading.Thread(target=take)
    other.start()
    other.join()
    held.append(not took[0])
    return eval_(*args)

  server._server_eval = unlocked
  try:
    before, programs = server.snapshot(), eval_._cache_size()
    x = np.random.default_rng(0).normal(size=(8, HIDDEN)).astype(np.float32)
    expected = np.asarray(eval_(party, x).logits)  # each row's logits: rows do not mix
    for batch in (1, 3, 5, 8, 7):
      message = msgs.to_bytes(msgs.SmashedData(x[:batch]))
      got = _call(server, "Predict", {"client": 0, "batch": batch, "message": message})
      logits = msgs.from_bytes(msgs.Prediction(jax.ShapeDtypeStruct((batch, 10), np.float32)), got["message"]).logits
      np.testing.assert_allclose(logits, expected[:batch], atol=1e-6, rtol=0)
  finally:
    server._server_eval = eval_
  assert eval_._cache_size() - programs <= 3  # buckets 1, 4 and 8 (8 compiled for the reference)
  assert held == [False] * 5 and server.snapshot() == before
