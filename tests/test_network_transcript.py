"""A server records the training messages of a run over the network (`recorder=`): its transcript holds
exactly the bytes the clients sent and received, the same over gRPC as in process, and the attacks read
it like one recorded in simulation."""

import threading

import jax
import numpy as np
import pytest

import sljax
from sljax import transport as T
from sljax.privacy import attacks, transcript
from sljax.transport import demo, wire
from transport_helpers import client_data, run_in_threads

SCHEDULE = T.Schedule(num_clients=2, rounds=1, local_steps=3, batch_size=8)
TOKENS = {0: "token-zero", 1: "token-one"}


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(16,), lr=1e-3)


class _Seen:
  """A client transport that keeps the message bytes of each Forward it sends and gets back."""

  def __init__(self, inner, sent):
    self.inner, self.sent = inner, sent

  def call(self, method, request, *, timeout=None):
    response = self.inner.call(method, request, timeout=timeout)
    if method == "Forward":
      req, resp = wire.decode(method, request), wire.decode(method, response, response=True)
      self.sent.append((req["round"], req["step"], req["client"], req["message"], resp["message"]))
    return response


def _run(setup, path, *, grpc):
  rec = transcript.Recorder(path, meta={"algorithm": "parallel_sl"})
  server = T.ConcurrentServer(setup.model, setup.sl, algorithm="parallel_sl", schedule=SCHEDULE,
                              input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                              tokens={t: k for k, t in TOKENS.items()}, recorder=rec, lease_seconds=60.0)
  running = T.serve(server.handle, address="127.0.0.1:0") if grpc else None
  sent, lock = [], threading.Lock()
  links = {k: (T.GrpcTransport(f"127.0.0.1:{running.port}", token=t) if grpc else
               T.InProcessTransport(server.handle, token=t)) for k, t in TOKENS.items()}

  def work(k):
    x, y = client_data(setup, k, SCHEDULE.num_clients)
    mine = []
    result = T.run(T.connect(_Seen(links[k], mine), setup.model, setup.sl, client=k, x=x, y=y))
    with lock:
      sent.extend(mine)
    return result

  try:
    run_in_threads(work, links, timeout=180)
  finally:
    if grpc:
      for link in links.values():
        link.close()
      running.stop()
    server.close()
  return transcript.load(path), sorted(sent)


def _records(t):
  return sorted((r.round, r.step, r.client, r.direction, r.payload) for r in t.records if r.direction in ("up", "down"))


def test_the_server_records_what_crossed_the_wire_the_same_over_grpc(setup, tmp_path):
  in_process, sent = _run(setup, tmp_path / "in_process.sljt", grpc=False)
  # (the transcript also holds the Handover messages: the client half each client fetched)
  forwards = [rec for rec in _records(in_process) if transcript.decode(rec[4])[0] in ("SmashedData", "CutGradient")]
  assert {transcript.decode(rec[4])[0] for rec in _records(in_process)} == {"SmashedData", "CutGradient", "ClientHalf"}
  assert len(sent) == SCHEDULE.num_clients * SCHEDULE.local_steps
  # every Forward's smashed data (up) and cut gradient (down), byte for byte as the clients saw them
  assert forwards == sorted([(r, s, c, "up", up) for r, s, c, up, _ in sent] +
                            [(r, s, c, "down", down) for r, s, c, _, down in sent])
  over_grpc, _ = _run(setup, tmp_path / "grpc.sljt", grpc=True)
  assert _records(over_grpc) == _records(in_process)
  # the attacks read it: each step's smashed data, labels and cut gradient
  exchanges = over_grpc.exchanges()
  assert len(exchanges) == len(sent)
  first = exchanges[0]
  assert first.smashed.shape == (SCHEDULE.batch_size, 16) and first.grad.shape == first.smashed.shape
  assert np.asarray(first.labels).shape == (SCHEDULE.batch_size,)
  leak = attacks.norm_scoring([e._replace(labels=(np.asarray(e.labels) == 0).astype(np.int32)) for e in exchanges])
  assert 0.5 < leak.auc_mean <= 1.0  # the cut gradient of a class-0 example tells it apart


def test_a_recorder_that_is_not_one_is_refused(setup):
  with pytest.raises(TypeError, match="recorder: expected a sljax.privacy.transcript.Recorder, got str"):
    T.ConcurrentServer(setup.model, setup.sl, algorithm="parallel_sl", schedule=SCHEDULE,
                       input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                       tokens={"t": 0}, recorder="run.sljt")
