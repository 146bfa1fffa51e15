"""No single client can poison what the server holds: messages with finite but absurd values,
labels outside the model's classes, or a declared sample count beyond the server's bound are
refused (INVALID_ARGUMENT, naming the field and the bound) before they touch the state, for every
way of serving; a refused request leaves the server exactly as it was."""

import grpc
import jax
import numpy as np
import pytest

import sljax
from sljax import messages as msgs
from sljax import transport as T
from sljax.transport import demo, wire

SCHEDULE = T.Schedule(num_clients=2, rounds=1, local_steps=2, batch_size=8)
TOKENS = {"token-zero": 0, "token-one": 1}
HIDDEN = 16


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(HIDDEN,), lr=1e-3)


@pytest.fixture(scope="module")
def servers(setup):
  """One server per way of serving (built on first use), declared samples bounded by 1000."""
  built = {}

  def get(algorithm):
    if algorithm not in built:
      built[algorithm] = _server(setup, algorithm, max_samples=1000)
    return built[algorithm]

  return get


def _server(setup, algorithm, **kw):
  common = dict(schedule=SCHEDULE, input_spec=sljax.ArraySpec.of(setup.dataset.x_train), key=jax.random.key(0),
                tokens=TOKENS, **kw)
  if algorithm == "sequential_sl":
    return T.SplitServer(setup.model, setup.sl, **common)
  return T.ConcurrentServer(setup.model, setup.sl, algorithm=algorithm, **common)


def _smashed(activations=1.0, labels=0):
  b = SCHEDULE.batch_size
  return msgs.to_bytes(msgs.SmashedData(np.full((b, HIDDEN), activations, np.float32), np.full((b,), labels, np.int32)))


def _refused(server, method, fields, match):
  before = server.snapshot()
  with pytest.raises(T.TransportError) as e:
    T.InProcessTransport(server.handle, token="token-zero").call(method, wire.encode({"client": 0, **fields}))
  assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details, e.value
  assert server.snapshot() == before


@pytest.mark.parametrize("algorithm", ["sequential_sl", "parallel_sl", "splitfed_v1"])
def test_absurd_activations_and_labels_out_of_range_are_refused(servers, algorithm):
  server = servers(algorithm)
  forward = {"round": 0, "step": 0}
  _refused(server, "Forward", {**forward, "message": _smashed(activations=3e38)},
           "field activations holds a value of magnitude 3e+38, beyond the server's bound of 1e+06")
  _refused(server, "Forward", {**forward, "message": _smashed(labels=10**6)},
           "field labels holds 8 label(s) outside [0, 10) (the model has 10 outputs), e.g. 1000000")
  _refused(server, "Forward", {**forward, "message": _smashed(labels=-5)}, "outside [0, 10)")


def test_splitfed_weights_beyond_the_bound_are_refused(servers):
  server = servers("splitfed_v1")
  huge = jax.tree.map(lambda a: np.full_like(a, 1e30), jax.device_get(server.state.average))
  _refused(server, "Handover", {"round": 0, "op": "put", "steps": 2, "wait": 0.0,
                                "message": msgs.to_bytes(msgs.ModelWeights(huge))}, "beyond the server's bound")


def test_a_declared_sample_count_beyond_max_samples_is_refused(setup, servers):
  server = servers("splitfed_v1")
  hello = {"protocol": msgs.PROTOCOL_VERSION, "cut_shape": [HIDDEN], "cut_dtype": "float32",
           **wire.codec_fields(setup.sl)}
  for samples in (1001, 2**31, 2**40):
    _refused(server, "Handshake", {**hello, "samples": samples}, "must be an int in [1, 1000] (max_samples)")
  assert int(server.state.samples[0]) == 0


def test_bad_bounds_are_refused(setup):
  with pytest.raises(ValueError, match=r"max_abs_value: expected a positive number or None, got -1"):
    _server(setup, "parallel_sl", max_abs_value=-1)
  with pytest.raises(ValueError, match=r"num_classes: expected 'auto', None or a positive int, got 0"):
    _server(setup, "parallel_sl", num_classes=0)
  with pytest.raises(ValueError, match=r"max_samples: expected an int in \[1, 2147483647\], got 0"):
    _server(setup, "parallel_sl", max_samples=0)
