"""Fixed local batches in parallel SL under label skew, against server-side global sampling (GPSL).

Kohankhaki, Ayad, Barhoush & Schmeink, "Parallel Split Learning with Global Sampling"
(arXiv:2407.15738): in parallel split learning (PSL) every client sends a fixed local batch B per
step, so the server's global batch (K x B rows) has the label mix of the average client, not of the
pooled data; under non-IID clients this skews every global batch, and small clients are read over
and over while large ones are not read in full. With global sampling (GPSL) the server fixes the
global batch G and draws per-client batch sizes so that each global batch is a uniform sample of the
pooled data without replacement (the clients draw the actual rows locally). They report fixed local
batching trailing GPSL by up to 60 points of accuracy on CIFAR-10/100 under non-IID splits, and
GPSL near centralized.

This study measures whether the pitfall appears in `sljax.algorithms.parallel_sl` on digits (MLP
64-64, cut after the first layer, Adam 3e-3), K = 10 clients, B = 16 (G = 160), an IID partition
and Dirichlet label skew alpha in {1.0, 0.1}, 20 epochs (a round = ceil(N / G) steps, for every
arm), seeds 0..n-1 (partition, initialisation and data order):

  psl            sljax's parallel_sl: fixed local batches of B, one client half per client;
  psl_sync       parallel_sl(sync_clients=True): fixed local batches, the client halves' gradients
                 averaged every step (one shared client half);
  gpsl           global sampling: each step the server takes G rows of a per-epoch permutation of the
                 pooled rows (client k serves the b_k of them it holds, b_k varying per step; the
                 server's loss is the mean over the G rows; each client updates its own half with
                 the cut gradient of its rows, and skips the step when b_k = 0);
  gpsl_sync      global sampling with one shared client half (then the same computation as
                 centralized training on uniform batches of G);
  centralized    sljax's centralized baseline (IID partition; a step on the K batches pooled).

The gpsl arms are written here (`gpsl_round`), from the model's stages and optax: sljax's
algorithms take a fixed batch per client per step. Test accuracy of per-client halves is the mean
over the clients (each half with the server half, on the whole test set), as `simulation.run`
reports for parallel SL. The study also reports, per arm, how far the label mix of the server's
batches is from the pooled training set's (total variation distance, averaged over an epoch's steps).

Usage:
  .venv/bin/python experiments/gpsl_pitfall/run.py [--quick] [--seeds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import studies  # noqa: E402
import sljax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASK = "digits"
NUM_CLIENTS = 10
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
EPOCHS = 20
SCHEMES = ("iid", "dir1.0", "dir0.1")
ARMS = ("psl", "psl_sync", "gpsl", "gpsl_sync", "centralized")


def _take(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def gpsl_round(model: sljax.SplitModel, *, num_clients: int, global_batch: int, steps: int, learning_rate: float,
               shared_client: bool):
  """(init, round) of parallel SL with server-side global sampling; a round is `steps` steps of G rows.

  `init(key, x_example) -> state`; `round(state, x_pool, y_pool, owner, key) -> (state, loss)`, with
  the pooled training rows, `owner[i]` the client that holds row i, and `key` the epoch's key (its
  permutation of the pooled rows gives the global batches). Stateless stages only (no batch norm).
  """
  opt = optax.adam(learning_rate)
  # the stages' model states hold no arrays (checked in init): their empty structure is all apply needs
  structure = {}
  client_apply = lambda p, x: model.client.apply(p, structure["client"], x, key=None, train=True)[0]  # noqa: E731
  server_apply = lambda p, h: model.server.apply(p, structure["server"], h, key=None, train=True)[0]  # noqa: E731

  def init(key, x_example):
    k_client, k_server = jax.random.split(key)
    client_params, client_state = model.client.init(k_client, x_example)
    h = model.client.apply(client_params, client_state, x_example, key=None, train=False)[0]
    server_params, server_state = model.server.init(k_server, h)
    if jax.tree.leaves(client_state) or jax.tree.leaves(server_state):
      raise ValueError("model: expected stateless stages (no batch statistics) for the global-sampling round")
    structure.update(client=client_state, server=server_state)
    client = (client_params, opt.init(client_params))
    if not shared_client:  # every client starts from the same half, as sljax's parallel_sl does
      client = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), client)
    return {"client": client, "server": (server_params, opt.init(server_params))}

  def round_fn(state, x_pool, y_pool, owner, key):
    n = y_pool.shape[0]
    order = jax.random.permutation(key, n)

    def step(state, s):
      idx_G = order[(s * global_batch + jnp.arange(global_batch)) % n]
      x_G, y_G, who_G = x_pool[idx_G], y_pool[idx_G], owner[idx_G]
      (client_params, client_opt), (server_params, server_opt) = state["client"], state["server"]

      def objective(server_params, client_params):
        if shared_client:
          h_G = client_apply(client_params, x_G)
        else:  # every client's half on the rows; each row keeps the output of the client that holds it
          h_KxG = jax.vmap(client_apply, in_axes=(0, None))(client_params, x_G)
          h_G = h_KxG[who_G, jnp.arange(global_batch)]
        logits = server_apply(server_params, h_G)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_G).mean()

      loss, (g_server, g_client) = jax.value_and_grad(objective, argnums=(0, 1))(server_params, client_params)
      updates, server_opt = opt.update(g_server, server_opt, server_params)
      server = (optax.apply_updates(server_params, updates), server_opt)
      if shared_client:
        updates, client_opt = opt.update(g_client, client_opt, client_params)
        client = (optax.apply_updates(client_params, updates), client_opt)
      else:
        def update(p, o, g):
          u, o = opt.update(g, o, p)
          return optax.apply_updates(p, u), o

        new = jax.vmap(update)(client_params, client_opt, g_client)
        served_K = jnp.zeros((num_clients,), bool).at[who_G].set(True)  # b_k > 0: client k took part
        client = jax.tree.map(
            lambda a, b: jnp.where(served_K.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, (client_params, client_opt))
      return {"client": client, "server": server}, loss

    state, losses = jax.lax.scan(step, state, jnp.arange(steps))
    return state, losses.mean()

  def accuracy(state, x, y):
    client_params, server_params = state["client"][0], state["server"][0]
    if shared_client:
      return jnp.mean(jnp.argmax(server_apply(server_params, client_apply(client_params, x)), -1) == y)
    per_client = jax.vmap(lambda p: jnp.mean(jnp.argmax(server_apply(server_params, client_apply(p, x)), -1) == y))
    return per_client(client_params).mean()

  return init, round_fn, accuracy


def total_variation(p, q) -> float:
  return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def batch_skew(y: np.ndarray, parts, *, num_classes: int, steps: int, key) -> dict:
  """Mean total variation distance, over one epoch's steps, between the server batch's label mix and
  the pooled training set's: fixed local batches (`client_batches`) and global sampling."""
  pooled = np.bincount(y, minlength=num_classes) / len(y)
  data = sljax.data.stack_clients(np.zeros((len(y), 1), np.float32), y, parts)
  labels = jax.jit(lambda data, s: sljax.data.client_batches(data, s, batch_size=BATCH_SIZE, key=key)[1])
  fixed = []
  for s in range(steps):
    y_KxB = labels(data, s)
    fixed.append(total_variation(np.bincount(np.asarray(y_KxB).ravel(), minlength=num_classes) / y_KxB.size, pooled))
  order = np.asarray(jax.random.permutation(key, len(y)))
  g = NUM_CLIENTS * BATCH_SIZE
  sampled = [total_variation(np.bincount(y[order[(s * g + np.arange(g)) % len(y)]], minlength=num_classes) / g,
                             pooled) for s in range(steps)]
  return {"fixed_local": float(np.mean(fixed)), "global_sampling": float(np.mean(sampled))}


