"""Baselines with the same model and data as the split algorithms: FedAvg and centralized training.

FedAvg: McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sljax import protocol
from sljax.algorithms import _common as c
from sljax.algorithms import aggregation as agg
from sljax.data.clients import ClientData


def _fedavg_timeline(costs, legs, p, steps, order):
  """FedAvg: `steps` local steps of the whole model, then the whole model up, averaged, and down."""
  del order
  return c.fedavg_exchange(steps * legs.model_step, legs, p, costs.model_weights_bytes), 0.0


TIMELINE = c.Timeline(
    _fedavg_timeline,
    lambda costs, s: (costs.model_weights_bytes, costs.model_weights_bytes),
    lambda costs, s: s * costs.model_step_flops)


def fedavg(central: protocol.Centralized, config: c.ScheduleConfig, *,
           aggregation: agg.Aggregator | None = None) -> c.Algorithm:
  """FedAvg: every client trains the whole model locally; the server averages the models.

  Who updates what, per round: each participating client runs `local_steps` steps of the whole
  model (`model.compose()`) on its data, updating its params and its own optimizer state; the
  server averages the params (and model state) weighted by sample counts and sends the average
  to every client. A dropped step is discarded. Traffic: the whole model, up and down, per
  participant per round. `SimState.server` is unused (None).

  Each client's step is `central`'s (`sljax.centralized(model, optimizer=...)`: the whole model,
  its optimizer and loss); the schedule comes from `config`. `aggregation` replaces the weighted
  mean with a robust aggregator from `sljax.algorithms.aggregation` (`median()`,
  `trimmed_mean(f)`, `centered_clipping(r)`).

  Args:
    central: `sljax.centralized(model, optimizer=...)`: the whole model, its optimizer and loss.
    config: a `ScheduleConfig`: clients, batch size, local steps, participation, drops, executor.
    aggregation: the aggregator of the clients' models; None is the weighted mean.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`; its state holds one model per client.

  Example:
    >>> import optax, sljax
    >>> central = sljax.centralized(sljax.cut(sljax.models.mlp(), 1), optimizer=optax.adam(1e-3))
    >>> algo = fedavg(central, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=32))
  """
  c.check_protocol(central, protocol.Centralized, "fedavg", name="central")
  config = c.check_config(config)
  aggregation = agg.mean() if aggregation is None else agg.check(aggregation)
  num_clients, batch_size, local_steps, executor = (config.num_clients, config.batch_size, config.local_steps,
                                                    config.executor)

  client_keys = c.lockstep_client_keys(num_clients)

  def aggregate(weights, server, w):
    """End of round: FedAvg of the clients' {"params", "model_state"} (K, ...) with weights `w`
    (sample counts of the clients that finished the round); there is no server half."""
    return aggregation(weights, w), server

  schedule = c.Schedule(client_keys, c.lockstep_server_keys(num_clients), c.index_order(num_clients), None,
                        aggregate, TIMELINE)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    k_model, k_run = jax.random.split(key)
    party = central.init(k_model, data.x[0, :1])
    return c.SimState(c.stack_party(party, num_clients), None, jnp.zeros((), jnp.int32), jax.random.key_data(k_run))

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    _, inputs = c.begin_round(state, data, inputs, spec=state.clients.input_spec, config=config)
    ids = data.client_ids()

    def step(clients, s):
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      active = inputs.active()[s]
      updated, m = executor(lambda p, x, y, k: central.step(p, (x, y), k), clients, x, y,
                            client_keys(state.key, state.round, s, ids))
      return c.where(active, updated, clients), (m["loss"], m["accuracy"], active)

    clients, (losses, accs, active) = jax.lax.scan(step, state.clients, jnp.arange(local_steps))
    weights = data.count.astype(jnp.float32) * inputs.completed()
    average, _ = aggregate({"params": clients.params, "model_state": clients.model_state}, None, weights)
    average = c.averaged_or_kept(weights.sum() > 0, average, {"params": state.clients.params,
                                                              "model_state": state.clients.model_state})
    average = c.broadcast(average, num_clients)
    clients = clients.replace(params=average["params"], model_state=average["model_state"])
    # the whole model up from those that finished, and the average down to every participant
    weight_bytes = c.model_bytes(jax.tree.map(lambda a: a[0], clients.params))
    traffic = c.Traffic(up=[(weight_bytes, inputs.completed())], down=[(weight_bytes, inputs.participating)])
    metrics = c.round_metrics(losses, accs, active, traffic, inputs.participating)
    return state.replace(clients=clients, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    return central.predict(jax.tree.map(lambda a: a[client], state.clients), x)[0]

  return c.Algorithm("fedavg", init, round_fn, predict, local_steps, c.ClientAxes(averaged=("params", "model_state")),
                     schedule, shared_model=True, config=config)


def centralized_baseline(central: protocol.Centralized, config: c.ScheduleConfig) -> c.Algorithm:
  """Centralized training on the same data: each step takes every client's batch as one K*B batch.

  The data the split algorithms see in a round, pooled in one place; no traffic. The state holds
  the whole model in `SimState.server`. Its step is `central`'s (`sljax.centralized(...)`); of
  `config` it takes the clients, the batch size and the steps per round (everyone takes part,
  nobody drops, and there is no client axis to execute).

  Args:
    central: `sljax.centralized(model, optimizer=...)`: the whole model, its optimizer and loss.
    config: a `ScheduleConfig`: of it, the clients, the batch size and the local steps.

  Returns:
    An `Algorithm` (`init`, `round`, `predict`) for `sljax.simulation.run`; its state holds the one
    model in `SimState.server`.

  Example:
    >>> import optax, sljax
    >>> central = sljax.centralized(sljax.cut(sljax.models.mlp(), 1), optimizer=optax.adam(1e-3))
    >>> algo = centralized_baseline(central, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=32))
  """
  c.check_protocol(central, protocol.Centralized, "centralized_baseline", name="central")
  config = c.check_config(config)
  num_clients, batch_size, local_steps = config.num_clients, config.batch_size, config.local_steps

  def server_keys(run_key, round_, step, ids=None):
    return jnp.broadcast_to(c.step_key(run_key, round_, step), c.ids_or_all(ids, num_clients).shape)

  schedule = c.Schedule(server_keys, server_keys, c.index_order(num_clients), None, None, None)

  def init(key, data: ClientData) -> c.SimState:
    c.check_data(data, protocol.ArraySpec.of(data.x[0]), num_clients)
    k_model, k_run = jax.random.split(key)
    return c.SimState(None, central.init(k_model, data.x[0, :1]), jnp.zeros((), jnp.int32), jax.random.key_data(k_run))

  def round_fn(state: c.SimState, data: ClientData, inputs: c.RoundInputs | None = None):
    del inputs  # all data is in one place
    c.check_data(data, state.server.input_spec, num_clients)

    def step(party, s):
      x, y = c.batches(state, data, s, local_steps=local_steps, batch_size=batch_size)
      x, y = x.reshape(-1, *x.shape[2:]), y.reshape(-1)
      party, m = central.step(party, (x, y), server_keys(state.key, state.round, s)[0])
      return party, (m["loss"], m["accuracy"])

    server, (losses, accs) = jax.lax.scan(step, state.server, jnp.arange(local_steps))
    ones = jnp.ones((local_steps, num_clients))
    metrics = c.round_metrics(losses[:, None] * ones, accs[:, None] * ones, ones > 0, c.Traffic(),
                              jnp.ones((num_clients,), bool))  # no traffic: the data is in one place
    return state.replace(server=server, round=state.round + 1), metrics

  def predict(state: c.SimState, x, client: int = 0):
    del client
    return central.predict(state.server, x)[0]

  return c.Algorithm("centralized", init, round_fn, predict, local_steps, c.ClientAxes(clients=False), schedule,
                     shared_model=True, config=config)
