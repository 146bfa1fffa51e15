"""The `sljax` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import jax
import optax

from sljax import data, models, protocol, split, training


def _demo_runs(args) -> list[dict]:
  """Trains the demo MLP and CNN on digits: vanilla and U-shaped split, and centralized."""
  digits_img = data.load_digits(seed=args.seed, image=True)
  digits_flat = data.load_digits(seed=args.seed, image=False)
  setups = [
      ("MLP", digits_flat, models.mlp(hidden=(128, 128)), (1,), (1, 2), args.epochs_mlp),
      ("CNN", digits_img, models.cnn(), (2,), (2, 3), args.epochs_cnn),
  ]
  rows = []
  for name, ds, layers, vanilla_cut, u_cut, epochs in setups:
    runs = [
        ("split", protocol.vanilla, split.cut(layers, *vanilla_cut)),
        ("u-shaped", protocol.u_shaped, split.cut(layers, *u_cut)),
        ("centralized", None, split.cut(layers, *vanilla_cut)),
    ]
    for how, factory, model in runs:
      opt = optax.adam(args.lr)
      if factory is None:
        trainer = protocol.centralized(model, optimizer=opt)
      else:
        trainer = factory(model, client_optimizer=opt, server_optimizer=opt)
      start = time.perf_counter()
      state = trainer.init(jax.random.key(args.seed), ds.x_train[:1])
      state, history = training.fit(
          trainer, state, ds.x_train, ds.y_train, key=jax.random.key(args.seed + 1), epochs=epochs,
          batch_size=args.batch_size, progress=not args.json, description=f"{name} {how}",
      )
      test = training.evaluate(trainer, state, ds.x_test, ds.y_test)
      rows.append({
          "model": name, "training": how, "epochs": epochs, "test_accuracy": test["accuracy"],
          "train_bytes_up": sum(h["bytes_up"] for h in history),
          "train_bytes_down": sum(h["bytes_down"] for h in history),
          "inference_bytes_up": test["bytes_up"], "inference_bytes_down": test["bytes_down"],
          "seconds": time.perf_counter() - start,
      })
  return rows


def _mb(n: int) -> str:
  return f"{n / 1e6:.2f}"


def demo(args) -> int:
  start = time.perf_counter()
  rows = _demo_runs(args)
  total = time.perf_counter() - start
  if args.json:
    print(json.dumps({"runs": rows, "total_seconds": total}))
    return 0
  print(f"sljax demo: digits (scikit-learn), 1 client + 1 server, {jax.device_count()} {jax.default_backend()} device(s)")
  print(f"{'model':5} {'training':12} {'epochs':>6} {'test acc':>8} {'train MB up':>11} {'train MB down':>13} "
        f"{'infer MB up':>11} {'infer MB down':>13} {'seconds':>7}")
  for r in rows:
    print(f"{r['model']:5} {r['training']:12} {r['epochs']:6d} {r['test_accuracy']:8.4f} {_mb(r['train_bytes_up']):>11} "
          f"{_mb(r['train_bytes_down']):>13} {_mb(r['inference_bytes_up']):>11} {_mb(r['inference_bytes_down']):>13} "
          f"{r['seconds']:7.1f}")
  print(f"total {total:.1f} s (compilation included). Bytes are exact wire bytes of the messages; "
        "inference sends no labels.")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sljax", description="Split learning for JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="train the demo models on digits, split and centralized")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs-mlp", type=int, default=20)
  p.add_argument("--epochs-cnn", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  p.set_defaults(run=demo)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
