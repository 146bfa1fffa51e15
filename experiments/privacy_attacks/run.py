"""Two studies of the attacks in sljax.privacy.attacks, seeded, each writing a table, JSON and a plot.

  cut_depth       Input reconstruction against the cut depth on digits: the demo CNN (conv 16, conv 32 +
                  pool, dense 64, output) trained once (split training equals centralized training of the
                  composed model, so every cut has the same accuracy), then the first k layers (k = 1, 2,
                  3) attacked as the client half: white-box inversion (knowing the half, TV prior) and
                  the black-box inverse network (auxiliary data: 512 training digits), on 64 test digits;
                  SSIM, PSNR, and the distance correlation of inputs and smashed data.
  label_leakage   Label leakage from the cut gradient on imbalanced binary tasks (synthetic with positive
                  rate 0.1; breast_cancer with malignant = 1, rate 0.37): vanilla SL recorded into a
                  transcript for each defense (none, max-norm, Marvell at several power scales, Gaussian
                  noise on the cut gradient at several scales), then norm and direction scoring on the
                  transcript (mean AUC from the third step on, p95 leak) against the test AUC each costs.
  frontier        The privacy-utility frontier on digits (MLP, the client one dense layer of 64): NoPeek at
                  several alphas and Gaussian noise on the smashed data at several multipliers (clipped at
                  the rows' median norm), each against the distance correlation of inputs and what the
                  server receives, the black-box inverse network's reconstruction error, and test accuracy.
  hijacking       Feature-space hijacking by a malicious server (Pasquini et al.) on digits (CNN, the client
                  one convolution of 16 channels) against the honest server's black-box inverse network
                  after as many steps, undefended and with Gaussian noise on the uplink.

Usage:
  .venv/bin/python experiments/privacy_attacks/run.py [--quick] [--studies cut_depth,label_leakage,frontier,hijacking]
      [--out DIR]

Writes DIR/results.json (the studies not rerun are kept), DIR/cut_depth.png,
DIR/label_leakage_<dataset>.png, DIR/frontier.png (DIR: this folder by default) and prints the
tables. `--quick` trains fewer epochs and runs fewer defense strengths (a few minutes on a loaded
2-core CPU; `--quick --studies frontier` about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import roc_auc_score

import sljax
from sljax.privacy import attacks, defenses, metrics, report
from sljax.privacy import transcript as transcript_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def cut_depth(args) -> list[dict]:
  ds = sljax.data.load_digits(seed=args.seed)
  layers = sljax.models.cnn()
  model = sljax.cut(layers, 1)
  opt = optax.adam(1e-3)
  sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
  state = sl.init(jax.random.key(args.seed), ds.x_train[:32])
  state, history = sljax.fit(sl, state, ds.x_train, ds.y_train, key=jax.random.key(args.seed + 1),
                             epochs=3 if args.quick else 10, batch_size=32)
  accuracy = sljax.evaluate(sl, state, ds.x_test, ds.y_test)["accuracy"]
  # Per layer (conv_0 | conv_1, hidden, output): a half's params are a tuple over its layers.
  whole_params = (*state.client.params, *state.server.params)
  whole_state = (*state.client.model_state, *state.server.model_state)
  x, aux = ds.x_test[:64], ds.x_train[:512]
  rows = []
  for k in (1, 2, 3):
    half = sljax.cut(layers, k).client
    p, s = tuple(whole_params[:k]), tuple(whole_state[:k])  # the trained layers 0..k-1

    def apply(inputs, half=half, p=p, s=s):
      return half.apply(p, s, inputs, key=None, train=False)[0]

    z = apply(x)
    start = time.perf_counter()
    white = attacks.white_box_inversion(z, attacks.WhiteBoxKnowledge(
        client_apply=apply, input_shape=(8, 8, 1), steps=300 if args.quick else 1000, learning_rate=0.05,
        tv_weight=1e-3), inputs=x)
    black = attacks.inverse_network(z, attacks.InverseNetworkKnowledge(
        aux_inputs=aux, aux_smashed=apply(aux), steps=500 if args.quick else 2000), inputs=x)
    rows.append({
        "client_layers": k, "smashed_shape": list(z.shape[1:]), "test_accuracy": accuracy,
        "dcor": float(metrics.distance_correlation(x, z)),
        "white_box_ssim": white.ssim, "white_box_psnr": white.psnr,
        "inverse_network_ssim": black.ssim, "inverse_network_psnr": black.psnr,
        "attack_seconds": time.perf_counter() - start,
    })
  return rows


def _binary_tasks(args):
  rng = np.random.default_rng(args.seed)
  n = 4000
  y = (rng.uniform(size=n) < 0.1).astype(np.int32)
  x = (rng.normal(size=(n, 20)) + 0.8 * y[:, None] * np.linspace(1, 0, 20)[None]).astype(np.float32)
  synthetic = sljax.data.datasets.from_arrays(x, y, test_fraction=0.25, seed=args.seed, num_classes=2,
                                              name="synthetic_0.1")
  cancer = sljax.data.load_breast_cancer(seed=args.seed)
  cancer = dataclasses.replace(cancer, y_train=1 - cancer.y_train, y_test=1 - cancer.y_test)  # 1: malignant
  return [synthetic, cancer]


def _gaussian_cut_gradient(scale: float):
  """Isotropic Gaussian noise on the cut gradient, `scale` times the batch's mean gradient norm."""

  def transform(grad, labels, key):
    del labels
    norm = jnp.mean(jnp.linalg.norm(grad.reshape(grad.shape[0], -1), axis=1))
    return grad + scale * norm / jnp.sqrt(grad[0].size) * jax.random.normal(key, grad.shape, grad.dtype)

  transform.description = f"gaussian(scale={scale:g})"
  return transform


