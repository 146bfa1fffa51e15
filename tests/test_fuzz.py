"""A seeded fuzz of the server: a few hundred malformed and mutated requests over every method, for
parallel SL and SplitFed v1. None may end in INTERNAL (an exception other than a `TransportError`),
and none that is refused may change the server's state.

Requests are valid ones mutated: a field replaced by a value of another type, size or nesting, a
field dropped or added, the request's or its message's bytes flipped, cut or extended, the
message's arrays replaced by malformed ones, the credentials changed. A mutated request that is
still valid is served as any other; if it waits (a Forward at the barrier, a long poll), the
client's next waiting call (a `Handover get` that waits 0 s) ends its wait.
"""

import threading

import jax
import msgpack
import numpy as np
import pytest

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.transport import demo, wire

SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=2, batch_size=8)
TOKENS = ("token-zero", "token-one")
HIDDEN = 16
REQUESTS = 400  # per algorithm


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(HIDDEN,), lr=1e-3)


def _nested(depth):
  value = 0
  for _ in range(depth):
    value = [value]
  return value


def _ext_array(shape, dtype, data):
  return msgpack.ExtType(1, msgpack.packb([shape, dtype, data]))


# Values a field (or an array in a message) is replaced with.
ODD_VALUES = [None, True, False, -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -0.0, float("nan"),
              float("inf"), "", "x" * 300, b"", b"\xff" * 64, [], {}, [1, "a"], {"k": 1}, _nested(100), _nested(20),
              msgpack.ExtType(2, msgpack.packb([])), msgpack.ExtType(3, b"\0"), msgpack.ExtType(1, b""),
              msgpack.ExtType(127, b"abc"), _ext_array([-1], "float32", b""), _ext_array([2**40], "uint8", b""),
              _ext_array([2], "object", b"12345678"), _ext_array([8, HIDDEN], "float32", b"\0" * 10),
              {"__msgpack_chunked_array__": True}, {"__msgpack_chunked_array__": True, "shape": {"0": 4},
                                                    "chunks": {}}]


# What an array in a message is replaced with.
ODD_ARRAYS = [msgpack.ExtType(2, msgpack.packb([])), msgpack.ExtType(3, b"\0"), msgpack.ExtType(1, b""),
              msgpack.ExtType(1, msgpack.packb([])), msgpack.ExtType(127, b"abc"), _ext_array([-1], "float32", b""),
              _ext_array([2**40], "uint8", b""), _ext_array([2], "object", b"12345678"),
              _ext_array([8, HIDDEN], "float32", b"\0" * 10), _ext_array([[8]], "float32", b""),
              {"__msgpack_chunked_array__": True}, {"__msgpack_chunked_array__": True, "shape": {"0": 4}, "chunks": {}},
              _nested(100), None, [], 1.5]


def _valid_requests(setup, server, client):
  """One valid request per method at the client's position (from `Status`), as field maps."""
  status = server.handle("Status", wire.encode({"client": client}),
                         metadata={wire.TOKEN_METADATA: f"Bearer {TOKENS[client]}"}, peer_names=())
  position = wire.decode("Status", status, response=True)
  r, s = position["round"], min(position["step"], SCHEDULE.local_steps - 1)
  b = SCHEDULE.batch_size
  rows = np.random.default_rng(client).normal(size=(b, HIDDEN)).astype(np.float32)
  smashed = msgs.to_bytes(msgs.SmashedData(rows, np.arange(b, dtype=np.int32) % 10))
  weights = msgs.to_bytes(msgs.ModelWeights(jax.device_get(server.state.average))) if server.algorithm.startswith(
      "splitfed") else msgs.to_bytes(msgs.CutGradient(rows))
  return [
      ("Handshake", {"protocol": msgs.PROTOCOL_VERSION, "client": client, "cut_shape": [HIDDEN], "cut_dtype": "float32",
                     **wire.codec_fields(setup.sl), "samples": 100}),
      ("Status", {"client": client}),
      ("Handover", {"client": client, "round": 0, "op": "get", "steps": 0, "wait": 0.0, "message": None}),
      ("Handover", {"client": client, "round": r + 1, "op": "get", "steps": 0, "wait": 0.0, "message": None}),
      ("Handover", {"client": client, "round": r, "op": "put", "steps": SCHEDULE.local_steps, "wait": 0.0,
                    "message": weights}),
      ("Forward", {"client": client, "round": r, "step": s, "message": smashed}),
      ("Forward", {"client": client, "round": r, "step": s, "message": smashed}),
      ("Backward", {"client": client, "round": r, "step": s, "message": smashed}),
      ("Commit", {"client": client, "round": r, "step": s}),
      ("Commit", {"client": client, "round": r, "step": s}),
      ("Predict", {"client": client, "batch": b, "message": msgs.to_bytes(msgs.SmashedData(rows))}),
      ("Align", {"client": client, "op": "query", "wait": 0.0, "request": None, "setup": None, "response": None}),
  ]


