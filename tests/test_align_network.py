"""Private alignment between processes (sljax.transport.alignment): the PSI of sljax.align over the Align method.

Three parties: the merchant (the label party) serves, the bank (client 0) and the card network (client 1) align
against it, in threads, over an in-process transport and over a loopback gRPC channel. Every byte of every call,
both ways, is recorded and searched for the parties' IDs.
"""

import hashlib
import threading

import grpc
import numpy as np
import private_set_intersection.python as psi
import pytest
from transport_helpers import raw_call, run_in_threads

import sljax
from sljax import transport as T
from sljax.align import member_answer, member_init
from sljax.transport import wire

MEMBERS = {0: "bank", 1: "network"}
TOKENS = {"bank": "token-bank", "network": "token-network"}


def _ids():
  """Three parties' customer lists over 200 customers: each holds a different subset, in its own order."""
  rng = np.random.default_rng(1)
  everyone = np.array([f"cust-{i:05d}" for i in range(200)])
  held = {"merchant": rng.random(200) < 0.8, "bank": rng.random(200) < 0.7, "network": rng.random(200) < 0.9}
  return {name: list(rng.permutation(everyone[mask])) for name, mask in held.items()}


def _server(ids):
  aligner = T.Aligner(ids["merchant"], members=MEMBERS, name="merchant")
  return T.AlignServer(aligner, tokens={TOKENS[name]: k for k, name in MEMBERS.items()})


class Recording:
  """A transport that keeps the bytes of every request and response it carries."""

  def __init__(self, inner):
    self.inner, self.sent = inner, []

  def call(self, method, request, *, timeout=None):
    self.sent.append(request)
    response = self.inner.call(method, request, timeout=timeout)
    self.sent.append(response)
    return response


def _forms(i):
  """An ID as it could leak: its UTF-8 bytes, and plain hashes of them (raw and hex)."""
  data = i.encode()
  digests = [hashlib.new(name, data) for name in ("md5", "sha1", "sha256")]
  return [data] + [d.digest() for d in digests] + [d.hexdigest().encode() for d in digests]


@pytest.fixture(scope="module")
def reference():
  ids = _ids()
  return ids, sljax.align(ids, leader="merchant")


@pytest.mark.parametrize("over", ["in_process", "grpc"])
def test_network_alignment_equals_the_plain_intersection_and_in_process_align(reference, over):
  ids, in_process = reference
  server = _server(ids)
  running = T.serve(server.handle) if over == "grpc" else None
  transports = {name: Recording(T.InProcessTransport(server.handle, token=TOKENS[name]) if running is None else
                                T.GrpcTransport(f"127.0.0.1:{running.port}", token=TOKENS[name]))
                for name in MEMBERS.values()}
  try:
    results = run_in_threads(lambda k: T.align(transports[MEMBERS[k]], ids[MEMBERS[k]], client=k, wait=5.0),
                             MEMBERS, timeout=120)
  finally:
    if running is not None:
      for t in transports.values():
        t.inner.close()
      running.stop()
  plain = sorted(set(ids["merchant"]) & set(ids["bank"]) & set(ids["network"]))
  assert 0 < in_process.size == len(plain) < min(len(v) for v in ids.values())  # a partial overlap
  for k, name in MEMBERS.items():
    aligned = results[k]
    assert aligned.leader == "merchant" and aligned.size == len(plain)
    assert aligned.sizes == {name: len(ids[name]), "merchant": len(ids["merchant"])}
    assert [ids[name][r] for r in aligned.rows[name]] == plain
    np.testing.assert_array_equal(aligned.rows[name], in_process.rows[name], strict=True)
    # Two PSI runs (request, setup, response each) in three calls, as in process between the leader and this member.
    assert [(m.sender, m.receiver, m.kind) for m in aligned.messages] == [
        (m.sender, m.receiver, m.kind) for m in in_process.messages if name in (m.sender, m.receiver)]
    assert len(transports[name].sent) == 2 * 3
    sent = b"".join(transports[name].sent)
    assert all(m.payload in sent for m in aligned.messages)  # the recording holds what crossed
  assert server.aligner.wait(0.0, until="answered")
  np.testing.assert_array_equal(server.aligner.rows, in_process.rows["merchant"], strict=True)
  result = server.aligner.result()
  assert (result.size, result.sizes, result.leader) == (len(plain), {"merchant": len(ids["merchant"])}, "merchant")
  np.testing.assert_array_equal(result.take("merchant", np.asarray(ids["merchant"])), plain)
  # No party's ID, shared or not, in any byte sent either way: neither as text nor as a plain hash.
  wire_bytes = b"".join(b"".join(t.sent) for t in transports.values())
  for name, party_ids in ids.items():
    for i in party_ids:
      assert not any(form in wire_bytes for form in _forms(i)), (name, i)
  # The check can fail: the IDs' forms are found in bytes that hold them.
  naive = b"\n".join(form for i in ids["bank"][:3] for form in _forms(i))
  assert all(any(form in naive for form in _forms(i)) for i in ids["bank"][:3])
  if over == "in_process":  # a member that restarts once C is fixed skips the first pass and gets the same rows
    again = T.align(T.InProcessTransport(server.handle, token=TOKENS["bank"]), ids["bank"], client=0)
    np.testing.assert_array_equal(again.rows["bank"], in_process.rows["bank"], strict=True)
    assert [m.kind for m in again.messages] == ["request", "setup", "response"]


