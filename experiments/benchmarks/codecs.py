"""Test accuracy against bytes on the wire for the codecs on the cut (vanilla SL on digits).

The demo models and schedule (`sljax demo`): the MLP `cut(mlp(hidden=(128, 128)), 1)` on flat
digits for 20 epochs, the CNN `cut(cnn(), 2)` on (8, 8, 1) digits for 10 epochs, Adam(2e-3) on
both halves, batch 32, one client and one server (`sljax.vanilla`). Each setting puts a codec on
the uplink (the smashed data, client -> server) and/or the downlink (the cut gradient, server ->
client); the rest of the run is identical, down to the model's keys.

Per setting it reports the test accuracy (`sljax.evaluate` on the 360 held-out digits) as the
mean and sample standard deviation over `--seeds` seeds, the accuracy change against no codec
(paired: seed s with a codec minus seed s without, so both share the data split, the
initialisation and the batch order), the exact training bytes per epoch up and down (the wire
bytes of every message, from `fit`'s history), and how many times fewer bytes than no codec.
Seed s is the demo's `--seed s`: the train/test split, the init key `key(s)`, the fit key
`key(s + 1)`.

One test example is 0.28 points of accuracy, and a run's accuracy moves by a few tenths of a
point from seed to seed: read a delta against its spread, not alone.

The target (the codecs issue): 8-bit quantization on the uplink and the downlink costs less than
0.5 point of test accuracy (mean over seeds) at about 4x fewer bytes. Each row carries its
minimum and level width as float32 (8 bytes), so a row of D values costs D + 8 bytes instead of
4D: the ceiling is 4D / (D + 8), 3.76x for the MLP's 128-wide cut and 3.94x for the CNN's 512.
With `per="tensor"` (setting "q8 per tensor") one minimum and level width serve the whole
message: B rows cost B * D + 8 bytes, a ceiling just under 4x for any width. The uplink also
carries the int32 labels uncompressed, and msgpack framing adds a few bytes. The check asks, for
each of the two 8-bit settings, for a wire ratio (up + down) of at least 3.9x at the printed
precision; the codec's own payload ratio is printed next to it.

Reading the sparsifier rows. The client maps the cut gradient back through its uplink codec
(`sljax.codecs.cotangent`): through a sparsifier exactly, masked to the coordinates sent and
rescaled like them, unless the codec is built with `straight_through=True`. Inference
(`evaluate` runs `Vanilla.predict`) also goes through the uplink codec.

  top10% EF up  Error feedback keeps the residual per *row of the batch*, but a row holds a
                different example at every step (shuffled batches), so the server gets, under
                each example's label, partly the leftovers of earlier examples. It trains with
                the exact gradient (MLP ~95%, CNN ~96%), a little worse than without feedback;
                with the straight-through gradient (the library before the exact backward)
                training stalled (MLP ~74%, CNN ~11%). Error feedback suits sums over steps
                (parameter gradients), not per-example messages.
  top10% up /   The exact gradient moves only the coordinates that were sent; straight through,
  top10% ST up  the client also moves the ones that were not. The biased straight-through
                gradient trains this cut better (about -0.8 point against -2 for the exact one).
  rand25% up    Random-k at 25% with the D/k rescaling is dropout 0.75 at the cut, at training
                and, through the codec, at inference too: the test accuracy pays for the
                noise at inference. With the straight-through gradient (no mask, no rescale)
                the MLP lost ~22 points and the CNN ~42; with the exact one ~8 and ~5.

Compiled programs are shared between runs through a temporary persistent compilation cache.

Usage:
  .venv/bin/python experiments/benchmarks/codecs.py [--quick] [--seeds 3] [--models mlp,cnn] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sljax
from common import emit, environment

codecs = sljax.codecs

BATCH_SIZE = 32
LEARNING_RATE = 2e-3
# 8-bit both ways, with per-row or per-tensor statistics: each is checked.
TARGET = {"settings": ("q8", "q8 per tensor"), "max_accuracy_drop_points": 0.5, "min_bytes_ratio": 3.9}


class Setup(NamedTuple):
  """A demo model: how to build it, which digits it reads, how long it trains."""

  name: str
  model: Callable[[], sljax.SplitModel]
  image: bool
  epochs: int
  clip_norm: float  # for clip+q8: about the median smashed-data row norm at initialisation


SETUPS = {
    "mlp": Setup("MLP", lambda: sljax.cut(sljax.models.mlp(hidden=(128, 128)), 1), False, 20, 4.0),
    "cnn": Setup("CNN", lambda: sljax.cut(sljax.models.cnn(), 2), True, 10, 9.0),
}


class Setting(NamedTuple):
  """A codec on each link (None: sent as it is) and short labels for the table."""

  name: str
  up: str
  down: str
  uplink: codecs.Codec | None
  downlink: codecs.Codec | None


def settings(setup: Setup, *, quick: bool) -> list[Setting]:
  """The settings compared; the first is the reference (no codec)."""
  q8, q4 = codecs.quantize(bits=8), codecs.quantize(bits=4)  # stateless: one serves both links
  q8t = codecs.quantize(bits=8, per="tensor")
  bf16 = codecs.cast(dtype=jnp.bfloat16)
  everything = [
      Setting("none", "-", "-", None, None),
      Setting("bf16", "bf16", "bf16", bf16, bf16),
      Setting("q8", "q8", "q8", q8, q8),
      Setting("q8 per tensor", "q8/t", "q8/t", q8t, q8t),
      Setting("q4", "q4", "q4", q4, q4),
      Setting("q2 up", "q2", "-", codecs.quantize(bits=2), None),
      Setting("top10% EF up", "top10%+EF", "-", codecs.top_k(fraction=0.1, error_feedback=True), None),
      # The same without error feedback: the residual of one batch's examples is added to the
      # next batch's (different) examples, so feedback may hurt smashed data rather than help.
      Setting("top10% up", "top10%", "-", codecs.top_k(fraction=0.1), None),
      # The client's gradient straight through the sparsifier instead of its exact transpose.
      Setting("top10% ST up", "top10%/ST", "-", codecs.top_k(fraction=0.1, straight_through=True), None),
      Setting("rand25% up", "rand25%", "-", codecs.random_k(fraction=0.25), None),
      Setting("clip+q8 up", f"clip{setup.clip_norm:g}+q8", "-",
              codecs.chain(codecs.clip(max_norm=setup.clip_norm), q8), None),
  ]
  if quick:
    return [s for s in everything if s.name in ("none", "q8", "q8 per tensor", "q4", "top10% EF up")]
  return everything


def payload_bytes(codec: codecs.Codec | None, cut: jax.ShapeDtypeStruct) -> int:
  """Bytes of what the codec makes of one batch at the cut, without labels or framing."""
  if codec is None:
    return codecs.payload_nbytes(cut)
  payload, _ = jax.eval_shape(codec.encode, cut, codec.init(cut), jax.random.key(0))
  return codecs.payload_nbytes(payload)


def train(setup: Setup, setting: Setting, ds, seed: int) -> dict:
  """One run: train with the setting's codecs, evaluate, and read the bytes from the history."""
  start = time.perf_counter()
  adam = optax.adam(LEARNING_RATE)
  sl = sljax.vanilla(setup.model(), client_optimizer=adam, server_optimizer=adam,
                     uplink=setting.uplink, downlink=setting.downlink)
  # A batch of the training batch size: stateful codecs (error feedback) size their state from it.
  state = sl.init(jax.random.key(seed), ds.x_train[:BATCH_SIZE])
  state, history = sljax.fit(sl, state, ds.x_train, ds.y_train, key=jax.random.key(seed + 1),
                             epochs=setup.epochs, batch_size=BATCH_SIZE)
  test = sljax.evaluate(sl, state, ds.x_test, ds.y_test)
  per_epoch = {(h["bytes_up"], h["bytes_down"]) for h in history}
  assert len(per_epoch) == 1, f"bytes differ between epochs: {per_epoch}"
  ((bytes_up, bytes_down),) = per_epoch
  spec = state.server.input_spec
  cut = jax.ShapeDtypeStruct((BATCH_SIZE, *spec.shape), spec.dtype)
  return {
      "model": setup.name, "setting": setting.name, "seed": seed, "test_accuracy": test["accuracy"],
      "final_train_loss": history[-1]["loss"], "bytes_up_per_epoch": bytes_up, "bytes_down_per_epoch": bytes_down,
      "payload_up_per_step": payload_bytes(setting.uplink, cut),
      "payload_down_per_step": payload_bytes(setting.downlink, cut),
      "seconds": time.perf_counter() - start,
  }