class Arms:
  """Every arm built once (and so compiled once) for all seeds and partitions."""

  def __init__(self, ds, *, epochs: int):
    self.ds, self.epochs = ds, epochs
    self.model = studies.TASKS[TASK].model(ds.num_classes)
    self.steps = studies.steps_per_epoch(len(ds.y_train), num_clients=NUM_CLIENTS, batch_size=BATCH_SIZE)
    config = sljax.algorithms.ScheduleConfig(num_clients=NUM_CLIENTS, batch_size=BATCH_SIZE, local_steps=self.steps)
    adam = optax.adam(LEARNING_RATE)
    sl = sljax.vanilla(self.model, client_optimizer=adam, server_optimizer=adam)
    self.algorithms = {
        "psl": sljax.algorithms.parallel_sl(sl, config),
        "psl_sync": sljax.algorithms.parallel_sl(sl, config, sync_clients=True),
        "centralized": sljax.algorithms.centralized_baseline(sljax.centralized(self.model, optimizer=adam), config),
    }
    self.inits = {name: jax.jit(algo.init) for name, algo in self.algorithms.items()}
    self.gpsl = {}
    for name, shared in (("gpsl", False), ("gpsl_sync", True)):
      init, round_fn, accuracy = gpsl_round(self.model, num_clients=NUM_CLIENTS, global_batch=NUM_CLIENTS * BATCH_SIZE,
                                            steps=self.steps, learning_rate=LEARNING_RATE, shared_client=shared)
      self.gpsl[name] = (jax.jit(init), jax.jit(round_fn), jax.jit(accuracy))

  def run(self, arm: str, parts, seed: int) -> float:
    ds = self.ds
    if arm in self.algorithms:
      algo = self.algorithms[arm]
      data = studies.padded_clients(ds.x_train, ds.y_train, parts, len(ds.y_train))
      state = self.inits[arm](jax.random.key(seed), data)
      _, records = sljax.simulation.run(algo, state, data, rounds=self.epochs, test=(ds.x_test, ds.y_test),
                                        eval_every=self.epochs)
      return studies.test_accuracy(records[-1])
    init, round_fn, accuracy = self.gpsl[arm]
    owner = np.zeros(len(ds.y_train), np.int32)
    for k, part in enumerate(parts):
      owner[part] = k
    k_init, k_data = jax.random.split(jax.random.key(seed))
    state = init(k_init, jnp.asarray(ds.x_train[:BATCH_SIZE]))
    x, y, who = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(owner)
    for epoch in range(self.epochs):
      state, _ = round_fn(state, x, y, who, jax.random.fold_in(k_data, epoch))
    return float(accuracy(state, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)))


