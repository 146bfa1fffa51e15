"""A seeded fuzz of every server: malformed and mutated requests over every method each serves, for
every algorithm of `sljax.transport.ALGORITHMS`, sequential SL (vanilla, U-shaped, with sealed
hand-offs), the vertical server and the `Align` method (an `AlignServer`, and the parallel SL and
vertical servers with an `aligner` set). None may end in INTERNAL (an exception other than a
`TransportError`), every refusal carries a status code other than INTERNAL and a message, and none
that is refused may change the server's state (its `snapshot()` bytes, and the aligner's state);
ABORTED, the answer of a call whose step was discarded or which a newer call replaced, is the step's
outcome, not a refusal of the request.

Requests are valid ones mutated: a field replaced by a value of another type, size or nesting, a
field dropped or added, the request's or its message's bytes flipped, cut or extended, the
message's arrays replaced by malformed or absurd ones, the credentials or the method's name changed.
Each server gets `REQUESTS` of them: the first ones go through every kind of mutation in turn, the
rest are drawn at random; every method the server serves and every kind of mutation is reached. A
mutated request that is still valid is served as any other, so the run moves on and later mutations
meet other states; if it waits (a Forward at the barrier, a long poll), the client's next waiting
call (a `Handover get` that waits 0 s) ends its wait.

Set-up: the demo MLP of tests/test_faults.py (digits, 64 -> 32 | -> 10, and its U-shaped and
heterogeneous cuts of 64 -> 32 -> 32 -> 10), two clients, 2 rounds of 3 steps of 16 rows, so the
servers' programs are those the fault tests compile; the vertical server of three parties of
tests/test_vertical_network.py. Each server is built once, by its test.
"""

import threading
import time

import jax
import msgpack
import numpy as np
import optax
import pytest
from flax import linen as nn

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.align import member_answer, member_init, member_query
from sljax.privacy import handoff
from sljax.protocol import ArraySpec
from sljax.transport import demo, wire
from sljax.transport import schedule as sched

HIDDEN = (32,)
DROPOUT = 0.25
LR = 2e-3
SCHEDULE = T.Schedule(num_clients=2, rounds=2, local_steps=3, batch_size=16)
TOKENS = ("token-zero", "token-one")
REQUESTS = 90  # per server
HANDOFF_KEY = bytes(range(32))

# The vertical server of tests/test_vertical_network.py (its programs): the label party "bank" serves,
# "network" (client 1) and "merchant" (client 2) call.
PARTIES = ("bank", "network", "merchant")
WIDTHS = (5, 3, 4)
ROWS, BATCH = 48, 16
VERTICAL_TOKENS = ("", "token-network", "token-merchant")

# The servers the fuzz runs, by test id.
SERVERS = (*T.ALGORITHMS, "sequential_sl", "sequential_sl_u", "sequential_sl_sealed", "vertical_sl", "align")


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=HIDDEN, dropout=DROPOUT, lr=LR)


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
              _ext_array([2], "object", b"12345678"), _ext_array([16, 32], "float32", b"\0" * 10),
              {"__msgpack_chunked_array__": True}, {"__msgpack_chunked_array__": True, "shape": {"0": 4},
                                                    "chunks": {}}]

# What an array in a message is replaced with.
ODD_ARRAYS = [msgpack.ExtType(2, msgpack.packb([])), msgpack.ExtType(3, b"\0"), msgpack.ExtType(1, b""),
              msgpack.ExtType(1, msgpack.packb([])), msgpack.ExtType(127, b"abc"), _ext_array([-1], "float32", b""),
              _ext_array([2**40], "uint8", b""), _ext_array([2], "object", b"12345678"),
              _ext_array([16, 32], "float32", b"\0" * 10), _ext_array([[8]], "float32", b""),
              {"__msgpack_chunked_array__": True}, {"__msgpack_chunked_array__": True, "shape": {"0": 4}, "chunks": {}},
              _nested(100), None, [], 1.5]

# The kinds of mutation: of a request's fields, of its bytes, of its message (an sljax message in a
# bin field), of its credentials or method name; "none" leaves it valid.
KINDS = ("field", "drop", "add", "message array", "message envelope", "message values", "message extra",
         "message bytes", "bytes", "token", "method", "none")
