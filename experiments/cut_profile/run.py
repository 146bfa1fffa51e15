"""Where to cut the ResNet-style CNN and the ViT (and the 1-D sensor model): the cut table (sljax.analysis).

For each model: train it centrally (seeded) on digits (8x8 images; the 1-D model on MNIST-1D) so
that the privacy proxy is a trained network's, then profile every cut at batch 32 with Adam: client
FLOPs share, client peak memory (and with remat, bf16 compute, batch 8), bytes per sample up and
down, distance correlation between test inputs and their smashed data and the SSIM of a black-box
inverse network's reconstructions of them (trained on 1024 training inputs), simulated round time (the
image models' client a phone on LTE, the sensor model's a microcontroller on BLE; a GPU server), and
which cuts fit a 512 KB microcontroller and a 2 GB phone.

    .venv/bin/python experiments/cut_profile/run.py [--quick] [--out experiments/cut_profile]

Writes results.json and cut_profile_<model>.png; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import optax

import sljax
from sljax import analysis, protocol, training


def trained_variables(layers, ds, *, epochs: int, seed: int):
  """(params, model_state) of sequential(*layers), trained centrally; and the test accuracy."""
  central = protocol.centralized(sljax.cut(layers, 1), optimizer=optax.adam(2e-3))
  state = central.init(jax.random.key(seed), ds.x_train[:1])
  if epochs:
    state, _ = training.fit(central, state, ds.x_train, ds.y_train, key=jax.random.key(seed + 1), epochs=epochs,
                            batch_size=32, progress=False)
  accuracy = training.evaluate(central, state, ds.x_test, ds.y_test)["accuracy"]
  (pc, ps), (sc, ss) = state.params, state.model_state
  return (tuple(pc) + tuple(ps), tuple(sc) + tuple(ss)), float(accuracy)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 epochs, a 128-image privacy sample")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args(argv)
  digits = sljax.data.load_digits(seed=args.seed, image=True)
  epochs, sample = (2, 128) if args.quick else (10, 256)
  # model: (layers, data, the client's device profile for the simulated round)
  setups = {"resnet": (sljax.models.resnet(), digits, "phone_lte"),
            "vit": (sljax.models.vit(), digits, "phone_lte"),
            "ds_cnn1d": (sljax.models.ds_cnn1d(), sljax.data.make_mnist1d(seed=args.seed), "microcontroller_ble")}
  results = {"command": " ".join(sys.argv), "quick": args.quick, "seed": args.seed, "epochs": epochs,
             "privacy_sample": sample, "jax": jax.__version__, "backend": jax.default_backend(),
             "machine": platform.machine(), "models": {}}
  for name, (layers, ds, device) in setups.items():
    start = time.perf_counter()
    variables, accuracy = trained_variables(layers, ds, epochs=epochs, seed=args.seed)
    table = analysis.profile_cuts(layers, example_x=ds.x_train[:1], batch_size=args.batch_size,
                                  client_optimizer=optax.adam(1e-3), budget="mcu-512KB",
                                  privacy_sample=ds.x_test[:sample], attack_inputs=ds.x_train[:1024],
                                  variables=variables, client_profile=device,
                                  key=jax.random.key(args.seed))
    fits = {}
    for budget in ("mcu-512KB", "phone-2GB"):
      limit = analysis.parse_bytes(budget)
      options = (("", "client_peak_bytes"), (" with remat", "remat_peak_bytes"), (" with bf16", "bf16_peak_bytes"),
                 (f" at batch {table[0].small_batch}", "small_batch_peak_bytes"))
      for option, field in options:
        fits[budget + option] = [r.cut for r in table if getattr(r, field) <= limit]
    try:
      best = analysis.best_cut(table, minimize="bytes_up", client_memory="mcu-512KB").to_dict()
    except analysis.NoCutFits as e:
      best = str(e)
    seconds = time.perf_counter() - start
    results["models"][name] = {"test_accuracy": accuracy, "table": table.to_dict(), "fits": fits,
                               "best_cut_bytes_up_within_512KB": best,
                               "best_cut_bytes_up_on_a_phone": analysis.best_cut(
                                   table, minimize="bytes_up", client_memory="phone-2GB").to_dict(),
                               "seconds": seconds}
    print(f"\n{name} on {ds.name} {ds.x_train.shape[1:]}: test accuracy {accuracy:.3f} after {epochs} epochs "
          f"(centralized); {seconds:.0f} s")
    print(table)
    print("cuts that fit: " + "; ".join(f"{what}: {cuts}" for what, cuts in fits.items()))
    print(f"least bytes up within 512 KB: {best if isinstance(best, str) else best['cut']}")
    analysis.plot_cuts(table, title=f"{name} on {ds.name}, batch {args.batch_size}").savefig(
        os.path.join(args.out, f"cut_profile_{name}.png"), dpi=110)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