def study(schemes, seeds, *, epochs: int = EPOCHS, arms=ARMS, log=lambda _: None) -> dict:
  ds = studies.dataset(TASK)
  runner = Arms(ds, epochs=epochs)
  out = {}
  for scheme in schemes:
    rows = {arm: [] for arm in arms}
    skews = []
    for seed in seeds:
      parts = studies.partition(ds.y_train, scheme, num_clients=NUM_CLIENTS, seed=seed)
      skews.append(batch_skew(ds.y_train, parts, num_classes=ds.num_classes, steps=runner.steps,
                              key=jax.random.key(seed)))
      for arm in arms:
        if arm == "centralized":  # pooled data has no partition
          parts_ = studies.partition(ds.y_train, "iid", num_clients=NUM_CLIENTS, seed=seed)
          rows[arm].append(runner.run(arm, parts_, seed))
        else:
          rows[arm].append(runner.run(arm, parts, seed))
        log(f"{scheme} {arm} seed {seed}: {rows[arm][-1]:.4f}")
    out[scheme] = {
        "accuracy": {arm: {"runs": r, **studies.mean_std(r)} for arm, r in rows.items()},
        "batch_label_tv": {k: studies.mean_std([s[k] for s in skews]) for k in skews[0]},
        "client_sizes": [int(len(p)) for p in studies.partition(ds.y_train, scheme, num_clients=NUM_CLIENTS,
                                                                seed=seeds[0])],
    }
  return {"task": TASK, "num_clients": NUM_CLIENTS, "batch_size": BATCH_SIZE, "global_batch": NUM_CLIENTS * BATCH_SIZE,
          "steps_per_epoch": runner.steps, "epochs": epochs, "learning_rate": LEARNING_RATE, "seeds": list(seeds),
          "schemes": out}