WEIGHTS = np.array([0.14, 0.05, 0.05, 0.12, 0.04, 0.1, 0.03, 0.05, 0.1, 0.07, 0.05, 0.2])


# ---- the servers --------------------------------------------------------------------------------


def _sl_for(setup, algorithm):
  """The set-up and options of `algorithm` (as tests/test_faults.py builds them)."""
  opt = optax.adam(LR)
  deeper = sljax.models.mlp(hidden=HIDDEN + HIDDEN, dropout=DROPOUT)
  if algorithm in ("parallel_sl_u", "sequential_sl_u"):
    model = sljax.cut(deeper, 1, 2)
    return model, sljax.u_shaped(model, client_optimizer=opt, server_optimizer=opt), {}
  if algorithm == "heterogeneous_parallel_sl":
    model = sljax.cut(deeper, 1)
    return model, sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt), {"cuts": [1, 2]}
  return setup.model, setup.sl, {}


def _aligner(members):
  return T.Aligner([f"id-{i}" for i in range(8)], members=members, name="leader")


def _vertical_server():
  bottoms = [sljax.sequential(*sljax.models.mlp(hidden=(8,), num_classes=6, dropout=0.25)) for _ in range(2)]
  bottoms.append(sljax.sequential(*sljax.models.mlp(hidden=(8,), num_classes=6)))
  model = sljax.vertical_model(bottoms, sljax.merges.concat(), nn.Dense(2), names=PARTIES, label_party="bank")
  sl = sljax.vertical_sl(model, party_optimizers=optax.adam(1e-2), top_optimizer=optax.adam(1e-2))
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(ROWS, w)).astype(np.float32) for w in WIDTHS]
  test = rng.normal(size=(10, WIDTHS[0])).astype(np.float32)  # the bank's own columns for inference
  return T.VerticalServer(sl, labels=(xs[0][:, 0] > 0).astype(np.int32), features=xs[0],
                          input_specs=[ArraySpec.of(x) for x in xs], key=jax.random.key(7), rounds=2,
                          batch_size=BATCH, local_steps=3, predict_features=test,
                          tokens={t: k for k, t in enumerate(VERTICAL_TOKENS) if t}, lease_seconds=60.0)


def _server(setup, name):
  """(server, tokens: client id -> token)."""
  tokens = dict(enumerate(TOKENS))
  if name == "vertical_sl":  # with the aligner a restarted party still aligns with (docs: sljax.transport.alignment)
    server = _vertical_server()
    server.aligner = _aligner({1: PARTIES[1], 2: PARTIES[2]})
    return server, {1: VERTICAL_TOKENS[1], 2: VERTICAL_TOKENS[2]}
  if name == "align":
    return T.AlignServer(_aligner({0: "zero", 1: "one"}), tokens={t: k for k, t in tokens.items()}), tokens
  algorithm = name.removesuffix("_sealed")
  model, sl, options = _sl_for(setup, algorithm)
  kw = {"schedule": SCHEDULE, "input_spec": sljax.ArraySpec.of(setup.dataset.x_train), "key": jax.random.key(0),
        "tokens": {t: k for k, t in tokens.items()}, "max_samples": 10_000}
  if algorithm.startswith("sequential"):
    server = T.SplitServer(model, sl, sealed_handoffs=name.endswith("_sealed"), **kw)
  else:
    server = T.ConcurrentServer(model, sl, algorithm=algorithm, options=options, **kw)
  if name == "parallel_sl":  # Align beside training
    server.aligner = _aligner({0: "zero", 1: "one"})
  return server, tokens


# ---- valid requests -------------------------------------------------------------------------------


def _fill(template, rng):
  """A message of `template`'s arrays: normal floats, labels in range."""
  def one(t):
    if np.issubdtype(t.dtype, np.floating):
      return rng.normal(size=t.shape).astype(t.dtype)
    return (np.arange(int(np.prod(t.shape))) % 2).reshape(t.shape).astype(t.dtype)
  return jax.tree.map(one, template)


