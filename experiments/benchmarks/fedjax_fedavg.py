"""FedJAX's FedAvg on a population saved by `population.py`: the baseline of its FedAvg rows.

Runs in FedJAX's own virtual environment (fedjax is not an sljax dependency, and it pins its own
jax), so it imports neither sljax nor flax: `population.py --fedjax-python PATH` starts it as

    PATH experiments/benchmarks/fedjax_fedavg.py --store DIR --clients 64 ...

on a `ClientStore` written by `ClientStore.save` (x.npy, y.npy, offsets.npy). It builds the same
MLP with Haiku, the population as `fedjax.InMemoryFederatedData` (one client per store client),
and runs `fedjax.algorithms.fed_avg.federated_averaging` with plain SGD on the clients and SGD(1)
on the server (the plain average of the client models, as sljax's `fedavg`), `local_steps`
batches of `batch_size` per client (`shuffle_repeat_batch`, repeating a small client's samples as
sljax does), M clients per round drawn by `UniformGetClientSampler`. It prints one JSON line: the
seconds of each timed round (after `--warmup` rounds, which compile), or the error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--store", required=True)
  parser.add_argument("--clients", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--local-steps", type=int, default=2)
  parser.add_argument("--learning-rate", type=float, default=0.1)
  parser.add_argument("--hidden", default="64,64")
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  result = {"python": platform.python_version()}
  try:
    result.update(_run(args))
  except Exception as e:  # noqa: BLE001  the parent reports why FedJAX did not run
    result["error"] = f"{type(e).__name__}: {e}"
    result["traceback"] = traceback.format_exc(limit=-6)
  print(json.dumps(result))
  return 0


def _run(args) -> dict:
  import numpy as np
  import jax
  import jax.numpy as jnp
  import haiku as hk
  import fedjax
  from fedjax.algorithms import fed_avg
  from importlib import metadata

  versions = {name: metadata.version(name) for name in ("fedjax", "jax", "jaxlib", "dm-haiku", "numpy")}
  start = time.perf_counter()
  x, y, offsets = (np.load(os.path.join(args.store, f"{name}.npy"), mmap_mode="r") for name in ("x", "y", "offsets"))
  x = np.asarray(x).reshape(len(x), -1)
  y = np.asarray(y)
  client_data = {str(k).encode(): {"x": x[offsets[k]:offsets[k + 1]], "y": y[offsets[k]:offsets[k + 1]]}
                 for k in range(len(offsets) - 1)}
  data = fedjax.InMemoryFederatedData(client_data)
  build_seconds = time.perf_counter() - start
  hidden = [int(h) for h in args.hidden.split(",") if h]

  def forward(batch):
    return hk.nets.MLP([*hidden, args.num_classes])(batch["x"])

  model = hk.without_apply_rng(hk.transform(forward))
  params = model.init(jax.random.PRNGKey(args.seed), {"x": jnp.zeros((1, x.shape[1]), jnp.float32)})

  def loss(params, batch, rng):
    del rng
    logits = model.apply(params, batch)
    labels = jax.nn.one_hot(batch["y"], args.num_classes)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))

  grad_fn = jax.jit(jax.grad(loss))
  algorithm = fed_avg.federated_averaging(
      grad_fn, fedjax.optimizers.sgd(args.learning_rate), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=args.batch_size, num_epochs=None, num_steps=args.local_steps))
  state = algorithm.init(params)
  sampler = fedjax.client_samplers.UniformGetClientSampler(data, num_clients=args.clients, seed=args.seed)
  times = []
  for r in range(args.warmup + args.rounds):
    start = time.perf_counter()
    state, _ = algorithm.apply(state, sampler.sample())
    jax.block_until_ready(state.params)
    if r >= args.warmup:
      times.append(time.perf_counter() - start)
  return {"versions": versions, "backend": jax.default_backend(), "round_seconds": times,
          "build_seconds": build_seconds, "num_clients": len(offsets) - 1, "clients_per_round": args.clients,
          "local_steps": args.local_steps, "batch_size": args.batch_size}


if __name__ == "__main__":
  sys.exit(main())
