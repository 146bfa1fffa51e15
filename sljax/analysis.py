"""Where to cut: a per-cut profile of a layer stack's compute, memory, traffic, privacy and time.

"The choice of the cut layer is a critical optimization, balancing privacy, client compute and
communication cost" (Vepakomma et al. 2018; Gupta & Raskar 2018). For every candidate cut of a
stack, `profile_cuts` compiles the real legs of `sljax.vanilla` (`client_forward`, `server_step`,
`client_backward`) at the training batch size, without running them, and reads:

- FLOPs per sample of each party from XLA's cost analysis of the compiled legs: the client's
  forward and backward (with its optimizer update), the server's step (forward, backward, update);
- the client's parameter and optimizer-state bytes, and the exact wire bytes per sample up and
  down at the cut, through the configured codecs (`messages.wire_size`, as the protocol's metrics);
- the client's peak memory for one training step from XLA's memory analysis of the compiled
  client legs (see `leg_memory`), the same with each memory option compiled and measured
  (rematerialization of every client layer, bf16 compute, a smaller batch), and whether it fits a
  budget ("mcu-256KB", "mcu-512KB", "phone-2GB" or a number of bytes);
- a privacy proxy: the distance correlation between inputs and smashed data on a sample
  (`sljax.privacy.metrics.distance_correlation`), and, given auxiliary inputs, how well a black-box
  inverse network reconstructs the sample (`sljax.privacy.attacks.inverse_network`);
- the simulated time of one round (`sljax.network.round_time`) for a device profile.

    table = profile_cuts(sljax.models.cnn(), example_x=x[:1], batch_size=32,
                         client_optimizer=optax.adam(1e-3), budget="mcu-512KB", privacy_sample=x[:256])
    print(table)                                       # one row per cut
    best_cut(table, minimize="bytes_up", client_memory="<=512KB")
    plot_cuts(table).savefig("cuts.png")

What the memory figure counts. A client's training step is two compiled programs with a wait for
the server between them. The forward leg takes the client's state (params, model state, optimizer
state, codec state: all of it, used or not, since the client holds it throughout) and the batch,
and returns the uplink message and what the backward needs (the pullback's residuals). The
backward leg takes the state, those residuals and the cut gradient, and returns the new state,
written over the old (the state is donated). XLA's buffer assignment for each program gives its
argument, output, temporary and aliased (output written over a donated argument) bytes; a leg
needs `argument + output + temp - alias`, and the step's peak is the larger of the two legs.
Generated code, the runtime and the Python process are not counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sljax import codecs as codec_lib
from sljax import messages as msgs
from sljax import network, protocol
from sljax.split import SplitModel, Stage, cut, sequential

PyTree = Any

KIB = 1024

BUDGETS = {
    "mcu-256KB": 256 * KIB,
    "mcu-512KB": 512 * KIB,
    "phone-2GB": 2 * KIB**3,
}
"""Named memory budgets in bytes. KB, MB and GB are binary here (1 KB = 1024 bytes), as RAM sizes are quoted."""

_UNITS = {"B": 1, "KB": KIB, "KIB": KIB, "MB": KIB**2, "MIB": KIB**2, "GB": KIB**3, "GIB": KIB**3}

# The algorithms whose simulated round uses only vanilla legs (the ones profiled here).
ALGORITHMS = ("sequential_sl", "parallel_sl", "splitfed_v1", "splitfed_v2")

MEMORY_OPTIONS = ("remat", "bf16", "small_batch")


def parse_bytes(budget: Any, *, name: str = "budget") -> int:
  """A memory budget in bytes from a number, a named budget or a size such as "512KB" or "<=2GB".

  Named budgets are those of `BUDGETS`. KB, MB and GB are binary (1 KB = 1024 bytes).

  Example:
    >>> parse_bytes("mcu-512KB"), parse_bytes("<=1.5MB"), parse_bytes(1000)
    (524288, 1572864, 1000)
  """
  if isinstance(budget, bool):
    raise TypeError(f"{name}: expected a number of bytes or a size such as '512KB', got {budget!r}")
  if isinstance(budget, (int, float, np.integer, np.floating)):
    if not budget > 0:
      raise ValueError(f"{name}: expected a positive number of bytes, got {budget}")
    return int(budget)
  if isinstance(budget, str):
    text = budget.strip()
    if text in BUDGETS:
      return BUDGETS[text]
    match = re.fullmatch(r"(?:<=)?\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", text)
    if match and (match.group(2).upper() or "B") in _UNITS and float(match.group(1)) > 0:
      return int(float(match.group(1)) * _UNITS[match.group(2).upper() or "B"])
  raise ValueError(f"{name}: expected a number of bytes, one of {sorted(BUDGETS)} or a size such as '512KB' or "
                   f"'<=2GB', got {budget!r}")


def format_bytes(n: float | None) -> str:
  """Bytes as people read them: "812 B", "1.5 KB", "2.00 GB" (binary units)."""
  if n is None or (isinstance(n, float) and math.isnan(n)):
    return "-"
  for unit, size in (("GB", KIB**3), ("MB", KIB**2), ("KB", KIB)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
  return f"{n:.0f} B"


class LegMemory(NamedTuple):
  """XLA's memory analysis of one compiled program, in bytes.

  `needed` is what the program needs while it runs: every argument and every output buffer, plus
  its temporaries, less the outputs written over donated arguments.
  """

  argument: int
  output: int
  temp: int
  alias: int

  @property
  def needed(self) -> int:
    return self.argument + self.output + self.temp - self.alias


def leg_memory(compiled: jax.stages.Compiled) -> LegMemory:
  """The memory analysis of a compiled program (`jax.jit(f).lower(...).compile()`)."""
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"XLA's memory analysis on {jax.default_backend()} is not available")
  return LegMemory(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                   int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes))


def _flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs of a compiled program from XLA's cost analysis (as `network.flops`, on a compiled program)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per HLO module
    cost = {"flops": sum(c.get("flops", 0.0) for c in cost)} if cost else None
  value = None if not cost else cost.get("flops")
  if value is None or value < 0:
    raise RuntimeError(f"XLA's cost analysis on {jax.default_backend()} reports no flops")
  return float(value)


def _tree_bytes(tree: PyTree) -> int:
  return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Memory options: the client half transformed, then compiled and measured like the original.


def remat_stage(stage: Stage) -> Stage:
  """The stage with each of its layers under `jax.checkpoint` (the whole stage if it has none).

  The pullback then keeps only each layer's input; the backward recomputes the inside of one layer
  at a time. Same params, keys and outputs as `stage`.
  """
  if stage.layers:
    return sequential(*(_checkpointed(layer) for layer in stage.layers), name=stage.name)
  return _checkpointed(stage)


def _checkpointed(stage: Stage) -> Stage:
  def apply(params, model_state, x, *, key, train):
    return jax.checkpoint(lambda p, s, h, k: stage.apply(p, s, h, key=k, train=train))(params, model_state, x, key)

  return stage._replace(apply=apply)


def bf16_stage(stage: Stage) -> Stage:
  """The stage computing in bfloat16 on float32 params (mixed precision).

  Params and inputs are cast to bf16 inside `apply`, so activations and the pullback's residuals
  are bf16; the params, the optimizer state and the gradients stay in their own dtype, and the
  output is cast back (the server and the wire see what they saw before; a codec such as
  `codecs.cast` changes the wire).
  """

  def to_bf16(a):
    return a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a

  def apply(params, model_state, x, *, key, train):
    y, new_state = stage.apply(jax.tree.map(to_bf16, params), model_state, to_bf16(x), key=key, train=train)
    new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, model_state)
    out_dtype = jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return y.astype(out_dtype), new_state

  return stage._replace(apply=apply)


# ---------------------------------------------------------------------------------------------
# The table


class CutProfile(NamedTuple):
  """One candidate cut: what the client computes, holds, sends and leaks there.

  Attributes:
    cut: the cut index `k` of `cut(layers, k)`: the client holds `layers[:k]`.
    layer: the name of the last client layer ("cut after `layer`").
    client_flops_per_sample: the client's forward and backward (with its update), per sample.
    server_flops_per_sample: the server's step (forward, backward, update), per sample.
    client_flops_share: client / (client + server) FLOPs.
    client_param_bytes: the client's parameters.
    client_opt_state_bytes: the client optimizer's state.
    bytes_up_per_sample: exact wire bytes of the uplink message (`SmashedData`: smashed data
      through the uplink codec, and the labels) over the batch size.
    bytes_down_per_sample: likewise for the `CutGradient`.
    client_peak_bytes: the client's peak memory in one training step (see the module docstring).
    client_forward_bytes, client_backward_bytes: each leg's.
    remat_peak_bytes, bf16_peak_bytes, small_batch_peak_bytes: the peak with that memory option,
      compiled and measured (None when not asked for).
    small_batch: the batch size of `small_batch_peak_bytes`.
    fits: whether `client_peak_bytes` fits the table's budget (None without a budget).
    dcor: distance correlation between the privacy sample and its smashed data (None without one).
    round_time_s: simulated seconds of one round (None without a client profile).
    attack_ssim, attack_mse: the quality of a black-box inverse network's reconstructions of the
      privacy sample from its smashed data (SSIM for (B, H, W, C) images, NaN otherwise; MSE), the
      network trained on `attack_inputs` (None without them).
  """

  cut: int
  layer: str
  client_flops_per_sample: float
  server_flops_per_sample: float
  client_flops_share: float
  client_param_bytes: int
  client_opt_state_bytes: int
  bytes_up_per_sample: float
  bytes_down_per_sample: float
  client_peak_bytes: int
  client_forward_bytes: int
  client_backward_bytes: int
  remat_peak_bytes: int | None = None
  bf16_peak_bytes: int | None = None
  small_batch_peak_bytes: int | None = None
  small_batch: int | None = None
  fits: bool | None = None
  dcor: float | None = None
  round_time_s: float | None = None
  attack_ssim: float | None = None
  attack_mse: float | None = None

  def to_dict(self) -> dict:
    """The row as plain JSON-able values (NaN as None, which strict JSON has no other way to write)."""
    out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._asdict().items()}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class CutTable:
  """The profile of every candidate cut (`rows`), and the setting it was measured in.

  Iterate over it, index it by position, or look a cut up with `table.row(k)`. `str(table)` is a
  readable table; `to_dict()` / `to_json()` give every figure.
  """

  rows: tuple[CutProfile, ...]
  batch_size: int
  budget: int | None = None
  budget_name: str | None = None
  algorithm: str | None = None
  client_profile: str | None = None
  num_clients: int = 1

  def __iter__(self):
    return iter(self.rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> CutProfile:
    return self.rows[i]

  def row(self, cut_index: int) -> CutProfile:
    """The row of cut `cut_index`."""
    for r in self.rows:
      if r.cut == cut_index:
        return r
    raise KeyError(f"cut_index: expected one of the profiled cuts {[r.cut for r in self.rows]}, got {cut_index!r}")

  def to_dict(self) -> dict:
    return {"batch_size": self.batch_size, "budget_bytes": self.budget, "budget": self.budget_name,
            "algorithm": self.algorithm, "client_profile": self.client_profile, "num_clients": self.num_clients,
            "rows": [r.to_dict() for r in self.rows]}

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def __str__(self) -> str:
    columns = [
        ("cut", lambda r: str(r.cut)),
        ("after", lambda r: r.layer),
        ("client FLOP/sample", lambda r: f"{r.client_flops_per_sample:.3g}"),
        ("client share", lambda r: f"{100 * r.client_flops_share:.1f}%"),
        ("params", lambda r: format_bytes(r.client_param_bytes)),
        ("opt state", lambda r: format_bytes(r.client_opt_state_bytes)),
        ("up B/sample", lambda r: f"{r.bytes_up_per_sample:.1f}"),
        ("down B/sample", lambda r: f"{r.bytes_down_per_sample:.1f}"),
        ("client peak", lambda r: format_bytes(r.client_peak_bytes)),
    ]
    if any(r.remat_peak_bytes is not None for r in self.rows):
      columns.append(("remat", lambda r: format_bytes(r.remat_peak_bytes)))
    if any(r.bf16_peak_bytes is not None for r in self.rows):
      columns.append(("bf16", lambda r: format_bytes(r.bf16_peak_bytes)))
    if any(r.small_batch_peak_bytes is not None for r in self.rows):
      columns.append((f"batch {self.rows[0].small_batch}", lambda r: format_bytes(r.small_batch_peak_bytes)))
    if self.budget is not None:
      columns.append((f"fits {self.budget_name}", lambda r: "yes" if r.fits else "no"))
    if any(r.dcor is not None for r in self.rows):
      columns.append(("dCor", lambda r: "-" if r.dcor is None else f"{r.dcor:.3f}"))
    if any(r.attack_mse is not None for r in self.rows):
      columns.append(("attack SSIM", lambda r: "-" if r.attack_ssim is None or math.isnan(r.attack_ssim)
                      else f"{r.attack_ssim:.3f}"))
      columns.append(("attack MSE", lambda r: "-" if r.attack_mse is None else f"{r.attack_mse:.3g}"))
    if any(r.round_time_s is not None for r in self.rows):
      columns.append(("round s", lambda r: "-" if r.round_time_s is None else f"{r.round_time_s:.3g}"))
    cells = [[name for name, _ in columns]] + [[fmt(r) for _, fmt in columns] for r in self.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    setting = f"batch size {self.batch_size}"
    if self.client_profile:
      setting += f", {self.algorithm} with {self.num_clients} x {self.client_profile} client(s)"
    return "\n".join([f"Cut profile ({setting}); memory per client, FLOPs from XLA's cost analysis"] + lines)


# ---------------------------------------------------------------------------------------------
# Profiling


def _valid_cut_names(layers: Sequence[Any]) -> list[tuple[int, str]]:
  names = cut(layers, 1).layer_names  # `cut` names the layers and refuses a stack too short to cut
  return [(k, names[k - 1]) for k in range(1, len(names))]


def _describe_cuts(points: Sequence[tuple[int, str]]) -> str:
  return ", ".join(f"{k} (after {name!r})" for k, name in points)


def _resolve_cuts(layers: Sequence[Any], cuts: Sequence[int | str] | None) -> list[tuple[int, str]]:
  """The (index, last client layer) of each requested cut, checked against the stack's cut points."""
  points = _valid_cut_names(layers)
  if cuts is None:
    return points
  by_name = {name: k for k, name in points}
  out = []
  for c in cuts:
    if isinstance(c, str):
      if c not in by_name:
        raise ValueError(f"cuts: no cut after a layer named {c!r}; the valid cut points are {_describe_cuts(points)}")
      k = by_name[c]
    elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
      k = int(c)
      if not 1 <= k <= len(points):
        raise ValueError(f"cuts: cut {k} is out of range for a stack of {len(points) + 1} layers; the valid cut "
                         f"points are {_describe_cuts(points)}")
    else:
      raise TypeError(f"cuts: expected cut indices (int) or layer names (str), got {c!r}")
    out.append(points[k - 1])
  return out