def label_leakage(args) -> list[dict]:
  strengths = {
      "max_norm": [None],
      "marvell": [1.0, 4.0] if args.quick else [0.5, 1.0, 2.0, 4.0, 8.0],
      "gaussian": [1.0, 4.0] if args.quick else [0.5, 1.0, 2.0, 4.0, 8.0],
  }
  settings = [("none", None, None)]
  settings += [("max_norm", None, defenses.max_norm())]
  settings += [("marvell", s, defenses.marvell(power_scale=s)) for s in strengths["marvell"]]
  settings += [("gaussian", s, _gaussian_cut_gradient(s)) for s in strengths["gaussian"]]
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    for ds in _binary_tasks(args):
      model = sljax.cut(sljax.models.mlp(hidden=(32, 32), num_classes=2), 1)
      for name, strength, transform in settings:
        opt = optax.adam(3e-3)
        sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, cut_gradient_transform=transform)
        state = sl.init(jax.random.key(args.seed), ds.x_train[:64])
        path = os.path.join(directory, f"{ds.name}-{name}-{strength}.sljt")
        state, _ = sljax.fit(sl, state, ds.x_train, ds.y_train, key=jax.random.key(args.seed + 1),
                             epochs=3 if args.quick else 10, batch_size=64, transcript=path)
        logits, _ = jax.jit(sl.predict)(state, jnp.asarray(ds.x_test))
        scores = np.asarray(jax.nn.softmax(logits)[:, 1])
        steps = [e for e in transcript_lib.load(path).exchanges() if not (e.round == 0 and e.step < 2)]
        norm, direction = attacks.norm_scoring(steps), attacks.direction_scoring(steps)
        rows.append({"dataset": ds.name, "defense": name, "strength": strength,
                     "test_auc": float(roc_auc_score(ds.y_test, scores)),
                     "norm_auc": norm.auc_mean, "norm_leak_p95": norm.leak_p95,
                     "direction_auc": direction.auc_mean, "direction_leak_p95": direction.leak_p95})
  for row in rows:
    base = next(r for r in rows if r["dataset"] == row["dataset"] and r["defense"] == "none")
    row["test_auc_cost"] = base["test_auc"] - row["test_auc"]
  return rows


def _flat_digits(args):
  ds = sljax.data.load_digits(seed=args.seed)
  flat = lambda a: np.asarray(a).reshape(len(a), -1)  # noqa: E731
  return ds, flat(ds.x_train), flat(ds.x_test)