def plot(result: dict, path: str) -> None:
  schemes = list(result["schemes"])
  arms = list(result["schemes"][schemes[0]]["accuracy"])
  fig = studies.figure(figsize=(7.0, 3.8), layout="constrained")
  ax = fig.add_subplot()
  colors = dict(zip(ARMS, ("tab:orange", "tab:brown", "tab:blue", "tab:cyan", "black")))
  width = 0.8 / len(arms)
  for i, arm in enumerate(arms):
    f = [result["schemes"][s]["accuracy"][arm] for s in schemes]
    ax.bar(np.arange(len(schemes)) + (i - (len(arms) - 1) / 2) * width, [100 * x["mean"] for x in f], width,
           yerr=[100 * x["std"] for x in f], color=colors.get(arm), label=arm, capsize=2)
  ax.set_xticks(range(len(schemes)),
                [f"{s}\nbatch label TV: fixed {result['schemes'][s]['batch_label_tv']['fixed_local']['mean']:.2f}, "
                 f"global {result['schemes'][s]['batch_label_tv']['global_sampling']['mean']:.2f}" for s in schemes],
                fontsize=7)
  ax.set_ylabel("test accuracy %")
  ax.set_ylim(0, 100)
  ax.set_title(f"parallel SL on {result['task']}, K={result['num_clients']}: fixed local batches (psl) against "
               "global sampling (gpsl)", fontsize=8)
  ax.legend(fontsize=7, loc="lower left")
  fig.savefig(path, dpi=120)


def table(result: dict) -> str:
  schemes = list(result["schemes"])
  arms = list(result["schemes"][schemes[0]]["accuracy"])
  lines = ["| arm | " + " | ".join(schemes) + " |", "|---|" + "---|" * len(schemes)]
  for arm in arms:
    cells = [f"{100 * result['schemes'][s]['accuracy'][arm]['mean']:.1f} ± "
             f"{100 * result['schemes'][s]['accuracy'][arm]['std']:.1f}" for s in schemes]
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  for kind in ("fixed_local", "global_sampling"):
    cells = [f"{result['schemes'][s]['batch_label_tv'][kind]['mean']:.3f}" for s in schemes]
    lines.append(f"| batch label TV, {kind.replace('_', ' ')} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="IID and alpha=0.1, 1 seed, 5 epochs")
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1")
  parser.add_argument("--schemes", default=",".join(SCHEMES))
  parser.add_argument("--epochs", type=int, default=EPOCHS)
  parser.add_argument("--arms", default=",".join(ARMS), help=f"a subset of {','.join(ARMS)}")
  parser.add_argument("--out", default=os.path.join(HERE, "results.json"), help="the JSON file; the plot goes "
                      "next to it (gpsl.png)")
  args = parser.parse_args(argv)
  schemes, seeds, epochs = args.schemes.split(","), list(range(args.seeds)), args.epochs
  if args.quick:
    schemes, seeds, epochs = ["iid", "dir0.1"], [0], 5
  timer = studies.Timer()
  result = study(schemes, seeds, epochs=epochs, arms=args.arms.split(","), log=lambda line: print(line, file=sys.stderr, flush=True))
  result = {"study": "gpsl_pitfall", "quick": args.quick, **result, "environment": studies.environment(timer())}
  studies.write_json(args.out, result)
  plot(result, os.path.join(os.path.dirname(os.path.abspath(args.out)), "gpsl.png"))
  print(table(result))
  print(f"\n{timer():.0f} s; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