def _client_profile(profile: Any) -> tuple[network.DeviceProfile | None, str | None]:
  if profile is None:
    return None, None
  if isinstance(profile, network.DeviceProfile):
    name = next((n for n, p in network.PRESETS.items() if p == profile), "custom")
    return profile, name
  if isinstance(profile, str) and profile in network.PRESETS:
    return network.PRESETS[profile], profile
  raise ValueError(f"client_profile: expected a sljax.network.DeviceProfile, None or one of "
                   f"{sorted(network.PRESETS)}, got {profile!r}")


class _AbstractLegs(NamedTuple):
  """A vanilla protocol's abstract state and the abstract messages of one step at a batch size."""

  sl: protocol.Vanilla
  state: Any
  x: jax.ShapeDtypeStruct
  y: jax.ShapeDtypeStruct
  up: Any
  pending: Any
  down: Any


def _abstract_legs(model: SplitModel, example_x, batch: int, key, **protocol_kwargs) -> _AbstractLegs:
  sl = protocol.vanilla(model, **protocol_kwargs)
  x = jax.ShapeDtypeStruct((batch, *example_x.shape[1:]), example_x.dtype)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  state = jax.eval_shape(sl.init, key, x)
  up, pending = jax.eval_shape(sl.client_forward, state.client, x, y, key)
  _, down, _ = jax.eval_shape(sl.server_step, state.server, up, key)
  return _AbstractLegs(sl, state, x, y, up, pending, down)