def _std(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(setup: Setup, setting: Setting, runs: list[dict], reference: list[dict]) -> dict:
  """Mean and spread over seeds, paired deltas and byte ratios against the reference runs."""
  accuracy = np.array([r["test_accuracy"] for r in runs]) * 100
  delta = accuracy - np.array([r["test_accuracy"] for r in reference]) * 100
  first, ref = runs[0], reference[0]
  for key in ("bytes_up_per_epoch", "bytes_down_per_epoch"):  # static: the same for every seed
    assert len({r[key] for r in runs}) == 1, key
  up, down = first["bytes_up_per_epoch"], first["bytes_down_per_epoch"]
  ref_up, ref_down = ref["bytes_up_per_epoch"], ref["bytes_down_per_epoch"]
  payload = first["payload_up_per_step"] + first["payload_down_per_step"]
  ref_payload = ref["payload_up_per_step"] + ref["payload_down_per_step"]
  return {
      "model": setup.name, "setting": setting.name, "uplink": setting.up, "downlink": setting.down,
      "epochs": setup.epochs, "seeds": [r["seed"] for r in runs],
      "accuracy_mean": float(accuracy.mean()), "accuracy_std": _std(accuracy),
      "delta_mean": float(delta.mean()), "delta_std": _std(delta),
      "final_train_loss_mean": float(np.mean([r["final_train_loss"] for r in runs])),
      "bytes_up_per_epoch": up, "bytes_down_per_epoch": down,
      "ratio_up": ref_up / up, "ratio_down": ref_down / down, "ratio_total": (ref_up + ref_down) / (up + down),
      "payload_ratio": ref_payload / payload,
      "seconds": sum(r["seconds"] for r in runs),
  }


def check_target(rows: list[dict]) -> list[dict]:
  """Whether 8-bit both ways costs < 0.5 point at >= 3.9x fewer bytes, per model."""
  verdicts = []
  for row in rows:
    if row["setting"] not in TARGET["settings"]:
      continue
    drop = 0.0 - row["delta_mean"]  # 0.0 - : no "-0.00"
    accuracy_ok = drop < TARGET["max_accuracy_drop_points"]
    bytes_ok = round(row["ratio_total"], 2) >= TARGET["min_bytes_ratio"]
    verdicts.append({"model": row["model"], "setting": row["setting"], "accuracy_drop_points": drop, "accuracy_drop_std": row["delta_std"],
                     "ratio_total": row["ratio_total"], "payload_ratio": row["payload_ratio"],
                     "accuracy_ok": bool(accuracy_ok), "bytes_ok": bool(bytes_ok),
                     "met": bool(accuracy_ok and bytes_ok)})
  return verdicts


def run(model_names: list[str], seeds: list[int], *, quick: bool, log: Callable[[str], None]) -> tuple[list, list]:
  rows, runs = [], []
  for model_name in model_names:
    setup = SETUPS[model_name]
    datasets = {seed: sljax.data.load_digits(seed=seed, image=setup.image) for seed in seeds}
    reference = None
    for setting in settings(setup, quick=quick):
      setting_runs = [train(setup, setting, datasets[seed], seed) for seed in seeds]
      reference = reference or setting_runs
      runs.extend(setting_runs)
      rows.append(summarize(setup, setting, setting_runs, reference))
      accuracies = " ".join(f"{100 * r['test_accuracy']:.2f}" for r in setting_runs)
      log(f"{setup.name} {setting.name}: test accuracy {accuracies} ({rows[-1]['seconds']:.1f} s)")
  return rows, runs


def _kb(n: int) -> str:
  return f"{n / 1e3:.1f}"


def _print_table(result: dict) -> None:
  seeds = result["seeds"]
  print(f"codecs on the cut: vanilla SL on digits, batch {BATCH_SIZE}, adam {LEARNING_RATE:g}, seeds {seeds}; "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  print(f"{'model':5} {'setting':13} {'up':>11} {'down':>5} {'test acc %':>13} {'delta pt':>13} {'train loss':>10} "
        f"{'kB up/ep':>9} {'kB dn/ep':>9} {'x up':>6} {'x down':>6} {'x total':>7}")
  for r in result["rows"]:
    print(f"{r['model']:5} {r['setting']:13} {r['uplink']:>11} {r['downlink']:>5} "
          f"{r['accuracy_mean']:6.2f} ± {r['accuracy_std']:4.2f} {r['delta_mean']:+6.2f} ± {r['delta_std']:4.2f} "
          f"{r['final_train_loss_mean']:10.2e} {_kb(r['bytes_up_per_epoch']):>9} {_kb(r['bytes_down_per_epoch']):>9} "
          f"{r['ratio_up']:6.2f} {r['ratio_down']:6.2f} {r['ratio_total']:7.2f}")
  print("test acc: mean ± sample std over seeds (360 test digits; one digit = 0.28 pt). delta: paired, same seed "
        "without codec. x: times fewer exact wire bytes than no codec (labels and framing included). "
        "train loss: last epoch's mean.")
  for v in result["target"]:
    status = "MET" if v["met"] else "NOT MET"
    print(f"target {v['model']} {v['setting']} (8 bits up and down: drop < {TARGET['max_accuracy_drop_points']} pt, "
          f">= {TARGET['min_bytes_ratio']}x bytes): {status} -- accuracy drop {v['accuracy_drop_points']:+.2f} "
          f"± {v['accuracy_drop_std']:.2f} pt ({'ok' if v['accuracy_ok'] else 'too much'}), wire bytes "
          f"{v['ratio_total']:.2f}x ({'ok' if v['bytes_ok'] else 'too few'}; codec payload "
          f"{v['payload_ratio']:.2f}x)")
  print(f"total {result['seconds']:.0f} s")


def _share_compilations(directory: str) -> None:
  """Lets runs reuse each other's compiled programs through a persistent compilation cache.

  `fit` and `init` jit afresh on every call, but the programs are the same for every seed of a
  setting (and `init`'s for every setting): on a loaded 2-core machine this saves about 6 s of
  compilation per CNN run. Results do not change. A cache the user configured is left alone.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  parser.add_argument("--quick", action="store_true", help="one seed and four settings")
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1 (ignored with --quick)")
  parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
  args = parser.parse_args(argv)
  model_names = [m for m in args.models.split(",") if m]
  unknown = sorted(set(model_names) - set(SETUPS))
  if unknown:
    parser.error(f"--models: expected names among {sorted(SETUPS)}, got {unknown}")
  seeds = [0] if args.quick else list(range(args.seeds))
  start = time.perf_counter()
  env = environment()
  log = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
  with tempfile.TemporaryDirectory(prefix="sljax-codecs-") as cache:
    _share_compilations(cache)
    rows, runs = run(model_names, seeds, quick=args.quick, log=log)
  result = {"benchmark": "codecs", "seeds": seeds, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
            "environment": env, "rows": rows, "runs": runs, "target": check_target(rows),
            "seconds": time.perf_counter() - start}
  return emit(result, as_json=args.json, print_table=_print_table)


if __name__ == "__main__":
  sys.exit(main())