class Requests:
  """Valid requests to one server, one per method and op, at the client's position (from `Status`)."""

  def __init__(self, name, server, tokens):
    self.name, self.server, self.tokens = name, server, tokens
    self.queries = {}  # client -> the latest Align query the leader sent it
    self.members = {k: member_init([f"id-{i}" for i in range(k, 8 + k)]) for k in tokens}
    self.intersect = {k: member_query(m)[1] for k, m in self.members.items()}
    if name == "sequential_sl_sealed":  # a half sealed as a client seals it (the server reads only its size and head)
      half = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), server.coordinator.half_template)
      self.sealed = {(r, k): handoff.seal(half, HANDOFF_KEY, run="fuzz", round=r, client=k)
                     for r in range(SCHEDULE.rounds) for k in tokens}

  def seen(self, client, method, fields, response):
    """A served request: an Align query's answer is what the next valid Align answer answers."""
    if method == "Align" and fields.get("op") == "query":
      answer = wire.decode("Align", response, response=True)
      if answer["request"] is not None:
        self.queries[client] = answer["request"]

  def _align(self, client):
    none = {"request": None, "setup": None, "response": None}
    requests = [("Align", {"client": client, "op": "query", "wait": 0.0, **none}),
                ("Align", {"client": client, "op": "intersect", "wait": 0.0,
                           **{**none, "request": self.intersect[client]}})]
    query = self.queries.get(client)
    if query is not None:
      _, setup, response = member_answer(self.members[client], query)
      requests.append(("Align", {"client": client, "op": "answer", "wait": 0.0, **none, "setup": setup,
                                 "response": response}))
    return requests

  def __call__(self, client):
    server = self.server
    if self.name == "align":
      return [*self._align(client), ("Status", {"client": client})]
    token = {wire.TOKEN_METADATA: f"Bearer {self.tokens[client]}"}
    position = wire.decode("Status", server.handle("Status", wire.encode({"client": client}), metadata=token),
                           response=True)
    r, s = position["round"], min(position["step"], SCHEDULE.local_steps - 1)
    rng = np.random.default_rng([client, r, s])
    coordinator = server.coordinator
    smashed = msgs.to_bytes(_fill(coordinator.smashed_templates[client], rng))
    spec = server._cut_spec_of(client)
    batch = 10 if self.name == "vertical_sl" else SCHEDULE.batch_size
    predict = server._party_template(batch, client) if self.name == "vertical_sl" else server._predict_template(
        batch, spec)
    samples = server.samples if self.name == "vertical_sl" else 100
    handshake = {"protocol": msgs.PROTOCOL_VERSION, "client": client, "cut_shape": list(spec.shape),
                 "cut_dtype": spec.dtype, **server._codecs_of(client), "samples": samples}
    if server.handoff == "sealed":
      handshake["handoff"] = "sealed"
    get = {"client": client, "op": "get", "steps": 0, "wait": 0.0, "message": None}
    predict = {"client": client, "batch": batch, "message": msgs.to_bytes(_fill(predict, rng))}
    if self.name == "vertical_sl":
      predict["offset"] = 0
    requests = [
        ("Handshake", handshake),
        ("Status", {"client": client}),
        ("Handover", {**get, "round": 0}),
        ("Handover", {**get, "round": r + 1}),
        ("Handover", {"client": client, "round": r, "op": "leave", "steps": 0, "wait": 0.0, "message": None}),
        ("Forward", {"client": client, "round": r, "step": s, "message": smashed}),
        ("Forward", {"client": client, "round": r, "step": s, "message": smashed}),
        ("Commit", {"client": client, "round": r, "step": s}),
        ("Commit", {"client": client, "round": r, "step": s}),
        ("Predict", predict),
        *self._align(client),
    ]
    if coordinator.tail_template is not None:
      requests.append(("Backward", {"client": client, "round": r, "step": s,
                                    "message": msgs.to_bytes(_fill(coordinator.tail_template, rng))}))
    put = None
    if coordinator.averages:
      put = msgs.to_bytes(msgs.ModelWeights(jax.device_get(server.state.average)))
    elif self.name == "sequential_sl_sealed":
      put = self.sealed[min(r, SCHEDULE.rounds - 1), client]
    elif self.name.startswith("sequential"):
      put = msgs.to_bytes(_fill(coordinator.half_template, rng))
    if put is not None:
      requests.append(("Handover", {"client": client, "round": r, "op": "put", "steps": SCHEDULE.local_steps,
                                    "wait": 0.0, "message": put}))
    return requests


