"""A client half exported for the device: the exported legs send the same messages and reach the
same state as the library's legs; the artifact runs in a process without the model's code (nor the
rest of sljax), holds no part of the server's half, and a damaged artifact is refused."""

import hashlib
import json
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import serialization

import sljax
from sljax import export, models

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

BATCH = 8
STEPS = 3
EXPORT_FILE = pathlib.Path(export.__file__)


class _TestOnlyBlock(nn.Module):
  """A client layer that exists only in this test file: the subprocess cannot import it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(12)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dropout(0.25, deterministic=not train)(jax.nn.relu(x))


@pytest.fixture(scope="module")
def setup():
  """A client half with batch norm and dropout (the state and the key both matter), its artifact."""
  ds = sljax.data.load_digits(image=False)
  x, y = jnp.asarray(ds.x_train[:BATCH]), jnp.asarray(ds.y_train[:BATCH])
  layers = [sljax.linen_stage(_TestOnlyBlock(), name="private")] + models.mlp(hidden=(8,))
  # Momentum keeps an optimizer state; Adam would turn float noise in near-zero gradients (the
  # Dense bias ahead of batch norm) into full-size steps, so it cannot be compared to 1e-6.
  opt = optax.sgd(0.1, momentum=0.9)
  sl = sljax.vanilla(sljax.cut(layers, 1), client_optimizer=opt, server_optimizer=opt,
                     client_loss=lambda x, h: 0.01 * jnp.mean(h**2))  # a client's own loss term comes along
  state = sl.init(jax.random.key(0, impl="rbg"), x)  # rbg: compiles faster; the step keys are threefry
  # For a CPU or a CUDA device, exported here on a CPU: these tests run the CPU entry.
  return sl, state, x, y, export.export_client(sl, state.client, x, platforms=("cpu", "cuda"))


@pytest.fixture(scope="module")
def library_run(setup):
  """STEPS steps through the library's legs: the smashed data, cut gradients and client states."""
  sl, state, x, y, _ = setup
  client_forward, server_step, client_backward = map(jax.jit, (sl.client_forward, sl.server_step, sl.client_backward))
  client, server = state.client, state.server
  smashed, grads, clients = [], [], []
  for i in range(STEPS):
    k_client, k_server = jax.random.split(jax.random.key(10 + i))
    up, pending = client_forward(client, x, y, k_client)
    server, down, _ = server_step(server, up, k_server)
    client = client_backward(client, pending, down)
    smashed.append(up.activations)
    grads.append(down.grad)
    clients.append(client)
  return smashed, grads, clients


def test_exported_legs_equal_the_library_legs(setup, library_run):
  sl, state, x, y, artifact = setup
  smashed, grads, clients = library_run
  dev = export.load_client(artifact)
  assert dev.layer_names == ("private",) and dev.input_shape == (None, 64) and dev.smashed_shape == (None, 12)
  assert dev.metadata["platforms"] == ["cpu", "cuda"]
  s = dev.state
  for i in range(STEPS):
    k_client, _ = jax.random.split(jax.random.key(10 + i))
    up, pending = dev.forward(s, x, k_client)
    np.testing.assert_allclose(up, smashed[i], atol=1e-6, rtol=1e-6)
    s = dev.backward(s, pending, grads[i])  # the cut gradient the server sent the library's client
    got = export.restore_client(state.client, s)
    chex.assert_trees_all_close((got.params, got.model_state, got.opt_state),
                                (clients[i].params, clients[i].model_state, clients[i].opt_state), atol=1e-6, rtol=1e-6)
  # Inference, at another batch size (exported for any).
  np.testing.assert_allclose(dev.infer(s, x[:3]), sl.client_infer(clients[-1], x[:3]).activations, atol=1e-6,
                             rtol=1e-6)
  # What the device trained persists in a new artifact.
  again = export.load_client(dev.to_bytes(s))
  chex.assert_trees_all_equal(again.state, jax.tree.map(np.asarray, s))


_SUBPROCESS = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    import numpy as np

    class Refuse(importlib.abc.MetaPathFinder):
      # The device has no sljax (so no model code), no optax and no tests: only jax, flax and export.py.
      def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sljax", "optax", "tests", "test_export"):
          raise ImportError(f"refused on the device: {name}")

    sys.meta_path.insert(0, Refuse())
    spec = importlib.util.spec_from_file_location("device_export", sys.argv[1])
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)

    import jax
    from flax import serialization
    dev = export.load_client(open(sys.argv[2], "rb").read())
    x, grad = np.load(sys.argv[3]), np.load(sys.argv[4])
    smashed, pending = dev.forward(dev.state, x, jax.random.split(jax.random.key(10))[0])
    state = dev.backward(dev.state, pending, grad)
    out = {"smashed": np.asarray(smashed), "params": jax.tree.map(np.asarray, state.params)}
    open(sys.argv[5], "wb").write(serialization.msgpack_serialize(out))
    print("sljax modules:", sorted(m for m in sys.modules if m.startswith("sljax")))