def _compile_client_legs(legs: _AbstractLegs, key) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
  """The client's two legs, compiled as a client runs them (see the module docstring)."""
  forward = jax.jit(legs.sl.client_forward, keep_unused=True).lower(legs.state.client, legs.x, legs.y, key).compile()
  with warnings.catch_warnings():
    # Leaves of the state that the backward passes through unchanged (e.g. batch statistics taken
    # from the forward's residuals) have no output to be written over: jax says so when lowering.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    backward = jax.jit(legs.sl.client_backward, donate_argnums=0, keep_unused=True).lower(
        legs.state.client, legs.pending, legs.down).compile()
  return forward, backward


def _client_peak(model: SplitModel, example_x, batch: int, key, **protocol_kwargs) -> int:
  legs = _abstract_legs(model, example_x, batch, key, **protocol_kwargs)
  forward, backward = _compile_client_legs(legs, key)
  return max(leg_memory(forward).needed, leg_memory(backward).needed)


def profile_cuts(
    layers: Sequence[Any],
    *,
    example_x: Any,
    batch_size: int,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    cuts: Sequence[int | str] | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = protocol.softmax_cross_entropy,
    uplink: codec_lib.Codec | None = None,
    downlink: codec_lib.Codec | None = None,
    budget: Any = None,
    memory_options: Sequence[str] = MEMORY_OPTIONS,
    small_batch: int | None = None,
    privacy_sample: Any = None,
    attack_inputs: Any = None,
    attack_steps: int = 1000,
    variables: tuple[PyTree, PyTree] | None = None,
    client_profile: Any = "phone_lte",
    server_profile: network.DeviceProfile = network.GPU_SERVER,
    algorithm: str = "parallel_sl",
    num_clients: int = 1,
    key: jax.Array | None = None,
) -> CutTable:
  """Profiles every candidate cut of a layer stack from the compiled legs of `sljax.vanilla`.

  Nothing is trained (but the attack's decoder, when asked for); each leg is compiled on shapes
  (see the module docstring for what each figure counts). Per cut, that is the client's two legs
  and the server's step, plus two client legs per memory option, and the client half on the
  privacy sample for the distance correlation (and the attack).

  Args:
    layers: the stack to cut, as given to `sljax.cut` (e.g. `sljax.models.resnet()`).
    example_x: inputs with a leading batch axis; only their per-example shape and dtype are used.
    batch_size: the training batch size of one client.
    client_optimizer: the client's optimizer (its state is part of the client's memory).
    server_optimizer: the server's optimizer; the client's by default.
    cuts: the cuts to profile, as indices `k` of `cut(layers, k)` or names of the last client
      layer; every cut point of the stack by default.
    loss: the training loss.
    uplink: the codec on the smashed data, as given to `sljax.vanilla`: the bytes up are the
      encoded message's, and the client's forward includes the encoding.
    downlink: the codec on the cut gradient, likewise.
    budget: the client's memory budget for the `fits` column: a number of bytes, one of
      `BUDGETS` ("mcu-256KB", "mcu-512KB", "phone-2GB") or a size such as "1.5MB"; None for none.
    memory_options: which memory options to compile and measure: any of "remat" (every client
      layer under `jax.checkpoint`, `remat_stage`), "bf16" (bf16 compute on f32 params,
      `bf16_stage`), "small_batch" (the batch `small_batch`).
    small_batch: the batch size of the "small_batch" option; a quarter of `batch_size` by default.
    privacy_sample: inputs (n, ...) on which to measure the distance correlation between inputs
      and smashed data at each cut (n of a few hundred; O(n^2) memory). None skips it.
    attack_inputs: (m, ...) auxiliary inputs from the data's distribution, other than the privacy
      sample: at each cut a black-box inverse network (He et al. 2019,
      `sljax.privacy.attacks.inverse_network`) is trained for `attack_steps` steps on them and their
      smashed data, and its reconstructions of `privacy_sample` are scored (`attack_ssim`,
      `attack_mse`). None skips the attack.
    attack_steps: the inverse network's training steps.
    variables: `(params, model_state)` of `sljax.sequential(*layers)` (one entry per layer, e.g.
      trained ones) for the privacy figures; the initial ones from `key` by default (an
      untrained network's leakage is not a trained one's).
    client_profile: the client's `sljax.network.DeviceProfile` or the name of a preset
      (`network.PRESETS`) for the simulated round time; None skips it.
    server_profile: the server's profile.
    algorithm: the algorithm whose round is timed, one of `ALGORITHMS`: with `parallel_sl` a round is
      one step of every client; `sequential_sl` adds the relay of the client half between turns (a
      deeper cut relays more weights), SplitFed the averaging of the client halves.
    num_clients: clients in the round, all with `client_profile`.
    key: init key for `variables` and the legs' (unused) keys; key(0) by default.

  Returns:
    A `CutTable`, one `CutProfile` per cut.

  Raises:
    ValueError: a cut out of range, a layer name that is not in the stack, or a cut where the
      model cannot be cut (the halves do not fit, the smashed data is not one array): the message
      names the valid cut points.

  Example:
    >>> import jax.numpy as jnp, optax, sljax
    >>> table = profile_cuts(sljax.models.mlp(hidden=(32, 32)), example_x=jnp.zeros((1, 64)), batch_size=8,
    ...                      client_optimizer=optax.sgd(0.1), memory_options=(), client_profile=None)
    >>> [(r.cut, r.layer, r.client_param_bytes) for r in table]
    [(1, 'hidden_0', 8320), (2, 'hidden_1', 12544)]
  """
  if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
    raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
  if getattr(example_x, "ndim", 0) < 1:
    raise ValueError(f"example_x: expected an array with a leading batch axis, got {type(example_x).__name__}")
  for option in memory_options:
    if option not in MEMORY_OPTIONS:
      raise ValueError(f"memory_options: expected a subset of {MEMORY_OPTIONS}, got {tuple(memory_options)}")
  if small_batch is None:
    small_batch = max(1, batch_size // 4)
  if not (isinstance(small_batch, int) and 1 <= small_batch):
    raise ValueError(f"small_batch: expected a positive integer, got {small_batch!r}")
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm: expected one of {ALGORITHMS} (the algorithms of vanilla legs), got {algorithm!r}")
  if not (isinstance(num_clients, int) and num_clients >= 1):
    raise ValueError(f"num_clients: expected a positive integer, got {num_clients!r}")
  budget_bytes = None if budget is None else parse_bytes(budget)
  budget_name = None if budget is None else (budget if isinstance(budget, str) else format_bytes(budget_bytes))
  device, device_name = _client_profile(client_profile)
  server_optimizer = client_optimizer if server_optimizer is None else server_optimizer
  key = jax.random.key(0) if key is None else key
  example_x = jax.ShapeDtypeStruct(example_x.shape, jax.dtypes.canonicalize_dtype(example_x.dtype))
  kwargs = dict(client_optimizer=client_optimizer, server_optimizer=server_optimizer, loss=loss, uplink=uplink,
                downlink=downlink)
  points = _resolve_cuts(layers, cuts)
  if attack_inputs is not None and privacy_sample is None:
    raise ValueError("attack_inputs: the attack reconstructs privacy_sample; expected a privacy_sample too, got None")
  privacy_at = None
  if privacy_sample is not None:
    privacy_at = _privacy_at(layers, privacy_sample, variables, key, attack_inputs=attack_inputs,
                             attack_steps=attack_steps)

  rows = []
  for k, name in points:
    model = cut(layers, k)
    try:
      legs = _abstract_legs(model, example_x, batch_size, key, **kwargs)
    except Exception as e:  # noqa: BLE001 -- re-raised naming the cut points that work
      valid = _describe_cuts(_cuttable(layers, example_x, batch_size, key, kwargs))
      raise ValueError(f"cuts: the model cannot be cut at {k} (after {name!r}): {e}. The valid cut points are "
                       f"{valid or 'none'}") from None
    forward, backward = _compile_client_legs(legs, key)
    server = jax.jit(legs.sl.server_step).lower(legs.state.server, legs.up, key).compile()
    client_flops = _flops(forward) + _flops(backward)
    server_flops = _flops(server)
    fwd_mem, bwd_mem = leg_memory(forward).needed, leg_memory(backward).needed
    peak = max(fwd_mem, bwd_mem)
    options = {}
    if "remat" in memory_options:
      options["remat_peak_bytes"] = _client_peak(model._replace(client=remat_stage(model.client)), example_x,
                                                 batch_size, key, **kwargs)
    if "bf16" in memory_options:
      options["bf16_peak_bytes"] = _client_peak(model._replace(client=bf16_stage(model.client)), example_x,
                                                batch_size, key, **kwargs)
    if "small_batch" in memory_options:
      options["small_batch_peak_bytes"] = _client_peak(model, example_x, small_batch, key, **kwargs)
      options["small_batch"] = small_batch
    bytes_up, bytes_down = msgs.wire_size(legs.up), msgs.wire_size(legs.down)
    round_s = None
    if device is not None:
      round_s = _round_time(legs, forward, backward, server_flops, bytes_up, bytes_down, algorithm=algorithm,
                            device=device, server_profile=server_profile, num_clients=num_clients,
                            server_optimizer=server_optimizer, batch_size=batch_size)
    rows.append(CutProfile(
        cut=k, layer=name,
        client_flops_per_sample=client_flops / batch_size,
        server_flops_per_sample=server_flops / batch_size,
        client_flops_share=client_flops / (client_flops + server_flops),
        client_param_bytes=_tree_bytes(legs.state.client.params),
        client_opt_state_bytes=_tree_bytes(legs.state.client.opt_state),
        bytes_up_per_sample=bytes_up / batch_size,
        bytes_down_per_sample=bytes_down / batch_size,
        client_peak_bytes=peak, client_forward_bytes=fwd_mem, client_backward_bytes=bwd_mem,
        fits=None if budget_bytes is None else peak <= budget_bytes,
        round_time_s=round_s,
        **options,
        **({} if privacy_at is None else privacy_at(k)),
    ))
  return CutTable(tuple(rows), batch_size, budget_bytes, budget_name, algorithm if device else None, device_name,
                  num_clients)


def _cuttable(layers, example_x, batch_size, key, kwargs) -> list[tuple[int, str]]:
  """The cut points at which the vanilla protocol can be set up (shapes only)."""
  ok = []
  for k, name in _valid_cut_names(layers):
    try:
      _abstract_legs(cut(layers, k), example_x, batch_size, key, **kwargs)
    except Exception:  # noqa: BLE001 -- any failure means this cut does not work
      continue
    ok.append((k, name))
  return ok


def _privacy_at(layers, sample, variables, key, *, attack_inputs, attack_steps) -> Callable[[int], dict]:
  """`k -> {"dcor": ..., ["attack_ssim": ..., "attack_mse": ...]}` at cut k, from the stack's variables."""
  from sljax.privacy import attacks, metrics  # noqa: PLC0415 -- the privacy package is needed only here

  sample = jnp.asarray(sample)
  if sample.ndim < 1 or sample.shape[0] < 2:
    raise ValueError(f"privacy_sample: expected at least 2 examples with a leading batch axis, got shape "
                     f"{sample.shape}")
  if attack_inputs is not None:
    attack_inputs = jnp.asarray(attack_inputs)
    if attack_inputs.shape[1:] != sample.shape[1:]:
      raise ValueError(f"attack_inputs: expected inputs shaped like privacy_sample (N, "
                       f"{', '.join(map(str, sample.shape[1:]))}), got {attack_inputs.shape}")
  whole = sequential(*layers)
  if variables is None:
    variables = jax.jit(whole.init)(key, sample[:1])
  params, model_state = variables
  n = len(cut(layers, 1).layer_names)
  if not (isinstance(params, tuple) and len(params) == n and isinstance(model_state, tuple) and len(model_state) == n):
    raise ValueError(f"variables: expected (params, model_state) of sljax.sequential(*layers), tuples of {n} entries "
                     "(one per layer)")
  dcor = jax.jit(metrics.distance_correlation)

  def at(k: int) -> dict:
    client = cut(layers, k).client
    smash = jax.jit(lambda p, s, x: client.apply(p, s, x, key=None, train=False)[0])
    smashed = smash(params[:k], model_state[:k], sample)
    out = {"dcor": float(dcor(sample, smashed))}
    if attack_inputs is not None:
      aux_smashed = smash(params[:k], model_state[:k], attack_inputs)
      knowledge = attacks.InverseNetworkKnowledge(aux_inputs=np.asarray(attack_inputs),
                                                  aux_smashed=np.asarray(aux_smashed), steps=attack_steps)
      found = attacks.inverse_network(np.asarray(smashed), knowledge, inputs=np.asarray(sample))
      # SSIM is for images (B, H, W, C); `metrics` would also score (B, length, channels) signals as images.
      out["attack_ssim"] = float(found.ssim) if sample.ndim == 4 else float("nan")
      out["attack_mse"] = float(found.mse)
    return out

  return at


def _round_time(legs, forward, backward, server_flops, bytes_up, bytes_down, *, algorithm, device,
                server_profile, num_clients, server_optimizer, batch_size) -> float:
  """Simulated seconds of one round of `algorithm` on the simulated clock, from the measured legs."""
  server_update = 0.0
  if num_clients > 1:  # the server's batch-independent update, for a step on several clients' batches
    party = legs.state.server

    def update(party, grads):
      return protocol.apply_update(party, grads, server_optimizer, party.model_state)

    server_update = _flops(jax.jit(update).lower(party, party.params).compile())
  costs = network.StepCosts(
      batch_size=batch_size, client_forward_flops=_flops(forward), client_backward_flops=_flops(backward),
      server_step_flops=server_flops, server_update_flops=server_update, local_loss_step_flops=0.0,
      model_step_flops=0.0, smashed_bytes=bytes_up, cut_gradient_bytes=bytes_down,
      client_weights_bytes=msgs.wire_size(msgs.ModelWeights(legs.state.client.params)), model_weights_bytes=0)
  return network.round_time(algorithm, costs, clients=[device] * num_clients, server=server_profile).wall_s


# ---------------------------------------------------------------------------------------------
# Choosing a cut


class NoCutFits(ValueError):
  """No profiled cut meets the constraints; the message says what would."""


_OBJECTIVES = {
    "bytes_up": "bytes_up_per_sample",
    "bytes_down": "bytes_down_per_sample",
    "bytes": "bytes_total_per_sample",
    "client_flops": "client_flops_per_sample",
    "client_flops_share": "client_flops_share",
    "client_memory": "client_peak_bytes",
    "dcor": "dcor",
    "time": "round_time_s",
}


def _objective(row: CutProfile, what: str) -> float:
  if what == "bytes_total_per_sample":
    return row.bytes_up_per_sample + row.bytes_down_per_sample
  value = getattr(row, what)
  if value is None:
    raise ValueError(f"minimize: the table has no {what} (profile with the argument that measures it)")
  return float(value)


def best_cut(table: CutTable, *, minimize: str = "bytes_up", client_memory: Any = None,
             max_dcor: float | None = None) -> CutProfile:
  """The cut that minimizes `minimize` among those that meet the constraints.

  Args:
    table: from `profile_cuts`.
    minimize: "bytes_up", "bytes_down", "bytes" (both), "client_flops", "client_flops_share",
      "client_memory", "dcor", "time", or a numeric `CutProfile` field. Ties go to the cut with
      the smaller client peak, then the earlier cut.
    client_memory: the client's memory budget, as `parse_bytes` reads it ("<=512KB", "mcu-512KB",
      a number of bytes); None for no constraint.
    max_dcor: the largest distance correlation allowed; None for no constraint.

  Raises:
    NoCutFits: no cut meets the constraints; the message gives the smallest client peak and the
      cut that has it, the memory options and the batch size that would fit (the batch size
      extrapolated linearly from the peaks measured at two batch sizes).

  Example:
    >>> import jax.numpy as jnp, optax, sljax
    >>> table = profile_cuts(sljax.models.mlp(hidden=(32, 8)), example_x=jnp.zeros((1, 64)), batch_size=8,
    ...                      client_optimizer=optax.sgd(0.1), memory_options=(), client_profile=None)
    >>> best_cut(table, minimize="bytes_up", client_memory="<=64KB").layer
    'hidden_1'
  """
  what = _OBJECTIVES.get(minimize, minimize)
  numeric = set(CutProfile._fields) - {"cut", "layer", "fits"} | {"bytes_total_per_sample"}
  if what not in numeric:
    raise ValueError(f"minimize: expected one of {sorted(_OBJECTIVES)} or a numeric CutProfile field, got "
                     f"{minimize!r}")
  if not len(table):
    raise ValueError("table: expected at least one profiled cut, got none")
  budget = None if client_memory is None else parse_bytes(client_memory, name="client_memory")
  candidates = list(table.rows)
  if budget is not None:
    candidates = [r for r in candidates if r.client_peak_bytes <= budget]
    if not candidates:
      raise NoCutFits(_what_would_fit(table, budget, client_memory))
  if max_dcor is not None:
    if any(r.dcor is None for r in candidates):
      raise ValueError("max_dcor: the table has no dcor (profile with privacy_sample=...)")
    fitting = [r for r in candidates if r.dcor <= max_dcor]
    if not fitting:
      least = min(candidates, key=lambda r: r.dcor)
      raise NoCutFits(f"max_dcor: no cut{' within the memory budget' if budget else ''} has a distance correlation "
                      f"<= {max_dcor}; the smallest is {least.dcor:.3f} at cut {least.cut} (after {least.layer!r})")
    candidates = fitting
  return min(candidates, key=lambda r: (_objective(r, what), r.client_peak_bytes, r.cut))


def _what_would_fit(table: CutTable, budget: int, asked: Any) -> str:
  """The message of `NoCutFits` for a memory budget: the smallest peak, and what would fit."""
  least = min(table.rows, key=lambda r: r.client_peak_bytes)
  lines = [f"client_memory: no cut fits {asked!r} ({budget} bytes) at batch size {table.batch_size}: the smallest "
           f"client peak is {format_bytes(least.client_peak_bytes)} at cut {least.cut} (after {least.layer!r})."]
  hints = []
  for field, what in (("remat_peak_bytes", "with remat (remat_stage)"), ("bf16_peak_bytes", "with bf16 compute")):
    fit = [r for r in table.rows if getattr(r, field) is not None and getattr(r, field) <= budget]
    if fit:
      hints.append(f"{what}: cuts {[r.cut for r in fit]} fit")
  fit = [r for r in table.rows if r.small_batch_peak_bytes is not None and r.small_batch_peak_bytes <= budget]
  if fit:
    hints.append(f"at batch size {fit[0].small_batch}: cuts {[r.cut for r in fit]} fit")
  sizes = [(b, r) for r in table.rows if (b := _largest_batch(r, table.batch_size, budget))]
  if sizes:
    b, r = max(sizes, key=lambda s: s[0])
    hints.append(f"a batch size of about {b} would fit at cut {r.cut} (extrapolated linearly from the peaks "
                 f"measured at batch sizes {r.small_batch} and {table.batch_size})")
  floor = min(table.rows, key=lambda r: r.client_param_bytes + r.client_opt_state_bytes)
  held = floor.client_param_bytes + floor.client_opt_state_bytes
  if held > budget:
    hints.append(f"even the smallest client half's params and optimizer state take {format_bytes(held)} (cut "
                 f"{floor.cut}): a smaller model, or an optimizer with less state (e.g. sgd), is needed")
  if not hints:
    hints.append("no measured option fits; profile with memory_options=('remat', 'bf16', 'small_batch') and a "
                 "smaller small_batch to see more")
  return " ".join(lines) + " What would fit: " + "; ".join(hints) + "."


def _largest_batch(row: CutProfile, batch_size: int, budget: int) -> int | None:
  """The largest batch whose peak fits `budget`, extrapolated linearly from two measured batch sizes."""
  if row.small_batch_peak_bytes is None or row.small_batch is None or row.small_batch == batch_size:
    return None
  per_example = (row.client_peak_bytes - row.small_batch_peak_bytes) / (batch_size - row.small_batch)
  fixed = row.client_peak_bytes - per_example * batch_size
  if per_example <= 0 or fixed >= budget:
    return None
  b = int((budget - fixed) // per_example)
  return b if 1 <= b < batch_size else None


# ---------------------------------------------------------------------------------------------
# Plot


_PANELS = {
    "client_flops_share": ("client share of FLOPs", lambda r: r.client_flops_share, None),
    "client_flops_per_sample": ("client FLOPs per sample", lambda r: r.client_flops_per_sample, "log"),
    "client_peak_bytes": ("client peak memory (bytes)", lambda r: r.client_peak_bytes, "log"),
    "bytes_up_per_sample": ("bytes up per sample", lambda r: r.bytes_up_per_sample, "log"),
    "bytes_down_per_sample": ("bytes down per sample", lambda r: r.bytes_down_per_sample, "log"),
    "dcor": ("distance correlation (inputs, smashed)", lambda r: r.dcor, None),
    "attack_ssim": ("inverse-network SSIM", lambda r: r.attack_ssim, None),
    "attack_mse": ("inverse-network MSE", lambda r: r.attack_mse, None),
    "round_time_s": ("simulated round time (s)", lambda r: r.round_time_s, "log"),
}


def plot_cuts(table: CutTable, *, quantities: Sequence[str] | None = None, title: str | None = None):
  """One panel per quantity against the cut; returns the matplotlib `Figure` (nothing is shown).

  The memory panel also draws the peaks with each measured memory option and the table's budget.

  Args:
    table: from `profile_cuts`.
    quantities: any of "client_flops_share", "client_flops_per_sample", "client_peak_bytes",
      "bytes_up_per_sample", "bytes_down_per_sample", "dcor", "attack_ssim", "attack_mse",
      "round_time_s"; by default those the table has (the attack's MSE only without its SSIM).
    title: the figure's title.
  """
  from sljax.plots import _figure  # noqa: PLC0415 -- a Figure a notebook shows without pyplot

  if quantities is None:  # those the table has (the attack's MSE where it has no SSIM: not images)
    def has(q):
      return all(_PANELS[q][1](r) is not None and not math.isnan(_PANELS[q][1](r)) for r in table.rows)

    quantities = [q for q in _PANELS if q not in ("client_flops_per_sample", "bytes_down_per_sample") and has(q)
                  and not (q == "attack_mse" and has("attack_ssim"))]
  for q in quantities:
    if q not in _PANELS:
      raise ValueError(f"quantities: expected a subset of {sorted(_PANELS)}, got {q!r}")
  fig = _figure(figsize=(3.2 * len(quantities), 3.2), layout="constrained")
  axes = fig.subplots(1, len(quantities), squeeze=False)[0]
  xs = np.arange(len(table.rows))
  labels = [f"{r.cut}\n{r.layer}" for r in table.rows]
  for ax, q in zip(axes, quantities):
    label, get, scale = _PANELS[q]
    ax.plot(xs, [get(r) for r in table.rows], "o-", label="as profiled")
    if q == "client_peak_bytes":
      for field, name in (("remat_peak_bytes", "remat"), ("bf16_peak_bytes", "bf16"),
                          ("small_batch_peak_bytes", f"batch {table.rows[0].small_batch}")):
        if any(getattr(r, field) is not None for r in table.rows):
          ax.plot(xs, [getattr(r, field) for r in table.rows], ".--", label=name)
      if table.budget is not None:
        ax.axhline(table.budget, color="red", linewidth=1, label=table.budget_name)
      ax.legend(fontsize=7)
    if scale:
      ax.set_yscale(scale)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_xlabel("cut (after layer)")
    ax.set_title(label, fontsize=9)
  if title:
    fig.suptitle(title)
  return fig