# ---- mutations ------------------------------------------------------------------------------------


def _mutate_message(rng, message: bytes, kind: str) -> bytes:
  try:
    envelope = msgpack.unpackb(message, raw=False)
  except ValueError:  # a sealed client half: bytes the server cannot read
    envelope = None
  if kind == "message bytes" or not isinstance(envelope, dict):
    return _mutate_bytes(rng, message)
  body = envelope["body"]
  if kind == "message array" and body:  # an array (or the whole body) replaced
    body[rng.choice(sorted(body))] = ODD_ARRAYS[rng.integers(len(ODD_ARRAYS))]
  elif kind == "message envelope":
    envelope[rng.choice(["sljax", "kind", "body"])] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
  elif kind == "message values" and body:  # finite but absurd values, or labels out of range
    name = rng.choice(sorted(body))
    if isinstance(body[name], msgpack.ExtType):
      shape, dtype, data = msgpack.unpackb(body[name].data, raw=False)
      values = np.frombuffer(data, dtype).copy()
      if values.size:
        odd = [3e38, -1e7, 2e6, np.nan, np.inf] if values.dtype.kind == "f" else [10**6, -5, 2**31 - 1]
        values[rng.integers(values.size)] = odd[rng.integers(len(odd))]
      body[name] = _ext_array(shape, dtype, values.tobytes())
  elif kind == "message extra":
    envelope["extra"] = 1
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


def _is_message(method, fields):
  """Whether the request carries an sljax message (Align's bin fields hold PSI bytes)."""
  return method != "Align" and isinstance(fields.get("message"), bytes)


def _mutated(rng, requests, kind, clients, tokens):
  """(method, request bytes, token, client, fields or None, kind) mutated from a valid request of a random client."""
  client = clients[rng.integers(len(clients))]
  valid = requests(client)
  if kind == "none" and rng.random() < 0.7:  # mostly the client's next step, so the run goes on
    valid = [(m, f) for m, f in valid if m in ("Forward", "Backward", "Commit") or f.get("op") == "put"] or valid
  method, fields = valid[rng.integers(len(valid))]
  carrying = [v for v in valid if _is_message(*v)]
  if kind.startswith("message") and not _is_message(method, fields):  # one that carries a message
    method, fields = carrying[rng.integers(len(carrying))] if carrying else (method, fields)
  fields = dict(fields)
  token = tokens[client]
  if kind == "field":
    name = rng.choice(sorted(fields))
    fields[name] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    if method == "Align" and name == "wait" and isinstance(fields[name], (int, float)) and fields[name] > 0:
      fields[name] = 0.01  # a long wait is no malformed request: it would only wait (the other member never answers)
  elif kind == "drop":
    del fields[rng.choice(sorted(fields))]
  elif kind == "add":
    fields["extra"] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
  elif kind.startswith("message") and _is_message(method, fields):
    fields["message"] = _mutate_message(rng, fields["message"], kind)
  elif kind.startswith("message"):  # the align server: a PSI payload's bytes, or a field
    payloads = sorted(n for n in ("request", "setup", "response") if isinstance(fields.get(n), bytes))
    name = rng.choice(payloads) if payloads else rng.choice(sorted(fields))
    fields[name] = _mutate_bytes(rng, fields[name]) if payloads else ODD_VALUES[rng.integers(len(ODD_VALUES))]
  elif kind == "bytes":
    return method, _mutate_bytes(rng, msgpack.packb(fields)), token, client, None
  elif kind == "token":
    token = [None, "forged", tokens[clients[(clients.index(client) + 1) % len(clients)]], "Bearer " + token,
             ""][rng.integers(5)]
  elif kind == "method":
    method = [method, "Steal", "", "handshake", "Forward\0"][rng.integers(5)]
  return method, msgpack.packb(fields), token, client, fields


def _serve(server, method, request, token, into):
  metadata = {} if token is None else {wire.TOKEN_METADATA: f"Bearer {token}"}
  try:
    into.append(("ok", server.handle(method, request, metadata=metadata, peer_names=())))
  except T.TransportError as e:
    into.append(("refused", e))
  except Exception as e:  # noqa: BLE001 -- what the gRPC layer would answer INTERNAL
    into.append(("internal", e))