def frontier(args) -> list[dict]:
  """NoPeek alpha and Gaussian noise on the smashed data against dCor, reconstruction error and accuracy."""
  ds, x_train, x_test = _flat_digits(args)
  model = sljax.cut(sljax.models.mlp(hidden=(64, 64)), 1)  # client: dense 64 + ReLU on the 64 pixels
  opt = optax.adam(3e-3)
  probe = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
  init = probe.init(jax.random.key(args.seed), x_train[:64])
  z0 = probe.client_infer(init.client, x_train[:256]).activations
  clip = float(np.median(np.linalg.norm(np.asarray(z0), axis=1)))  # rows' median norm at initialisation
  settings = [("none", 0.0, {})]
  settings += [("nopeek", a, {"client_loss": defenses.nopeek(alpha=a)})
               for a in ([1.0, 4.0] if args.quick else [0.5, 1.0, 2.0, 4.0, 8.0])]
  settings += [("gaussian", s, {"uplink": defenses.gaussian_noise(clip_norm=clip, noise_multiplier=s)})
               for s in ([0.03, 0.1] if args.quick else [0.01, 0.02, 0.03, 0.05, 0.1, 0.3])]
  x, aux = x_test[:128], x_train[-512:]
  rows = []
  for name, strength, hooks in settings:
    sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt, **hooks)
    state, _ = sljax.fit(sl, init, x_train, ds.y_train, key=jax.random.key(args.seed + 1),
                         epochs=3 if args.quick else 10, batch_size=64)
    accuracy = sljax.evaluate(sl, state, x_test, ds.y_test)["accuracy"]

    def sent(inputs, k, sl=sl, state=state):
      return sl.client_infer(state.client, inputs, jax.random.key(k)).activations

    z = sent(x, 2)  # what the server receives (noisy under the Gaussian codec)
    black = attacks.inverse_network(z, attacks.InverseNetworkKnowledge(
        aux_inputs=aux, aux_smashed=sent(aux, 3), hidden=(128,), steps=400 if args.quick else 1500), inputs=x)
    rows.append({"defense": name, "strength": strength, "test_accuracy": accuracy,
                 "dcor": float(metrics.distance_correlation(x, z)), "inverse_network_mse": black.mse,
                 "inverse_network_psnr": black.psnr, "clip_norm": clip if name == "gaussian" else None})
  base = rows[0]["test_accuracy"]
  for row in rows:
    row["accuracy_cost"] = base - row["test_accuracy"]
  return rows