def _mutate_message(rng, message: bytes) -> bytes:
  envelope = msgpack.unpackb(message, raw=False)
  body = envelope["body"]
  choice = rng.choice(6, p=[0.45, 0.1, 0.2, 0.05, 0.1, 0.1])
  if choice == 0 and body:  # an array (or the whole body) replaced
    body[rng.choice(sorted(body))] = ODD_ARRAYS[rng.integers(len(ODD_ARRAYS))]
  elif choice == 1:
    envelope[rng.choice(["sljax", "kind", "body"])] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
  elif choice == 2 and body:  # finite but absurd values, or labels out of range
    name = rng.choice(sorted(body))
    if isinstance(body[name], msgpack.ExtType):
      shape, dtype, data = msgpack.unpackb(body[name].data, raw=False)
      values = np.frombuffer(data, dtype).copy()
      if values.size:
        odd = [3e38, -1e7, 2e6] if values.dtype.kind == "f" else [10**6, -5, 2**31 - 1]
        values[rng.integers(values.size)] = odd[rng.integers(len(odd))]
      body[name] = _ext_array(shape, dtype, values.tobytes())
  elif choice == 3:
    envelope["extra"] = 1
  else:
    return _mutate_bytes(rng, message)
  return msgpack.packb(envelope)


def _mutate_bytes(rng, data: bytes) -> bytes:
  data = bytearray(data)
  choice = rng.integers(3)
  if choice == 0 and data:
    for _ in range(1 + rng.integers(4)):
      data[rng.integers(len(data))] = rng.integers(256)
  elif choice == 1:
    data = data[:rng.integers(len(data) + 1)]
  else:
    at = rng.integers(len(data) + 1)
    data[at:at] = bytes(rng.integers(0, 256, size=1 + rng.integers(16), dtype=np.uint8))
  return bytes(data)


def _mutated(rng, setup, server):
  """A (method, request bytes, token) mutated from a valid request of a random client."""
  client = int(rng.integers(SCHEDULE.num_clients))
  requests = _valid_requests(setup, server, client)
  method, fields = requests[rng.integers(len(requests))]
  fields = dict(fields)
  token = TOKENS[client]
  choice = rng.choice(8, p=[0.2, 0.05, 0.05, 0.35, 0.1, 0.07, 0.05, 0.13])
  if choice == 7:  # unmutated: the run moves on, so later mutations meet other states
    pass
  elif choice == 0:
    fields[rng.choice(sorted(fields))] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
  elif choice == 1:
    del fields[rng.choice(sorted(fields))]
  elif choice == 2:
    fields["extra"] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
  elif choice == 3 and isinstance(fields.get("message"), bytes):
    fields["message"] = _mutate_message(rng, fields["message"])
  elif choice == 4:
    return method, _mutate_bytes(rng, msgpack.packb(fields)), token
  elif choice == 5:
    token = [None, "forged", TOKENS[1 - client], "Bearer " + token, ""][rng.integers(5)]
  else:
    method = [method, "Steal", "", "handshake", "Forward\0"][rng.integers(5)]
  return method, msgpack.packb(fields), token


def _call(server, method, request, token, client):
  """Serves one request in a thread; ends its wait if it waits. Returns ("ok" | "refused" | "ended"
  | "internal", detail)."""
  outcome = []

  def serve():
    metadata = {} if token is None else {wire.TOKEN_METADATA: f"Bearer {token}"}
    try:
      outcome.append(("ok", server.handle(method, request, metadata=metadata, peer_names=())))
    except T.TransportError as e:
      outcome.append(("refused", e))
    except Exception as e:  # noqa: BLE001 -- what the gRPC layer would answer INTERNAL
      outcome.append(("internal", e))

  thread = threading.Thread(target=serve)
  thread.start()
  ended = False
  while thread.is_alive():
    thread.join(0.002)
    if thread.is_alive() and client in server._waiting:  # it waits: the client's next waiting call ends it
      end = wire.encode({"client": client, "round": SCHEDULE.rounds, "op": "get", "steps": 0, "wait": 0.0,
                         "message": None})
      server.handle("Handover", end, metadata={wire.TOKEN_METADATA: f"Bearer {TOKENS[client]}"}, peer_names=())
      ended = True
  thread.join()
  kind, detail = outcome[0]
  return ("ended" if ended and kind == "refused" else kind), detail


@pytest.mark.parametrize("algorithm", ["parallel_sl", "splitfed_v1"])
def test_fuzzed_requests_never_end_in_internal_and_refused_ones_change_nothing(setup, algorithm):
  server = T.ConcurrentServer(setup.model, setup.sl, algorithm=algorithm, schedule=SCHEDULE,
                              input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                              tokens=dict(zip(TOKENS, range(2))), max_samples=10_000)
  rng = np.random.default_rng(0)
  seen = {"ok": 0, "refused": 0, "ended": 0}
  methods = set()
  for _ in range(REQUESTS):
    method, request, token = _mutated(rng, setup, server)
    client = TOKENS.index(token) if token in TOKENS else 0
    before = server.snapshot()
    kind, detail = _call(server, method, request, token, client)
    assert kind != "internal", (method, request[:200], repr(detail))
    seen[kind] += 1
    methods.add(method)
    if kind == "refused":
      assert detail.code.name != "INTERNAL", detail
      assert server.snapshot() == before, (method, request[:200], detail)
    elif kind == "ok" and method in wire.RESPONSES:
      wire.decode(method, detail, response=True)  # a well-formed answer
  assert set(wire.METHODS) <= methods
  assert seen["refused"] > REQUESTS // 2 and seen["ok"] > 0, seen