def _end_waits(server, tokens):
  """Ends every waiting call: each waiting client's next waiting call (a `Handover get` that waits 0 s) takes
  its place."""
  for k in list(getattr(server, "_waiting", {})):
    end = wire.encode({"client": k, "round": SCHEDULE.rounds, "op": "get", "steps": 0, "wait": 0.0, "message": None})
    server.handle("Handover", end, metadata={wire.TOKEN_METADATA: f"Bearer {tokens[k]}"}, peer_names=())


def _call(server, method, request, token, client, tokens, requests):
  """Serves one request in a thread. If it waits (at a barrier), the other clients send their valid
  request of the same method, so the step can go on; whatever still waits then is ended. Returns
  ("ok" | "refused" | "waited" | "internal", detail): "waited", refused after it waited (the others
  may have changed the state meanwhile)."""
  outcome, helped = [], []
  main = threading.Thread(target=_serve, args=(server, method, request, token, outcome))
  main.start()
  waiting = getattr(server, "_waiting", {})
  helpers, waited, since = [], False, 0.0
  while main.is_alive():
    main.join(0.002)
    if not main.is_alive() or client not in waiting:
      continue
    waited = True
    if not helpers and method in ("Forward", "Backward", "Commit"):
      for other in tokens:
        same = [fields for m, fields in requests(other) if m == method] if other != client else []
        if same:
          helpers.append((other, threading.Thread(target=_serve, args=(server, method, msgpack.packb(same[0]),
                                                                       tokens[other], helped))))
          helpers[-1][1].start()
      since = time.monotonic()
    elif time.monotonic() - since > 0.5 or all(not h.is_alive() or k in waiting for k, h in helpers):
      _end_waits(server, tokens)
  while any(h.is_alive() for _, h in helpers):
    for _, h in helpers:
      h.join(0.01)
    _end_waits(server, tokens)
  assert all(kind != "internal" for kind, _ in helped), helped
  kind, detail = outcome[0]
  return ("waited" if waited and kind == "refused" else kind), detail


def _snapshot(server):
  """The server's state as bytes (training state and staged steps, the sample counts handshakes declared, and
  the aligner's state)."""
  training = b"" if isinstance(server, T.AlignServer) else (server.snapshot(), repr(server.s.volatile.declared))
  aligner = server.aligner
  if aligner is None:
    return training
  with aligner._cond:
    state = aligner.state
    return training, repr((state.keys, state.held, aligner._shared, sorted(aligner._answered)))


@pytest.mark.parametrize("name", SERVERS)
def test_fuzzed_requests_never_end_in_internal_and_refused_ones_change_nothing(setup, name):
  server, tokens = _server(setup, name)
  requests = Requests(name, server, tokens)
  clients = sorted(tokens)
  rng = np.random.default_rng(0)
  seen = {"ok": 0, "refused": 0, "waited": 0}
  methods, kinds = set(), set()
  for i in range(REQUESTS):
    kind = KINDS[i % len(KINDS)] if i < 2 * len(KINDS) else KINDS[rng.choice(len(KINDS), p=WEIGHTS / WEIGHTS.sum())]
    method, request, token, client, fields = _mutated(rng, requests, kind, clients, tokens)
    before = _snapshot(server)
    outcome, detail = _call(server, method, request, token, client, tokens, requests)
    assert outcome != "internal", (name, kind, method, request[:200], repr(detail))
    seen[outcome] += 1
    methods.add(method)
    kinds.add(kind)
    if outcome != "ok":
      assert detail.code.name != "INTERNAL" and detail.details, detail
    if outcome == "refused" and detail.code.name != "ABORTED":  # ABORTED: the step's outcome (discarded), no refusal
      assert _snapshot(server) == before, (name, kind, method, request[:200], detail)
    elif outcome == "ok" and method in wire.RESPONSES:
      wire.decode(method, detail, response=True)  # a well-formed answer
      if fields is not None:
        requests.seen(client, method, fields, detail)
  served = {m for c in clients for m, _ in requests(c)}
  assert served <= methods and kinds == set(KINDS), (served - methods, set(KINDS) - kinds)
  assert seen["refused"] > REQUESTS // 3 and seen["ok"] > 0, seen
