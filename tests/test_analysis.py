"""The cut profiler (sljax.analysis): exact FLOPs, params and bytes of a dense stack, the client's
peak memory against a measurement of the compiled legs, remat, bad cuts, best_cut."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sljax
from sljax import analysis

B, IN, H, C = 8, 12, 6, 3


@pytest.fixture(scope="module")
def dense_table():
  """A dense stack cut after its first Dense."""
  layers = [sljax.linen_stage(nn.Dense(H)), sljax.linen_stage(nn.Dense(C))]
  return analysis.profile_cuts(layers, example_x=jnp.zeros((1, IN)), batch_size=B,
                               client_optimizer=optax.sgd(0.1, momentum=0.9), memory_options=(),
                               client_profile="phone_lte",
                               privacy_sample=jax.random.normal(jax.random.key(1), (32, IN)))


def test_dense_stack_flops_params_and_bytes_are_exact(dense_table):
  (row,) = dense_table.rows
  assert (row.cut, row.layer) == (1, "layer_0")
  params = IN * H + H
  # XLA's count, by hand. Forward: the matmul (2 flops per multiply-add) and the bias add.
  forward = 2 * B * IN * H + B * H
  # Backward: dW = x^T g (no gradient wrt the inputs: nothing before the first layer), db = the
  # sum of g over the batch (B - 1 additions per unit), then SGD with momentum: 4 flops per param
  # (m = g + 0.9 m: two; u = -lr m: one; p + u: one).
  backward = 2 * B * IN * H + (B - 1) * H + 4 * params
  assert row.client_flops_per_sample * B == forward + backward
  assert row.client_param_bytes == 4 * params
  assert row.client_opt_state_bytes == 4 * params  # the momentum trace, one float32 per param
  # The real serialized messages: the smashed data and the labels up, the cut gradient down.
  up = sljax.to_bytes(sljax.SmashedData(np.zeros((B, H), np.float32), np.zeros((B,), np.int32)))
  down = sljax.to_bytes(sljax.CutGradient(np.zeros((B, H), np.float32)))
  assert row.bytes_up_per_sample * B == len(up)
  assert row.bytes_down_per_sample * B == len(down)
  assert B * (4 * H + 4) < len(up) < B * (4 * H + 4) + 200  # the payload, plus a small msgpack envelope
  assert 0 < row.client_flops_share < 1 and row.server_flops_per_sample > 0
  assert 0.0 <= row.dcor <= 1.0 and row.round_time_s > 0
  assert dense_table.to_dict()["rows"][0]["client_param_bytes"] == 4 * params


# A measurement of the compiled legs: the peak of the sum of live buffer sizes along the executable's
# schedule. The compiled (optimized, scheduled) HLO lists the instructions in the order they run;
# a buffer lives from the instruction that defines it to its last use (the outputs to the end),
# the arguments throughout. Bitcasts, tuples and get-tuple-elements are views, not buffers, and an
# output that the executable aliases to a donated argument is written over it. This walks the
# program, independently of XLA's buffer assignment (which `memory_analysis` reports).

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_VIEWS = {"bitcast", "tuple", "get-tuple-element"}


def _type_bytes(text: str) -> int:
  return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text) if dt in _DTYPE_BYTES)


def _split_instruction(line: str):
  """(is_root, name, type text, opcode, rest) of one HLO instruction line."""
  m = re.match(r"\s*(ROOT\s+)?%(\S+)\s*=\s*", line)
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple type: up to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    type_text, rest = rest.split(" ", 1)
  opcode, rest = rest.split("(", 1)
  return bool(m.group(1)), m.group(2), type_text, opcode.strip(), rest


def live_buffer_peak(compiled) -> int:
  text = compiled.as_text()
  aliased_outputs = {int(i) for i in re.findall(r"\{(\d+)\}: \(\d+, \{\}, may-alias\)", text.split("\n", 1)[0])}
  entry = text[text.index("\nENTRY"):].split("\n")[2:]  # the lines after "ENTRY ... {"
  instructions = []
  for line in entry:
    if line.strip() == "}":
      break
    instructions.append(_split_instruction(line))
  names = {name for _, name, _, _, _ in instructions}
  arguments, size, buffers_of, defined, last_use = 0, {}, {}, {}, {}
  for i, (root, name, type_text, opcode, rest) in enumerate(instructions):
    operands = [o for o in re.findall(r"%([\w.\-]+)", rest) if o in names]
    for o in operands:
      for buf in buffers_of[o]:
        last_use[buf] = i
    if opcode == "parameter":
      arguments += _type_bytes(type_text)
      buffers_of[name] = set()
    elif opcode == "constant":
      buffers_of[name] = set()
    elif opcode in _VIEWS:
      buffers_of[name] = set().union(*(buffers_of[o] for o in operands)) if operands else set()
    else:
      buffers_of[name], size[name], defined[name], last_use[name] = {name}, _type_bytes(type_text), i, i
    if root:
      end = len(instructions)
      outputs = operands if opcode == "tuple" else [name]
      for index, o in enumerate(outputs):
        for buf in buffers_of[o]:
          last_use[buf] = end
          if index in aliased_outputs:
            size[buf] = 0  # written over the donated argument
  live = [0] * (len(instructions) + 1)
  for buf, n in size.items():
    for i in range(defined[buf], last_use[buf] + 1):
      live[i] += n
  return arguments + max(live)


def test_peak_memory_is_within_20_percent_of_the_compiled_legs_and_remat_lowers_it():
  # Two conv blocks with batch norm on the client: their pullback keeps several activations per block.
  layers = sljax.models.cnn(channels=(8, 8), hidden=8, batch_norm=True)
  example_x, opt = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32), optax.adam(1e-3)
  model = sljax.cut(layers, 2)
  # The legs as profile_cuts compiles them, and its figures: XLA's memory analysis of each leg.
  legs = analysis._abstract_legs(model, example_x, 16, jax.random.key(0), client_optimizer=opt, server_optimizer=opt)
  forward, backward = analysis._compile_client_legs(legs, jax.random.key(0))
  estimated = {"forward": analysis.leg_memory(forward).needed, "backward": analysis.leg_memory(backward).needed}
  measured = {"forward": live_buffer_peak(forward), "backward": live_buffer_peak(backward)}
  for leg in measured:
    assert abs(estimated[leg] - measured[leg]) <= 0.2 * measured[leg], (leg, estimated, measured)
  peak = max(estimated.values())
  remat = analysis._client_peak(model._replace(client=analysis.remat_stage(model.client)), example_x, 16,
                                jax.random.key(0), client_optimizer=opt, server_optimizer=opt)
  # Under remat the pullback keeps each block's input only, and the backward recomputes one block at
  # a time: a lower peak (by 14% here on XLA:CPU, whose schedule keeps more of the recomputation live).
  assert remat < 0.9 * peak, (remat, peak)


def test_a_cut_out_of_range_or_unknown_names_the_valid_cut_points():
  layers = sljax.models.mlp(hidden=(4, 4))
  kwargs = dict(example_x=jnp.zeros((1, 5)), batch_size=2, client_optimizer=optax.sgd(0.1))
  valid = r"the valid cut points are 1 \(after 'hidden_0'\), 2 \(after 'hidden_1'\)"
  with pytest.raises(ValueError, match=r"cuts: cut 3 is out of range for a stack of 3 layers; " + valid):
    analysis.profile_cuts(layers, cuts=[3], **kwargs)
  with pytest.raises(ValueError, match=r"cuts: cut 0 is out of range"):
    analysis.profile_cuts(layers, cuts=[0], **kwargs)
  with pytest.raises(ValueError, match=r"cuts: no cut after a layer named 'conv_0'; " + valid):
    analysis.profile_cuts(layers, cuts=["conv_0"], **kwargs)


def test_the_attack_needs_a_privacy_sample():
  with pytest.raises(ValueError, match=r"attack_inputs: the attack reconstructs privacy_sample; expected a "
                                       r"privacy_sample too, got None"):
    analysis.profile_cuts(sljax.models.mlp(hidden=(4,)), example_x=jnp.zeros((1, 5)), batch_size=2,
                          client_optimizer=optax.sgd(0.1), attack_inputs=jnp.zeros((4, 5)))


def test_a_cut_where_the_model_cannot_be_cut_names_the_valid_cut_points():
  # Between the two middle layers the activations are a pair, not one array of smashed data.
  layers = [sljax.linen_stage(nn.Dense(4), name="dense"), sljax.function_stage(lambda h: (h, 2 * h), name="pair"),
            sljax.function_stage(lambda hs: hs[0] + hs[1], name="join"), sljax.linen_stage(nn.Dense(3), name="out")]
  with pytest.raises(ValueError, match=r"cuts: the model cannot be cut at 2 \(after 'pair'\): .*The valid cut points "
                                       r"are 1 \(after 'dense'\), 3 \(after 'join'\)$"):
    analysis.profile_cuts(layers, cuts=[2], example_x=jnp.zeros((1, 5)), batch_size=2,
                          client_optimizer=optax.sgd(0.1))


def _row(cut, peak, up, **kw):
  base = dict(cut=cut, layer=f"layer_{cut - 1}", client_flops_per_sample=1e3 * cut, server_flops_per_sample=1e3,
              client_flops_share=cut / (cut + 1), client_param_bytes=1000 * cut, client_opt_state_bytes=2000 * cut,
              bytes_up_per_sample=up, bytes_down_per_sample=up, client_peak_bytes=peak, client_forward_bytes=peak,
              client_backward_bytes=peak)
  return analysis.CutProfile(**{**base, **kw})


def test_best_cut_minimizes_within_the_budget():
  table = analysis.CutTable((_row(1, 100 * 1024, 400.0), _row(2, 300 * 1024, 100.0), _row(3, 900 * 1024, 20.0)),
                            batch_size=32)
  assert analysis.best_cut(table, minimize="bytes_up").cut == 3
  assert analysis.best_cut(table, minimize="bytes_up", client_memory="<=512KB").cut == 2
  assert analysis.best_cut(table, minimize="bytes_up", client_memory="mcu-256KB").cut == 1
  assert analysis.best_cut(table, minimize="client_memory", client_memory=10**9).cut == 1
  with pytest.raises(ValueError, match=r"minimize: expected one of .*'bytes_up'.*got 'speed'"):
    analysis.best_cut(table, minimize="speed")


def test_best_cut_with_no_fit_says_what_would():
  rows = (_row(1, 700 * 1024, 400.0, small_batch=8, small_batch_peak_bytes=400 * 1024, remat_peak_bytes=500 * 1024),
          _row(2, 2048 * 1024, 100.0, small_batch=8, small_batch_peak_bytes=1024 * 1024, remat_peak_bytes=1500 * 1024))
  table = analysis.CutTable(rows, batch_size=32)
  with pytest.raises(analysis.NoCutFits, match=r"client_memory: no cut fits '<=512KB' \(524288 bytes\) at batch size "
                                               r"32: the smallest client peak is 700 KB at cut 1 \(after 'layer_0'\)\. "
                                               r"What would fit: with remat \(remat_stage\): cuts \[1\] fit; at batch "
                                               r"size 8: cuts \[1\] fit; a batch size of about 16 would fit at cut 1"):
    analysis.best_cut(table, client_memory="<=512KB")
  with pytest.raises(analysis.NoCutFits, match=r"params and optimizer state take 2.93 KB"):
    analysis.best_cut(table, client_memory=1000)


def test_budgets_and_plot():
  assert analysis.parse_bytes("mcu-256KB") == 262144 and analysis.parse_bytes("phone-2GB") == 2 * 1024**3
  assert analysis.parse_bytes("<=512KB") == 524288 and analysis.parse_bytes(" 1.5 MB") == 1572864
  with pytest.raises(ValueError, match=r"budget: expected a number of bytes, one of .* got 'lots'"):
    analysis.parse_bytes("lots")
  table = analysis.CutTable((_row(1, 1000, 40.0, dcor=0.9), _row(2, 2000, 20.0, dcor=0.5)), batch_size=4,
                            budget=1500, budget_name="1.5 KB")
  fig = analysis.plot_cuts(table, title="t")
  assert [ax.get_title() for ax in fig.axes][:3] == ["client share of FLOPs", "client peak memory (bytes)",
                                                     "bytes up per sample"]
  assert "fits 1.5 KB" in str(table) and "0.500" in str(table)


def test_cli_names_the_valid_cut_points(capsys):
  from sljax import cli

  assert cli.main(["profile-cuts", "--model", "mlp", "--cuts", "3", "--privacy-sample", "0"]) == 2
  assert "sljax profile-cuts: cuts: cut 3 is out of range for a stack of 3 layers; the valid cut points are 1 " \
         "(after 'hidden_0'), 2 (after 'hidden_1')" in capsys.readouterr().err
