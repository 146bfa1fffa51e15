"""Codecs describe their configuration, and the handshake refuses a client whose codecs differ from
the server's (a client on top-k against a server on random-k would otherwise train silently wrong)."""

import json

import jax
import jax.numpy as jnp
import msgpack
import optax
import pytest

import sljax
from sljax import codecs
from sljax import messages as msgs
from sljax import transport as T
from sljax.transport import demo, wire
from transport_helpers import client_data

SCHEDULE = T.Schedule(num_clients=1, rounds=1, local_steps=1, batch_size=8)
TOKEN = "token-zero"
LR = 2e-3

# Two configurations per factory that differ in one hyperparameter (the first is built twice to
# show that equal configurations describe equally). A new factory in sljax.codecs must be added.
VARIANTS = {
    "identity": (codecs.identity, None),
    "cast": (lambda: codecs.cast(dtype=jnp.bfloat16), lambda: codecs.cast(dtype=jnp.float16)),
    "quantize": (lambda: codecs.quantize(bits=4), lambda: codecs.quantize(bits=8)),
    "top_k": (lambda: codecs.top_k(k=8), lambda: codecs.top_k(k=8, error_feedback=True)),
    "random_k": (lambda: codecs.random_k(k=8), lambda: codecs.random_k(k=8, unbiased=False)),
    "clip": (lambda: codecs.clip(max_norm=1.0), lambda: codecs.clip(max_norm=2.0)),
    "chain": (lambda: codecs.chain(codecs.clip(max_norm=1.0), codecs.quantize(bits=8)),
              lambda: codecs.chain(codecs.quantize(bits=8), codecs.clip(max_norm=1.0))),
}


def test_every_factory_is_covered():
  not_factories = {"cotangent", "describe", "payload_nbytes"}
  factories = {name for name in codecs.__all__ if name[0].islower()} - not_factories
  assert factories == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_description_round_trips_and_tells_configurations_apart(name):
  make, other = VARIANTS[name]
  description = codecs.describe(make())
  assert description["name"] == name
  assert codecs.describe(make()) == description  # equal configurations, equal descriptions
  assert json.loads(json.dumps(description)) == description
  assert msgpack.unpackb(msgpack.packb(description), raw=False) == description
  # As the server reads it: inside a Handshake request, through the wire's own encoder and checks.
  request = {"protocol": 1, "client": 0, "cut_shape": [4], "cut_dtype": "float32", "uplink": description,
             "downlink": codecs.describe(None), "samples": 1}
  assert wire.decode("Handshake", wire.encode(request))["uplink"] == description
  if other is not None:
    assert codecs.describe(other()) != description


def test_descriptions_name_every_hyperparameter():
  assert codecs.describe(codecs.top_k(k=8)) == {
      "name": "top_k", "k": 8, "fraction": None, "error_feedback": False, "straight_through": False}
  assert codecs.describe(codecs.random_k(fraction=0.25)) == {
      "name": "random_k", "k": None, "fraction": 0.25, "error_feedback": False, "straight_through": False,
      "unbiased": True}
  assert codecs.describe(codecs.quantize(bits=4, stochastic=False, per="tensor")) == {
      "name": "quantize", "bits": 4, "stochastic": False, "per": "tensor"}
  assert codecs.describe(codecs.chain(codecs.cast(dtype="float16"), codecs.clip(max_norm=3))) == {
      "name": "chain", "codecs": [{"name": "cast", "dtype": "float16"}, {"name": "clip", "max_norm": 3.0}]}
  assert codecs.top_k(k=8).config == '{"error_feedback":false,"fraction":null,"k":8,"name":"top_k",' \
                                     '"straight_through":false}'


def test_equal_configurations_describe_equally_however_they_are_spelled():
  assert codecs.describe(None) == codecs.describe(codecs.identity()) == {"name": "identity"}
  assert codecs.describe(codecs.cast(dtype=jnp.bfloat16)) == codecs.describe(codecs.cast(dtype="bfloat16"))
  assert codecs.describe(codecs.clip(max_norm=1)) == codecs.describe(codecs.clip(max_norm=1.0))
  assert codecs.describe(codecs.top_k(k=jnp.int32(8).item())) == codecs.describe(codecs.top_k(k=8))
  assert codecs.describe(codecs.top_k(k=8)) != codecs.describe(codecs.random_k(k=8))
  assert codecs.describe(codecs.top_k(k=8)) != codecs.describe(codecs.top_k(fraction=0.5))
  hash(codecs.chain(codecs.top_k(k=8)))  # a codec stays hashable (sl objects are static jit arguments)