def _align_request(client, op, *, wait=0.0, request=None, setup=None, response=None):
  return wire.encode({"client": client, "op": op, "wait": wait, "request": request, "setup": setup,
                      "response": response})


def test_a_wrong_token_is_refused_before_the_body_is_read(reference):
  ids, _ = reference
  server = _server(ids)
  served = []

  def handler(method, request, **kw):
    served.append(method)
    return server.handle(method, request, **kw)

  running = T.serve(handler, authenticate=server.authenticate_metadata, max_message_bytes=1 << 25)
  try:
    big = _align_request(0, "answer", setup=b"\0" * (8 << 20), response=b"\0")
    assert raw_call(running.port, "Align", big, "forged") == (
        grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not one of this server's")
    assert served == [] and server.aligner.state.keys == {}  # refused before the handler
    code, answer = raw_call(running.port, "Align", _align_request(0, "query"), TOKENS["bank"])
    assert code == grpc.StatusCode.OK and served == ["Align"]
    answer = wire.decode("Align", answer, response=True)
    assert answer["party"] == "bank" and answer["leader"] == "merchant" and answer["request"]
    assert raw_call(running.port, "Align", _align_request(1, "query"), TOKENS["bank"]) == (
        grpc.StatusCode.PERMISSION_DENIED, "Align: field 'client' is 1, but the credentials are client 0's")
  finally:
    running.stop()


def _call(server, name, request, method="Align"):
  return server.handle(method, request, metadata={wire.TOKEN_METADATA: f"Bearer {TOKENS[name]}"})


def test_malformed_payloads_get_invalid_argument_and_change_nothing(reference):
  ids, _ = reference
  server = _server(ids)
  aligner = server.aligner
  with pytest.raises(T.TransportError, match=r"^FAILED_PRECONDITION: Align answer: no query was sent to 'bank' "
                                             r"\(client 0\) to answer; call op 'query' first$"):
    _call(server, "bank", _align_request(0, "answer", setup=b"s", response=b"r"))
  # A valid first pass for the bank, by hand: the leader's request, the bank's answer.
  request = wire.decode("Align", _call(server, "bank", _align_request(0, "query")), response=True)["request"]
  bank = member_init(ids["bank"])
  bank, setup, response = member_answer(bank, request)
  parsed = psi.ServerSetup.FromString(setup)

  def setup_with(**gcs):
    odd = psi.ServerSetup()
    odd.CopyFrom(parsed)
    for field, value in gcs.items():
      setattr(odd.gcs, field, value)
    return odd.SerializeToString()

  short = psi.Response.FromString(response)
  del short.encrypted_elements[-1]
  n = len(ids["merchant"])
  bad = {
      "op": (_align_request(0, "steal"), r"Align request: field 'op' must be 'query', 'answer' or 'intersect', got "
                                         r"'steal'"),
      "payload where none belongs": (_align_request(0, "query", request=b"x"),
                                     r"Align query: field 'request' must be nil, got bytes"),
      "missing payload": (_align_request(0, "answer", setup=setup),
                          r"Align answer: field 'response' must be the bytes of a PSI response, got NoneType"),
      "negative wait": (_align_request(0, "intersect", wait=-1.0, request=b"x"),
                        r"Align intersect: field 'wait' must be a number of seconds >= 0, got -1.0"),
      "not protobuf": (_align_request(0, "answer", setup=b"\xff\xff", response=response),
                       r"Align answer: setup: not a PSI setup \(2 bytes\): Error parsing message"),
      "swapped": (_align_request(0, "answer", setup=response, response=setup), r"Align answer: setup: not a PSI setup"),
      # A hash range of 0 would abort the server's process inside the PSI library.
      "hash range 0": (_align_request(0, "answer", setup=setup_with(hash_range=0), response=response),
                       rf"Align answer: setup: expected a hash range in \[{int(n / 1e-9)}, 2\*\*62\] \(at least {n} "
                       r"IDs / fpr 1e-09\), got 0"),
      "divisor": (_align_request(0, "answer", setup=setup_with(div=-1), response=response),
                  r"Align answer: setup: expected a Golomb divisor in \[0, 62\], got -1"),
      "bloom filter": (_align_request(0, "answer", setup=psi.ServerSetup(bloom_filter={"num_hash_functions": 9})
                                      .SerializeToString(), response=response),
                       r"Align answer: setup: expected a Golomb-compressed set \(gcs\), got bloom_filter"),
      "one point short": (_align_request(0, "answer", setup=setup, response=short.SerializeToString()),
                          rf"Align answer: response: expected {n} encrypted IDs \(one per ID queried\), got {n - 1}"),
      "points not on the curve": (_align_request(0, "answer", setup=setup, response=psi.Response(
          encrypted_elements=[b"\x05" * 33] * n).SerializeToString()), r"Align answer: response: ECGroup::"),
      "points of another size": (_align_request(0, "answer", setup=setup, response=psi.Response(
          encrypted_elements=[b"\x02" * 32] * n).SerializeToString()),
                                 r"Align answer: response: expected encrypted IDs of 33 bytes \(compressed P-256 "
                                 r"points\), got one of 32 bytes"),
  }
  before = aligner.state
  for what, (req, message) in bad.items():
    with pytest.raises(T.TransportError, match="^INVALID_ARGUMENT: " + message) as e:
      _call(server, "bank", req)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, what
    assert aligner.state == before and aligner.rows is None, what
  with pytest.raises(T.TransportError, match=r"^UNIMPLEMENTED: Status: this server only aligns sample IDs \(Align\)$"):
    _call(server, "bank", wire.encode({"client": 0}), method="Status")
  _call(server, "bank", _align_request(0, "answer", setup=setup, response=response))
  assert aligner.state.held.keys() == {"bank"} and aligner.rows is None  # the network has not answered yet
  assert not aligner.wait(0.0)
  ready = wire.decode("Align", _call(server, "bank", _align_request(0, "intersect", wait=0.0, request=b"x")),
                      response=True)
  assert ready["ready"] is False and ready["setup"] is None  # not yet: call again
  # The network's first pass fixes C; a malformed second-pass request is refused and changes nothing.
  network = member_init(ids["network"])
  request = wire.decode("Align", _call(server, "network", _align_request(1, "query")), response=True)["request"]
  network, setup, response = member_answer(network, request)
  _call(server, "network", _align_request(1, "answer", setup=setup, response=response))
  fixed, rows = aligner.state, aligner.rows
  assert rows is not None and aligner.wait(0.0) and not aligner.wait(0.0, until="answered")
  for req, message in [(b"", r"request: expected 1 to \d+ encrypted IDs, got 0"),
                       (psi.Request(reveal_intersection=True, encrypted_elements=[b"\x07" * 33]).SerializeToString(),
                        r"request: ECGroup::"),
                       (b"\x0a\x01", r"request: not a PSI request")]:
    with pytest.raises(T.TransportError, match="^INVALID_ARGUMENT: Align intersect: " + message):
      _call(server, "network", _align_request(1, "intersect", request=req))
    assert aligner.state == fixed
    np.testing.assert_array_equal(aligner.rows, rows)


def test_sljax_align_command(tmp_path):
  """`sljax align`: the merchant serves, the bank and the network connect; each writes its rows, in the common order."""
  from sljax import cli

  rng = np.random.default_rng(2)
  everyone = [f"cust-{i:03d}" for i in range(60)]
  ids = {name: [everyone[i] for i in rng.permutation(60)[:45]] for name in ("merchant", "bank", "network")}
  for name, party_ids in ids.items():
    (tmp_path / f"{name}.txt").write_text("".join(f"{i}\n" for i in party_ids), encoding="utf-8")
  (tmp_path / "tokens").write_text("0 token-bank\n1 token-network\n")
  port_file = tmp_path / "port"

  def party(name):
    argv = ["align", "--ids", str(tmp_path / f"{name}.txt"), "--out", str(tmp_path / f"{name}.rows"),
            "--token-file", str(tmp_path / "tokens"), "--json"]
    if name == "merchant":
      return cli.main(argv + ["--serve", "--members", "0:bank,1:network", "--name", "merchant", "--port", "0",
                              "--port-file", str(port_file), "--wait-seconds", "60"])
    for _ in range(600):
      if port_file.exists():
        break
      threading.Event().wait(0.05)
    return cli.main(argv + ["--target", f"127.0.0.1:{port_file.read_text()}",
                            "--client-id", str(["bank", "network"].index(name))])

  assert run_in_threads(party, ids, timeout=120) == {name: 0 for name in ids}
  plain = sorted(set(ids["merchant"]) & set(ids["bank"]) & set(ids["network"]))
  for name, party_ids in ids.items():
    rows = [int(line) for line in (tmp_path / f"{name}.rows").read_text().split()]
    assert [party_ids[r] for r in rows] == plain, name
  assert cli.main(["align", "--ids", str(tmp_path / "bank.txt")]) == 2  # a member needs --client-id
  (tmp_path / "gap.txt").write_text("a\n\nb\n")
  assert cli.main(["align", "--ids", str(tmp_path / "gap.txt"), "--client-id", "0"]) == 2  # an empty line