""")


def test_artifact_runs_in_a_process_without_the_model_code(setup, library_run, tmp_path):
  sl, state, x, y, artifact = setup
  smashed, grads, clients = library_run
  (tmp_path / "client.sljax").write_bytes(artifact)
  np.save(tmp_path / "x.npy", np.asarray(x))
  np.save(tmp_path / "grad.npy", np.asarray(grads[0]))
  (tmp_path / "device.py").write_text(_SUBPROCESS)
  run = subprocess.run([sys.executable, str(tmp_path / "device.py"), str(EXPORT_FILE), str(tmp_path / "client.sljax"),
                        str(tmp_path / "x.npy"), str(tmp_path / "grad.npy"), str(tmp_path / "out.msgpack")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert run.returncode == 0, run.stderr
  assert "sljax modules: []" in run.stdout
  out = serialization.msgpack_restore((tmp_path / "out.msgpack").read_bytes())
  np.testing.assert_allclose(out["smashed"], smashed[0], atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(out["params"], serialization.to_state_dict(clients[0].params), atol=1e-6, rtol=1e-6)


def test_artifact_holds_the_client_half_only(setup):
  sl, state, x, y, artifact = setup
  client_kernel = np.asarray(state.client.params[0]["Dense_0"]["kernel"])
  assert client_kernel.tobytes() in artifact  # the check below can fail
  server_kernels = [np.asarray(leaf) for leaf in jax.tree.leaves(state.server.params) if np.ptp(leaf) > 0]
  assert server_kernels  # (the zero biases are in the artifact as anyone's zeros)
  for kernel in server_kernels:
    assert kernel.tobytes() not in artifact


def test_damaged_artifacts_are_refused(setup):
  *_, artifact = setup
  flipped = bytearray(artifact)
  flipped[len(artifact) // 2] ^= 0x01
  with pytest.raises(export.ArtifactError, match=r"^artifact: corrupted or truncated \(its sha256 does not match"):
    export.load_client(bytes(flipped))
  with pytest.raises(export.ArtifactError, match=r"^artifact: corrupted or truncated"):
    export.load_client(artifact[:-100])
  with pytest.raises(export.ArtifactError, match=r"^artifact: not an sljax client artifact \(expected it to start "
                                                 r"with b'SLJAX-CLIENT\\x00', got b'\\x89PNG"):
    export.load_client(b"\x89PNG" + artifact[4:])
  with pytest.raises(TypeError, match=r"^artifact: expected bytes, got str$"):
    export.load_client("client.sljax")
  # A newer format, with a valid checksum.
  dev = export.load_client(artifact)
  newer = export._pack({**dev.metadata}, dev.functions, dev.state)
  contents = serialization.msgpack_restore(newer[len(export.MAGIC) + 32:])
  contents["format"] = 2
  payload = serialization.msgpack_serialize(contents)
  with pytest.raises(export.ArtifactError, match=r"^artifact: format version 2, this sljax reads version 1$"):
    export.load_client(export.MAGIC + hashlib.sha256(payload).digest() + payload)


def test_device_checks_its_inputs(setup):
  *_, artifact = setup
  dev = export.load_client(artifact)
  with pytest.raises(ValueError, match=r"^x: expected shape \(B, 64\) float32, got \(8, 8, 8\) float32$"):
    dev.forward(dev.state, jnp.ones((8, 8, 8)), jax.random.key(0))
  with pytest.raises(ValueError, match=r"^key: expected one typed PRNG key of the threefry2x32 implementation"):
    dev.forward(dev.state, jnp.ones((8, 64)), jax.random.PRNGKey(0))
  sl, state, x, *_ = setup
  fixed = export.load_client(export.export_client(sl, state.client, x, any_batch=False))
  assert fixed.input_shape == (8, 64) and fixed.smashed_shape == (8, 12)
  with pytest.raises(ValueError, match=r"^x: expected shape \(8, 64\) float32, got \(3, 64\) float32$"):
    fixed.infer(fixed.state, x[:3])


def test_what_cannot_be_exported_is_refused(setup):
  sl, state, x, y, _ = setup
  opt = optax.sgd(0.1)
  u = sljax.u_shaped(sljax.cut(models.mlp(hidden=(8, 8)), 1, 2), client_optimizer=opt, server_optimizer=opt)
  with pytest.raises(ValueError, match=r"^sl: expected a vanilla protocol \(sljax.vanilla\); the export of a "
                                       r"U-shaped client \(head and tail\) is not supported yet, got UShaped$"):
    export.export_client(u, state.client, x)
  quantized = sl._replace(uplink=sljax.codecs.quantize(bits=8))
  description = json.dumps(sljax.codecs.describe(quantized.uplink), sort_keys=True)
  with pytest.raises(ValueError, match=r"^sl: the exported client supports no codec yet; expected no uplink codec, "
                                       r"got " + description.replace("{", r"\{").replace("}", r"\}") + "$"):
    export.export_client(quantized, state.client, x)
  with pytest.raises(ValueError, match=r"^x: expected shape \(B, 64\) float32, got \(8, 8, 8, 1\) float32$"):
    export.export_client(sl, state.client, jnp.ones((8, 8, 8, 1)))