def test_a_codec_without_configuration_cannot_be_described():
  bare = codecs.identity()._replace(config=None)
  with pytest.raises(ValueError, match="this Codec carries no config"):
    codecs.describe(bare)
  with pytest.raises(ValueError, match="this Codec carries no config"):
    codecs.describe(codecs.chain(codecs.clip(max_norm=1.0), bare))
  custom = bare._replace(config='{"sigma": 0.5, "name": "my_noise"}')
  assert codecs.describe(custom) == {"name": "my_noise", "sigma": 0.5}
  with pytest.raises(ValueError, match=r"JSON object with a string 'name'; got '\[1\]'"):
    codecs.describe(bare._replace(config="[1]"))
  with pytest.raises(TypeError, match="describe: codec must be a Codec or None; got str"):
    codecs.describe("top_k")


@pytest.fixture(scope="module")
def setup():
  return demo.digits_setup(model="mlp", hidden=(32,), lr=LR)


def _sl(setup, **links):
  opt = optax.adam(LR)
  return sljax.vanilla(setup.model, client_optimizer=opt, server_optimizer=opt, **links)


def _server(setup, sl):
  return T.SplitServer(setup.model, sl, schedule=SCHEDULE, input_spec=sljax.ArraySpec.of(setup.dataset.x_train),
                       key=jax.random.key(0), tokens={TOKEN: 0})


def _connect(setup, server, sl):
  x, y = client_data(setup, 0, 1)
  return T.connect(T.InProcessTransport(server.handle, token=TOKEN), setup.model, sl, client=0, x=x[:32], y=y[:32])


def test_handshake_refuses_top_k_against_random_k(setup):
  server = _server(setup, _sl(setup, uplink=codecs.random_k(k=8)))
  before = server.snapshot()
  with pytest.raises(T.TransportError) as e:
    _connect(setup, server, _sl(setup, uplink=codecs.top_k(k=8)))
  assert e.value.code.name == "FAILED_PRECONDITION"
  assert e.value.details == (
      'codec configuration differs: uplink: the server\'s is {"error_feedback":false,"fraction":null,"k":8,'
      '"name":"random_k","straight_through":false,"unbiased":true}, the client\'s is {"error_feedback":false,'
      '"fraction":null,"k":8,"name":"top_k","straight_through":false}')
  assert server.snapshot() == before


def test_handshake_names_the_downlink_and_both_directions(setup):
  server = _server(setup, _sl(setup, uplink=codecs.quantize(bits=4), downlink=codecs.quantize(bits=8)))
  with pytest.raises(T.TransportError, match=r'^FAILED_PRECONDITION: codec configuration differs: downlink: the '
                                             r'server\'s is \{"bits":8,.*the client\'s is \{"bits":4,[^;]*$'):
    _connect(setup, server, _sl(setup, uplink=codecs.quantize(bits=4), downlink=codecs.quantize(bits=4)))
  with pytest.raises(T.TransportError, match=r'differs: uplink: .*"name":"identity".*; downlink: .*"name":"identity"'):
    _connect(setup, server, _sl(setup))  # no codecs: identity both ways


def test_handshake_passes_with_the_same_codecs(setup):
  links = dict(uplink=codecs.chain(codecs.clip(max_norm=4.0), codecs.quantize(bits=8)),
               downlink=codecs.cast(dtype="bfloat16"))
  server = _server(setup, _sl(setup, **links))
  # Each party builds its own codecs: equal configurations, distinct objects.
  session = _connect(setup, server, _sl(setup, **links))
  assert session.algorithm == "sequential_sl" and session.schedule == SCHEDULE


def test_a_hand_written_handshake_passes_with_numbers_by_value(setup):
  """What a client in another language sends (docs/protocol.md): descriptions as msgpack maps; an
  integer where the server holds a float is the same number, but a boolean is not a number."""
  server = _server(setup, _sl(setup, uplink=codecs.clip(max_norm=1.0), downlink=codecs.quantize(bits=8)))
  link = T.InProcessTransport(server.handle, token=TOKEN)
  fields = {"protocol": msgs.PROTOCOL_VERSION, "client": 0, "cut_shape": [32], "cut_dtype": "float32",
            "uplink": {"name": "clip", "max_norm": 1},
            "downlink": {"per": "row", "stochastic": True, "bits": 8, "name": "quantize"}, "samples": 10}
  hello = wire.decode("Handshake", link.call("Handshake", wire.encode(fields)), response=True)
  assert hello["algorithm"] == "sequential_sl"
  fields["downlink"] = {**fields["downlink"], "stochastic": 1}
  with pytest.raises(T.TransportError, match='downlink: .*"stochastic":true.*"stochastic":1'):
    link.call("Handshake", wire.encode(fields))


def test_a_server_with_an_undescribed_codec_is_refused_at_construction(setup):
  bare = codecs.quantize(bits=8)._replace(config=None)
  with pytest.raises(ValueError, match="sl.downlink: describe: this Codec carries no config"):
    _server(setup, _sl(setup, downlink=bare))
