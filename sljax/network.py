"""Simulated network clock: how long a round takes and who waits for whom, without sleeping.

This is a model, not a measurement. Every party has a `DeviceProfile` (compute speed, uplink and
downlink bandwidth, latency). A round is made of legs, each costing

    compute    flops / flops_per_s           flops: XLA's cost analysis of the real step functions
    transfer   8 * bytes / rate + latency    bytes: `messages.wire_size` of the real messages

and each algorithm's timeline (`Schedule.timeline`, defined next to its round in `sljax.algorithms`)
chains the legs as that round does: who waits for whom, where the barriers are. `round_time` returns, for one
round, the wall time and, for every party, the time it computes, the time its link spends
transmitting, and the time it waits (idle).

    costs = step_costs(model, example_x=x, batch_size=32)
    timing = round_time("parallel_sl", costs, clients=[PHONE_LTE] * 8, server=GPU_SERVER)
    timing.wall_s, timing.server_idle_fraction, timing.client_idle_s

Clients are a list of profiles (`[PHONE_LTE] * 7 + [PHONE_LTE.straggling(slowdown=4.0)]`) or one
profile with (K,) array fields (`stack`), so heterogeneous fleets and stragglers are data.

The model's assumptions, in one place:

- A client-server transfer runs at the slower end's rate (client uplink against server downlink,
  or server uplink against client downlink); its latency is the sum of the two one-way latencies.
  The server's link is not shared: K clients sending at once each get that rate.
- A transfer keeps the client's link busy for its transmission time `8 * bytes / rate` (this is
  the client's comm time). Latency is propagation: nobody is busy during it, and whoever waits
  for the message counts it as idle.
- The server is one processor that runs one job at a time at `flops_per_s`: first come, first
  served (SplitFed v1), in the round's drawn order (SplitFed v2), or one job on everyone's data
  (parallel and local-loss SL). A client computes and transmits one thing at a time.
- `delay_s` is extra time a client takes once per local step before it computes (a straggler's
  other work, a sensor read); it counts as the client's compute time.
- FLOPs are a throughput model: no per-kernel launch overhead, no memory bandwidth limit. Model
  averaging (FedAvg, SplitFed) is free, and so is anything outside the measured step functions.
- Drops are not modelled; `participating` says who takes part. Non-participants do nothing and
  report zero compute, transmission and idle time.

Accounting, per round: a client's `compute + comm + idle == wall` (for participants); the
server's `busy + idle == wall`. Idle is waiting: for the server, for other clients, for the
network's latency, or for the round to end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sljax import codecs as codec_lib
from sljax import messages as msgs
from sljax import protocol
from sljax.algorithms import REGISTRY, Algorithm
from sljax.algorithms.parallel import linear_head, local_loss_client_step
from sljax.split import SplitModel, Stage

# ---------------------------------------------------------------------------------------------
# Profiles


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
  """What one party can do: compute speed, link bandwidths and latency.

  Each field is a number, or (for K clients stacked with `stack`) an array of shape (K,).

  Attributes:
    flops_per_s: sustained floating-point operations per second on small training steps
      (XLA counts a multiply-add as 2 flops, as hardware data sheets do).
    uplink_bps: bits per second this party can send.
    downlink_bps: bits per second this party can receive.
    latency_s: one-way latency in seconds between this party and the network core; a transfer
      between a client and the server takes the sum of both.
    delay_s: extra seconds per local step before this party computes (stragglers); 0 for none.

  Example:
    >>> phone = DeviceProfile(flops_per_s=2e10, uplink_bps=10e6, downlink_bps=30e6, latency_s=0.025)
    >>> slow = phone.straggling(slowdown=4.0, delay_s=0.5)
    >>> slow.flops_per_s
    5000000000.0
  """

  flops_per_s: Any
  uplink_bps: Any
  downlink_bps: Any
  latency_s: Any
  delay_s: Any = 0.0

  def __post_init__(self):
    for field, what, positive, finite in _FIELD_RULES:
      _check_field(field, getattr(self, field), what, positive=positive, finite=finite)

  def straggling(self, *, slowdown: float = 1.0, delay_s: float = 0.0) -> DeviceProfile:
    """This profile computing `slowdown` times slower and with `delay_s` more delay per step."""
    if not slowdown >= 1.0:
      raise ValueError(f"slowdown: expected a factor >= 1, got {slowdown}")
    return dataclasses.replace(self, flops_per_s=_number(np.divide(self.flops_per_s, slowdown)),
                               delay_s=_number(np.add(self.delay_s, delay_s)))


def _number(a: np.ndarray) -> float | np.ndarray:
  return float(a) if np.ndim(a) == 0 else a


# (field, what it is, must be > 0 (else >= 0), must be finite). Rates may be inf (no limit).
_FIELD_RULES = (
    ("flops_per_s", "FLOP/s", True, False),
    ("uplink_bps", "bits per second", True, False),
    ("downlink_bps", "bits per second", True, False),
    ("latency_s", "seconds", False, True),
    ("delay_s", "seconds", False, True),
)
_FIELDS = tuple(rule[0] for rule in _FIELD_RULES)


def _check_field(field: str, value: Any, what: str, *, positive: bool, finite: bool) -> None:
  try:
    a = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{field}: expected a number of {what}, got {value!r}") from None
  if a.ndim > 1:
    raise ValueError(f"{field}: expected a number or a (K,) array of {what}, got shape {a.shape}")
  bad = np.isnan(a) | ((a <= 0) if positive else (a < 0)) | (~np.isfinite(a) if finite else False)
  if bad.any():
    i = int(np.argmax(bad.ravel()))
    where = f" (client {i})" if a.ndim == 1 else ""
    need = "positive" if positive else "non-negative"
    need += " finite" if finite else ""
    raise ValueError(f"{field}: expected a {need} number of {what}, got {a.ravel()[i]}{where}")


def stack(profiles: Sequence[DeviceProfile] | DeviceProfile) -> DeviceProfile:
  """K client profiles as one profile whose fields are (K,) arrays.

  Takes a list of profiles, or one profile with some (K,) fields (the scalar ones are broadcast).
  """
  if isinstance(profiles, DeviceProfile):
    sizes = {np.size(getattr(profiles, f)) for f in _FIELDS if np.ndim(getattr(profiles, f)) == 1}
    if len(sizes) != 1:
      raise ValueError("clients: expected a list of K profiles or a profile with (K,) fields of one length K, "
                       f"got field lengths {sorted(sizes) or 'all scalar (write [profile] * K)'}")
    (k,) = sizes
    return DeviceProfile(**{f: np.broadcast_to(np.asarray(getattr(profiles, f), np.float64), (k,)).copy()
                            for f in _FIELDS})
  profiles = list(profiles)
  if not profiles:
    raise ValueError("clients: expected at least one client profile, got none")
  for i, p in enumerate(profiles):
    if not isinstance(p, DeviceProfile):
      raise TypeError(f"clients[{i}]: expected a DeviceProfile, got {type(p).__name__}")
    if any(np.ndim(getattr(p, f)) for f in _FIELDS):
      raise ValueError(f"clients[{i}]: expected scalar fields in a list of profiles (or one stacked profile)")
  return DeviceProfile(**{f: np.array([getattr(p, f) for p in profiles], np.float64) for f in _FIELDS})


# Presets. Figures are assumptions for orders of magnitude, not measurements: sustained rates on
# small training steps are well below the peak figures of data sheets. Change them with
# `dataclasses.replace` or build your own.

MICROCONTROLLER_BLE = DeviceProfile(flops_per_s=1e8, uplink_bps=250e3, downlink_bps=250e3, latency_s=0.02)
"""A Cortex-M7-class microcontroller (a few hundred MHz, single-precision FPU: ~1e8 FLOP/s sustained
in training) on Bluetooth Low Energy. BLE 5's 2M PHY signals at 2 Mbit/s, but connection intervals
and protocol overhead leave a few hundred kbit/s of application throughput: 250 kbit/s each way.
One-way latency of the order of a connection interval (7.5 ms and up) plus a gateway: 20 ms."""

MICROCONTROLLER_LORA = DeviceProfile(flops_per_s=1e8, uplink_bps=5.47e3, downlink_bps=5.47e3, latency_s=1.0)
"""The same microcontroller on LoRa: spreading factor 7 at 125 kHz gives a raw 5.47 kbit/s (LoRaWAN
data rate DR5 in EU868; higher spreading factors are slower still). Duty-cycle limits (1% of air
time in most EU868 sub-bands) and payload-size limits are ignored, which flatters LoRa by orders of
magnitude. Latency 1 s: a class-A device only hears the network in receive windows that open 1 s
and 2 s after it transmits."""

PHONE_LTE = DeviceProfile(flops_per_s=2e10, uplink_bps=10e6, downlink_bps=30e6, latency_s=0.025)
"""A smartphone training on its CPU (fp32 on a few big cores: ~2e10 FLOP/s sustained) over LTE.
Typical LTE throughput in national drive-test and crowd-sourced reports is some tens of Mbit/s
down and around 10 Mbit/s up: 30 and 10. LTE round trips are commonly 30-60 ms: 25 ms one way."""

HOSPITAL_FIBRE = DeviceProfile(flops_per_s=1e11, uplink_bps=1e9, downlink_bps=1e9, latency_s=0.005)
"""A hospital's workstation-class CPU server (8-16 cores with AVX2: ~1e11 FLOP/s sustained on
small steps) on a symmetric 1 Gbit/s fibre link, 5 ms one way to a regional data centre."""

GPU_SERVER = DeviceProfile(flops_per_s=1e13, uplink_bps=10e9, downlink_bps=10e9, latency_s=0.0005)
"""A data-centre GPU server (A100-class: 19.5 TFLOP/s FP32 peak; small split-learning steps reach a
fraction of it: 1e13) behind a 10 Gbit/s NIC, 0.5 ms from the network core."""

CPU_SERVER = DeviceProfile(flops_per_s=5e11, uplink_bps=10e9, downlink_bps=10e9, latency_s=0.0005)
"""A data-centre CPU server (tens of cores with AVX-512: ~5e11 FLOP/s sustained) behind 10 Gbit/s."""

PRESETS = {
    "microcontroller_ble": MICROCONTROLLER_BLE,
    "microcontroller_lora": MICROCONTROLLER_LORA,
    "phone_lte": PHONE_LTE,
    "hospital_fibre": HOSPITAL_FIBRE,
    "gpu_server": GPU_SERVER,
    "cpu_server": CPU_SERVER,
}

# ---------------------------------------------------------------------------------------------
# Costs of the step functions


class StepCosts(NamedTuple):
  """FLOPs and exact wire bytes of the legs of one step, for one client's batch. See `step_costs`.

  Attributes:
    batch_size: the batch the costs were measured at.
    client_forward_flops: `vanilla.client_forward`: the client half under `jax.vjp`.
    client_backward_flops: `vanilla.client_backward`: the pullback and the client's update.
    server_step_flops: `vanilla.server_step` on one client's batch: forward, backward, update.
    server_update_flops: the part of `server_step_flops` that does not grow with the batch (the
      optimizer update); the server's step on m clients' batches at once costs
      `server_flops(m)`.
    local_loss_step_flops: local-loss SL's client step: half and auxiliary head, forward,
      backward and update.
    model_step_flops: FedAvg's local step of the whole model.
    smashed_bytes: `SmashedData` (activations and labels) of one batch.
    cut_gradient_bytes: `CutGradient` of one batch.
    client_weights_bytes: `ModelWeights` of the client half (SplitFed averaging, sequential relay).
    model_weights_bytes: `ModelWeights` of the whole model (FedAvg).
    server_forward_flops: U-shaped: `u_shaped.server_forward`, the body under `jax.vjp` on one
      batch (a part of `server_step_flops`, which is then the body's forward and backward).
    tail_step_flops: U-shaped: `u_shaped.client_tail_step`, the tail's forward and backward.
    body_output_bytes: U-shaped: `BodyOutput` of one batch.
    tail_gradient_bytes: U-shaped: `TailGradient` of one batch.

  From a three-part (U-shaped) model, `step_costs` times `u_shaped`'s legs: the client's forward
  and backward are the head's (the backward updates head and tail), the smashed data carries no
  labels, and the last four fields are filled in (0 for a two-part model).
  """

  batch_size: int
  client_forward_flops: float
  client_backward_flops: float
  server_step_flops: float
  server_update_flops: float
  local_loss_step_flops: float
  model_step_flops: float
  smashed_bytes: int
  cut_gradient_bytes: int
  client_weights_bytes: int
  model_weights_bytes: int
  server_forward_flops: float = 0.0
  tail_step_flops: float = 0.0
  body_output_bytes: int = 0
  tail_gradient_bytes: int = 0

  def server_flops(self, num_batches: int) -> float:
    """FLOPs of one server step on `num_batches` clients' batches at once (one update)."""
    return self.server_update_flops + num_batches * (self.server_step_flops - self.server_update_flops)


def flops(fn: Callable, *args: Any) -> float:
  """FLOPs of `jax.jit(fn)(*args)` from XLA's cost analysis of the compiled program.

  `args` may be arrays or `jax.ShapeDtypeStruct`s: nothing runs.
  """
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per HLO module
    cost = {"flops": sum(c.get("flops", 0.0) for c in cost)} if cost else None
  value = None if not cost else cost.get("flops")
  if value is None or value < 0:
    raise RuntimeError(f"XLA's cost analysis on {jax.default_backend()} reports no flops for "
                       f"{getattr(fn, '__name__', fn)}")
  return float(value)


def step_costs(
    model: SplitModel,
    *,
    example_x: Any,
    batch_size: int,
    optimizer: optax.GradientTransformation | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = protocol.softmax_cross_entropy,
    aux_head: Stage | None = None,
    uplink: codec_lib.Codec | None = None,
    downlink: codec_lib.Codec | None = None,
) -> StepCosts:
  """FLOPs and wire bytes of every leg of a step, from the real step functions at `batch_size`.

  Compiles each leg on shapes alone (nothing is initialised or run): `vanilla.client_forward`,
  `client_backward` and `server_step`, the server step again at twice the batch (to split off its
  batch-independent update), local-loss SL's client step, and the whole model's step for FedAvg.
  A three-part model's legs are `u_shaped`'s (see `StepCosts`); local-loss SL, which takes a
  two-part model, then costs 0.

  Args:
    model: a two-part `SplitModel`, or a three-part one (U-shaped split learning).
    example_x: inputs with a leading batch axis; only their per-example shape and dtype are used.
    batch_size: the per-client batch size.
    optimizer: the optimizer of every party (it changes the update's FLOPs); Adam by default.
    loss: the training loss.
    aux_head: local-loss SL's auxiliary head; `algorithms.linear_head(num_classes)` by default.
    uplink: the codec on the smashed data, as given to the algorithm: the bytes are the encoded
      message's, and the client's forward includes the encoding (local-loss SL's client step
      does not count it).
    downlink: the codec on the cut gradient, likewise. (U-shaped: `uplink` on the smashed data
      and the tail gradient, `downlink` on the body output and the cut gradient, as `u_shaped`.)

  Example:
    >>> import sljax
    >>> model = sljax.cut(sljax.models.mlp(hidden=(16,)), 1)
    >>> costs = step_costs(model, example_x=jnp.zeros((1, 64)), batch_size=8)
    >>> costs.server_step_flops > 0 and costs.smashed_bytes > 8 * 16 * 4
    True
  """
  if not (isinstance(batch_size, int) and batch_size >= 1):
    raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
  if getattr(example_x, "ndim", 0) < 1:
    raise ValueError(f"example_x: expected an array with a leading batch axis, got {type(example_x).__name__}")
  optimizer = optax.adam(1e-3) if optimizer is None else optimizer
  central = protocol.centralized(model, optimizer=optimizer, loss=loss)
  key = jax.random.key(0)
  dtype = jax.dtypes.canonicalize_dtype(example_x.dtype)  # float64 inputs become float32 unless x64 is on

  def batch(b):
    return jax.ShapeDtypeStruct((b, *example_x.shape[1:]), dtype), jax.ShapeDtypeStruct((b,), jnp.int32)

  x, y = batch(batch_size)
  x1 = jnp.zeros((1, *example_x.shape[1:]), dtype)
  whole = jax.eval_shape(central.init, key, x1)
  if model.is_u_shaped:
    sl = protocol.u_shaped(model, client_optimizer=optimizer, server_optimizer=optimizer, loss=loss, uplink=uplink,
                           downlink=downlink)
    state = jax.eval_shape(sl.init, key, x1)
    return StepCosts(batch_size=batch_size, **_u_shaped_legs(sl, state, batch, batch_size, key),
                     local_loss_step_flops=0.0, model_step_flops=flops(central.step, whole, (x, y), key),
                     client_weights_bytes=msgs.wire_size(msgs.ModelWeights(state.client.params)),
                     model_weights_bytes=msgs.wire_size(msgs.ModelWeights(whole.params)))
  sl = protocol.vanilla(model, client_optimizer=optimizer, server_optimizer=optimizer, loss=loss, uplink=uplink,
                        downlink=downlink)
  state = jax.eval_shape(sl.init, key, x1)
  up, pending = jax.eval_shape(sl.client_forward, state.client, x, y, key)
  _, down, _ = jax.eval_shape(sl.server_step, state.server, up, key)
  smashed = jax.ShapeDtypeStruct((batch_size, *state.server.input_spec.shape), state.server.input_spec.dtype)
  up_2x, _ = jax.eval_shape(sl.client_forward, state.client, *batch(2 * batch_size), key)
  server_1x = flops(sl.server_step, state.server, up, key)
  server_2x = flops(sl.server_step, state.server, up_2x, key)
  if aux_head is None:
    outputs, _ = jax.eval_shape(sl.predict, state, x)
    aux_head = linear_head(outputs.shape[-1])

  return StepCosts(
      batch_size=batch_size,
      client_forward_flops=flops(sl.client_forward, state.client, x, y, key),
      client_backward_flops=flops(sl.client_backward, state.client, pending, down),
      server_step_flops=server_1x,
      server_update_flops=max(0.0, 2 * server_1x - server_2x),
      local_loss_step_flops=_local_loss_step_flops(sl, aux_head, state.client, smashed, x, y, key),
      model_step_flops=flops(central.step, whole, (x, y), key),
      smashed_bytes=msgs.wire_size(up),
      cut_gradient_bytes=msgs.wire_size(down),
      client_weights_bytes=msgs.wire_size(msgs.ModelWeights(state.client.params)),
      model_weights_bytes=msgs.wire_size(msgs.ModelWeights(whole.params)),
  )


def _u_shaped_legs(sl: protocol.UShaped, state, batch, batch_size: int, key) -> dict[str, Any]:
  """The `StepCosts` fields of U-shaped split learning's legs, from `u_shaped`'s very functions."""

  def legs(state, x, y, key):  # one step's messages, and what each party keeps between its legs
    up, head = sl.client_forward(state.client, x, key)
    body, server_pending = sl.server_forward(state.server, up, key)
    tail_grad, tail, _ = sl.client_tail_step(state.client, head, body, y, key)
    _, down = sl.server_backward(state.server, server_pending, tail_grad)
    return up, head, body, tail_grad, tail, down

  def server_step(server, up, tail_grad, key):  # the body's two legs on one batch
    return sl.server_backward(server, sl.server_forward(server, up, key)[1], tail_grad)

  x, y = batch(batch_size)
  up, head, body, tail_grad, tail, down = jax.eval_shape(legs, state, x, y, key)
  up_2x, _, _, tail_grad_2x, _, _ = jax.eval_shape(legs, state, *batch(2 * batch_size), key)
  server_1x = flops(server_step, state.server, up, tail_grad, key)
  server_2x = flops(server_step, state.server, up_2x, tail_grad_2x, key)
  return {
      "client_forward_flops": flops(sl.client_forward, state.client, x, key),
      "client_backward_flops": flops(sl.client_backward, state.client, tail, down),
      "server_step_flops": server_1x,
      "server_update_flops": max(0.0, 2 * server_1x - server_2x),
      "server_forward_flops": flops(sl.server_forward, state.server, up, key),
      "tail_step_flops": flops(sl.client_tail_step, state.client, head, body, y, key),
      "smashed_bytes": msgs.wire_size(up),
      "cut_gradient_bytes": msgs.wire_size(down),
      "body_output_bytes": msgs.wire_size(body),
      "tail_gradient_bytes": msgs.wire_size(tail_grad),
  }


def _local_loss_step_flops(sl, aux_head, client, smashed, x, y, key) -> float:
  """FLOPs of local-loss SL's client step, the very function `algorithms.local_loss_sl` runs."""
  aux_params, aux_state = jax.eval_shape(aux_head.init, key, smashed)
  params = {"client": client.params, "aux": aux_params}
  party = client.replace(params=params, model_state={"client": client.model_state, "aux": aux_state},
                         opt_state=jax.eval_shape(sl.client_optimizer.init, params))
  step = local_loss_client_step(sl, aux_head)
  return flops(step, party, x, y, key)


# ---------------------------------------------------------------------------------------------
# Timelines


class RoundTiming(NamedTuple):
  """Simulated time of one round. Per-client fields are (K,) arrays, in seconds.

  Attributes:
    algorithm: the algorithm's name (as `Algorithm.name`).
    wall_s: from the round's start until the last party is done.
    client_compute_s: time each client computes (its `delay_s` included).
    client_comm_s: time each client's link spends transmitting its messages, up and down.
    client_idle_s: time each client waits: `wall_s - compute - comm` (0 for non-participants).
    server_busy_s: time the server computes.
    server_idle_s: `wall_s - server_busy_s`.
    participating: (K,) booleans.
    bytes_up_per_client: exact bytes each client sends in the round (as the algorithms' metrics).
    bytes_down_per_client: exact bytes each client receives.
    examples: training examples the round consumes (participants x local steps x batch size).
  """

  algorithm: str
  wall_s: float
  client_compute_s: np.ndarray
  client_comm_s: np.ndarray
  client_idle_s: np.ndarray
  server_busy_s: float
  server_idle_s: float
  participating: np.ndarray
  bytes_up_per_client: np.ndarray
  bytes_down_per_client: np.ndarray
  examples: int

  @property
  def server_idle_fraction(self) -> float:
    return self.server_idle_s / self.wall_s

  @property
  def client_idle_fraction(self) -> np.ndarray:
    """(K,): each client's idle time over the wall time (0 for non-participants)."""
    return self.client_idle_s / self.wall_s

  @property
  def mean_client_idle_fraction(self) -> float:
    """Mean idle fraction over the participating clients."""
    return float(self.client_idle_fraction[self.participating].mean())

  def summary(self) -> dict:
    """The round's figures as plain numbers (one row of `compare`)."""
    p = self.participating
    return {
        "algorithm": self.algorithm,
        "wall_s": float(self.wall_s),
        "server_busy_s": float(self.server_busy_s),
        "server_idle_fraction": float(self.server_idle_fraction),
        "mean_client_idle_fraction": self.mean_client_idle_fraction,
        "max_client_idle_fraction": float(self.client_idle_fraction[p].max()),
        "mean_client_compute_s": float(self.client_compute_s[p].mean()),
        "mean_client_comm_s": float(self.client_comm_s[p].mean()),
        "bytes_up_per_client": int(self.bytes_up_per_client[p].max()),
        "bytes_down_per_client": int(self.bytes_down_per_client[p].max()),
        "examples": int(self.examples),
    }


class _Legs(NamedTuple):
  """Seconds of each leg: per client (K,) arrays, and the server's step on one batch."""

  forward: np.ndarray       # delay + client forward
  backward: np.ndarray
  tail: np.ndarray          # U-shaped: the client's tail step
  local_loss: np.ndarray    # delay + local-loss client step
  model_step: np.ndarray    # delay + FedAvg local step
  up_rate: np.ndarray       # bits/s, client -> server
  down_rate: np.ndarray     # bits/s, server -> client
  latency: np.ndarray
  server_flops_per_s: float

  def up(self, nbytes) -> np.ndarray:
    """Transmission plus latency of `nbytes` from each client to the server."""
    return 8.0 * nbytes / self.up_rate + self.latency

  def down(self, nbytes) -> np.ndarray:
    return 8.0 * nbytes / self.down_rate + self.latency


def _legs(costs: StepCosts, clients: DeviceProfile, server: DeviceProfile) -> _Legs:
  f, d = clients.flops_per_s, clients.delay_s
  return _Legs(
      forward=d + costs.client_forward_flops / f,
      backward=costs.client_backward_flops / f,
      tail=costs.tail_step_flops / f,
      local_loss=d + costs.local_loss_step_flops / f,
      model_step=d + costs.model_step_flops / f,
      up_rate=np.minimum(clients.uplink_bps, server.downlink_bps),
      down_rate=np.minimum(server.uplink_bps, clients.downlink_bps),
      latency=clients.latency_s + server.latency_s,
      server_flops_per_s=float(server.flops_per_s),
  )


def _timelines() -> dict[str, Any]:
  """The algorithms that have a timeline, by name: each algorithm defines its own, next to its round."""
  return {name: entry.timeline for name, entry in REGISTRY.items() if entry.timeline is not None}


ALGORITHMS = tuple(_timelines())


def round_time(
    algorithm: str | Algorithm,
    costs: StepCosts,
    *,
    clients: Sequence[DeviceProfile] | DeviceProfile,
    server: DeviceProfile,
    local_steps: int = 1,
    participating: Any = None,
    order: Any = None,
) -> RoundTiming:
  """Simulated time of one round of `algorithm`, and who waits how long.

  Args:
    algorithm: an `Algorithm` (its schedule's timeline), or the name of one in
      `sljax.algorithms.REGISTRY` that has a timeline (`ALGORITHMS`).
    costs: the step's FLOPs and bytes (`step_costs`).
    clients: K client profiles (a list, or one profile of (K,) arrays from `stack`).
    server: the server's profile (scalar fields).
    local_steps: steps per round, as the algorithm's `local_steps`.
    participating: (K,) booleans; everyone by default.
    order: SplitFed v2's serving order for the round (a permutation of the K clients); the
      algorithm draws one per round, so pass it to match a run. 0, 1, ..., K-1 by default.

  Returns:
    A `RoundTiming`.

  Example:
    >>> costs = StepCosts(32, 1e6, 2e6, 3e6, 1e5, 3e6, 6e6, 16_000, 16_000, 40_000, 400_000)
    >>> t = round_time("parallel_sl", costs, clients=[PHONE_LTE] * 4, server=GPU_SERVER)
    >>> t.wall_s > 0 and 0 < t.server_idle_fraction < 1
    True
  """
  if isinstance(algorithm, Algorithm):
    if algorithm.schedule is None or algorithm.schedule.timeline is None:
      raise ValueError(f"algorithm: {algorithm.name} has no timeline on the simulated clock")
    name, timeline = algorithm.name, algorithm.schedule.timeline
  elif algorithm in _timelines():
    name, timeline = algorithm, _timelines()[algorithm]
  else:
    raise ValueError(f"algorithm: expected an Algorithm or one of {list(ALGORITHMS)}, got {algorithm!r}")
  if not isinstance(costs, StepCosts):
    raise TypeError(f"costs: expected StepCosts (from step_costs), got {type(costs).__name__}")
  if not (isinstance(local_steps, int) and local_steps >= 1):
    raise ValueError(f"local_steps: expected a positive integer, got {local_steps!r}")
  fleet = stack(clients)
  k = fleet.flops_per_s.shape[0]
  if not isinstance(server, DeviceProfile):
    raise TypeError(f"server: expected a DeviceProfile, got {type(server).__name__}")
  if any(np.ndim(getattr(server, f)) for f in _FIELDS):
    raise ValueError("server: expected one DeviceProfile with scalar fields, got (K,) fields")
  p = np.ones((k,), bool) if participating is None else np.asarray(participating)
  if p.shape != (k,) or p.dtype != bool:
    raise ValueError(f"participating: expected ({k},) booleans, got {p.shape} {p.dtype}")
  if not p.any():
    raise ValueError("participating: expected at least one participating client, got none")
  order = np.arange(k) if order is None else np.asarray(order)
  if sorted(order.tolist()) != list(range(k)):
    raise ValueError(f"order: expected a permutation of the {k} clients, got {order.tolist()}")

  legs = _legs(costs, fleet, server)
  wall, server_busy = timeline.run(costs, legs, p, local_steps, order)
  bytes_up, bytes_down = timeline.traffic(costs, local_steps)
  bytes_up = np.where(p, bytes_up, 0).astype(np.int64)
  bytes_down = np.where(p, bytes_down, 0).astype(np.int64)
  compute = np.where(p, timeline.client_flops(costs, local_steps) / fleet.flops_per_s + local_steps * fleet.delay_s, 0.0)
  comm = 8.0 * bytes_up / legs.up_rate + 8.0 * bytes_down / legs.down_rate
  idle = np.where(p, wall - compute - comm, 0.0)
  # Every participant's compute and transmission lie within the round, so idle >= 0 up to rounding.
  assert (idle >= -1e-9 * max(wall, 1.0)).all() and math.isfinite(wall), (name, idle, wall)
  return RoundTiming(name, float(wall), compute, comm, np.maximum(idle, 0.0), float(server_busy),
                     float(wall - server_busy), p, bytes_up, bytes_down,
                     int(p.sum()) * local_steps * costs.batch_size)


def compare(
    costs: StepCosts,
    *,
    clients: Sequence[DeviceProfile] | DeviceProfile,
    server: DeviceProfile,
    local_steps: int = 1,
    algorithms: Sequence[str] = ALGORITHMS,
    participating: Any = None,
) -> list[dict]:
  """One `RoundTiming.summary()` row per algorithm, for the same costs and profiles.

  Example:
    >>> costs = StepCosts(32, 1e6, 2e6, 3e6, 1e5, 3e6, 6e6, 16_000, 16_000, 40_000, 400_000)
    >>> rows = compare(costs, clients=[PHONE_LTE] * 4, server=GPU_SERVER, local_steps=4)
    >>> [r["algorithm"] for r in rows][:2]
    ['sequential_sl', 'parallel_sl']
  """
  return [round_time(a, costs, clients=clients, server=server, local_steps=local_steps,
                     participating=participating).summary() for a in algorithms]