def hijacking_study(args) -> list[dict]:
  """Feature-space hijacking (malicious server) against the honest server's black-box inverse network."""
  import flax.linen as nn  # noqa: PLC0415

  from sljax.privacy import hijacking  # noqa: PLC0415

  ds = sljax.data.load_digits(seed=args.seed)
  model = sljax.cut(sljax.models.cnn(), 1)  # client: one 3x3 convolution, 16 channels, ReLU
  opt = optax.adam(1e-3)
  steps = 300 if args.quick else 1500
  private, aux = (ds.x_train[:700], ds.y_train[:700]), ds.x_train[700:]  # the client's data; the attacker's
  x = ds.x_test[:64]
  flat = lambda v: v.reshape(v.shape[0], -1)  # noqa: E731
  rows = []
  for name, uplink in (("none", None), ("gaussian 0.5", "noise")):
    sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt)
    start = sl.init(jax.random.key(args.seed), private[0][:32])
    if uplink is not None:
      z0 = sl.client_infer(start.client, private[0][:256]).activations
      clip = float(np.median(np.linalg.norm(np.asarray(z0).reshape(256, -1), axis=1)))
      sl = sljax.vanilla(model, client_optimizer=opt, server_optimizer=opt,
                         uplink=defenses.gaussian_noise(clip_norm=clip, noise_multiplier=0.5))
    # the honest server: trains its half, then (black box, He et al.) an inverse network from auxiliary pairs
    t0 = time.perf_counter()
    honest, _ = sljax.fit(sl, start, *private, key=jax.random.key(args.seed + 1), epochs=max(1, steps * 32 // 700),
                          batch_size=32)
    sent = lambda inputs, client, k, sl=sl: sl.client_infer(client, inputs, jax.random.key(k)).activations  # noqa: E731
    black = attacks.inverse_network(sent(x, honest.client, 2), attacks.InverseNetworkKnowledge(
        aux_inputs=aux, aux_smashed=sent(aux, honest.client, 3), steps=500 if args.quick else 2000), inputs=x)
    honest_seconds = time.perf_counter() - t0
    # the malicious server (`hijacking_server`): the honest client, unmodified, trains against it for the same
    # number of steps (one round of `steps` steps of parallel SL with one client)
    t0 = time.perf_counter()
    knowledge = hijacking.HijackingKnowledge(
        aux_inputs=aux, pilot=nn.Sequential([nn.Conv(16, (3, 3)), nn.relu]),
        inverse=nn.Sequential([nn.Conv(32, (3, 3)), nn.relu, nn.Conv(1, (3, 3)), nn.sigmoid]),
        discriminator=nn.Sequential([flat, nn.Dense(64), nn.leaky_relu, nn.Dense(1)]),
        discriminator_learning_rate=1e-4, batch_size=32, pretrain_steps=300, seed=args.seed)
    algo = hijacking.hijacking_server(sl, sljax.algorithms.ScheduleConfig(num_clients=1, batch_size=32,
                                                                          local_steps=steps), knowledge=knowledge)
    data = sljax.data.stack_clients(*private, [np.arange(700)])
    state, _ = sljax.simulation.run(algo, algo.init(jax.random.key(args.seed), data), data, rounds=1)
    hijacked = jax.tree.map(lambda a: a[0], state.clients)
    found = metrics.reconstruction_metrics(x, hijacking.decoder(knowledge, state.server)(sent(x, hijacked, 2)))
    rows.append({"defense": name, "steps": steps, "honest_inverse_network_mse": black.mse,
                 "honest_inverse_network_ssim": black.ssim, "hijacking_mse": found["mse"],
                 "hijacking_ssim": found["ssim"], "honest_seconds": honest_seconds,
                 "hijacking_seconds": time.perf_counter() - t0})
  return rows


def _plots(results: dict, out: str) -> None:
  from matplotlib.figure import Figure

  if "cut_depth" in results:
    rows = results["cut_depth"]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ks = [r["client_layers"] for r in rows]
    ax.plot(ks, [r["white_box_ssim"] for r in rows], "o-", label="white-box inversion")
    ax.plot(ks, [r["inverse_network_ssim"] for r in rows], "s-", label="inverse network (black box)")
    ax.plot(ks, [r["dcor"] for r in rows], "^--", label="distance correlation")
    ax.set_xticks(ks)
    ax.set_xlabel("client layers (cut depth)")
    ax.set_ylabel("SSIM / dCor")
    ax.set_title(f"digits, CNN, test accuracy {rows[0]['test_accuracy']:.3f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cut_depth.png"), dpi=120)
  if "label_leakage" in results:
    rows = results["label_leakage"]
    for dataset in sorted({r["dataset"] for r in rows}):
      points = [(f"{r['defense']}{'' if r['strength'] is None else ' ' + format(r['strength'], 'g')}",
                 r["test_auc_cost"], r["norm_auc"]) for r in rows if r["dataset"] == dataset]
      fig = report.privacy_utility_plot(points, privacy_label="norm-scoring AUC (label leakage)",
                                        utility_label="test AUC lost", title=dataset)
      fig.savefig(os.path.join(out, f"label_leakage_{dataset}.png"), dpi=120)
  if "frontier" in results:
    rows = results["frontier"]
    fig = Figure(figsize=(9, 3.5))
    for ax, key, label in zip(fig.subplots(1, 2), ("dcor", "inverse_network_mse"),
                              ("distance correlation (input, smashed)", "inverse-network MSE")):
      for defense, marker in (("nopeek", "o-"), ("gaussian", "s-")):
        points = [rows[0]] + [r for r in rows if r["defense"] == defense]
        ax.plot([r["accuracy_cost"] for r in points], [r[key] for r in points], marker,
                label={"nopeek": "NoPeek (alpha)", "gaussian": "Gaussian noise (multiplier)"}[defense])
        for r in points[1:]:
          ax.annotate(f"{r['strength']:g}", (r["accuracy_cost"], r[key]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
      ax.set_xlabel("test accuracy lost")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("digits, MLP cut after one dense layer: privacy-utility frontier")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)


def _print(results: dict) -> None:
  if "cut_depth" in results:
    print("cut depth (digits, CNN):")
    print(f"{'layers':>6} {'smashed':>12} {'dCor':>6} {'white-box SSIM':>14} {'PSNR':>6} {'inverse-net SSIM':>16} "
          f"{'PSNR':>6}")
    for r in results["cut_depth"]:
      print(f"{r['client_layers']:6d} {'x'.join(map(str, r['smashed_shape'])):>12} {r['dcor']:6.3f} "
            f"{r['white_box_ssim']:14.3f} {r['white_box_psnr']:6.1f} {r['inverse_network_ssim']:16.3f} "
            f"{r['inverse_network_psnr']:6.1f}")
  if "label_leakage" in results:
    print("label leakage (vanilla SL, cut gradient):")
    print(f"{'dataset':15} {'defense':9} {'strength':>8} {'test AUC':>8} {'cost':>6} {'norm AUC':>8} {'p95':>5} "
          f"{'dir AUC':>7} {'p95':>5}")
    for r in results["label_leakage"]:
      strength = "-" if r["strength"] is None else f"{r['strength']:g}"
      print(f"{r['dataset']:15} {r['defense']:9} {strength:>8} {r['test_auc']:8.3f} {r['test_auc_cost']:6.3f} "
            f"{r['norm_auc']:8.3f} {r['norm_leak_p95']:5.2f} {r['direction_auc']:7.3f} {r['direction_leak_p95']:5.2f}")


def _print_new(results: dict) -> None:
  if "frontier" in results:
    print("privacy-utility frontier (digits, MLP, cut after one dense layer):")
    print(f"{'defense':9} {'strength':>8} {'accuracy':>8} {'cost':>6} {'dCor':>6} {'inv-net MSE':>11} {'PSNR':>6}")
    for r in results["frontier"]:
      print(f"{r['defense']:9} {r['strength']:8g} {r['test_accuracy']:8.3f} {r['accuracy_cost']:6.3f} "
            f"{r['dcor']:6.3f} {r['inverse_network_mse']:11.4f} {r['inverse_network_psnr']:6.1f}")
  if "hijacking" in results:
    print("feature-space hijacking (digits, CNN cut 1) against the honest server's inverse network:")
    print(f"{'defense':13} {'steps':>5} {'honest MSE':>10} {'SSIM':>6} {'hijack MSE':>10} {'SSIM':>6}")
    for r in results["hijacking"]:
      print(f"{r['defense']:13} {r['steps']:5d} {r['honest_inverse_network_mse']:10.4f} "
            f"{r['honest_inverse_network_ssim']:6.3f} {r['hijacking_mse']:10.4f} {r['hijacking_ssim']:6.3f}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--studies", default="cut_depth,label_leakage,frontier,hijacking")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=HERE)
  args = parser.parse_args(argv)
  studies = {"cut_depth": cut_depth, "label_leakage": label_leakage, "frontier": frontier,
             "hijacking": hijacking_study}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = {}
  if os.path.exists(path):  # keep the studies not rerun
    with open(path) as f:
      results = json.load(f)
  results.update({"quick": args.quick, "seed": args.seed})
  for name in args.studies.split(","):
    if name not in studies:
      raise SystemExit(f"--studies: expected names among {sorted(studies)}, got {name!r}")
    start = time.perf_counter()
    results[name] = studies[name](args)
    results[f"{name}_seconds"] = time.perf_counter() - start
    results[f"{name}_quick"] = args.quick
    with open(path, "w") as f:  # after each study: a later one that fails loses nothing
      json.dump(results, f, indent=1)
  _plots(results, args.out)
  _print(results)
  _print_new(results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
