"""Multi-client split-learning algorithms: pure `init` and `round` over a pytree state.

Each algorithm's module defines its `Schedule` once (keys, serving order, the server's step,
aggregation, timeline on the simulated clock); the fused `round`, the network server and
`sljax.network` are built from it. `REGISTRY` names every algorithm: adding one is its own
module and one line here.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from sljax.algorithms import aggregation, baselines, parallel, parallel_u, sequential, splitfed as _splitfed
from sljax.algorithms._common import (Algorithm, ClientAxes, ClientView, RoundInputs, RoundMetrics, Schedule,
                                     ScheduleConfig, SimState, Timeline, Traffic)
from sljax.algorithms.baselines import centralized_baseline, fedavg
from sljax.algorithms.heterogeneous import heterogeneous_parallel_sl
from sljax.algorithms.parallel import linear_head, local_loss_client_step, local_loss_sl, parallel_sl
from sljax.algorithms.parallel_u import u_shaped_parallel_sl
from sljax.algorithms.sequential import sequential_sl, sequential_sl_u
from sljax.algorithms.splitfed import splitfed


class Registered(NamedTuple):
  """An algorithm in `REGISTRY`: its factory, the options that make it this algorithm (e.g.
  `version=1`), and its timeline on the simulated clock (None: not simulated there).

  `factory(protocol, config, **options)` builds it: `protocol` is what the factory takes first
  (a `sljax.vanilla(...)`, a `sljax.u_shaped(...)` for "parallel_sl_u", a `sljax.centralized(...)`
  for the baselines; heterogeneous parallel SL also needs `cuts`),
  `config` a `ScheduleConfig`. `defaults(protocol, input_spec) -> options`, where given, fills in
  the options a run may leave out (local-loss SL: its auxiliary head), so that every party that
  builds the algorithm for a run (`sljax.transport.schedule.algorithm`) builds the same one.
  """

  factory: Callable[..., Algorithm]
  options: dict[str, Any]
  timeline: Timeline | None
  defaults: Callable[..., dict[str, Any]] | None = None


# name (as `Algorithm.name`) -> its factory and timeline
REGISTRY: dict[str, Registered] = {
    "sequential_sl": Registered(sequential_sl, {}, sequential.TIMELINE),
    "sequential_sl_u": Registered(sequential_sl_u, {}, None),
    "parallel_sl": Registered(parallel_sl, {}, parallel.TIMELINE),
    "parallel_sl_u": Registered(u_shaped_parallel_sl, {}, parallel_u.TIMELINE),
    "splitfed_v1": Registered(splitfed, {"version": 1}, _splitfed.TIMELINE_V1),
    "splitfed_v2": Registered(splitfed, {"version": 2}, _splitfed.TIMELINE_V2),
    "local_loss_sl": Registered(local_loss_sl, {}, parallel.LOCAL_LOSS_TIMELINE, parallel.local_loss_defaults),
    "heterogeneous_parallel_sl": Registered(heterogeneous_parallel_sl, {}, None),
    "fedavg": Registered(fedavg, {}, baselines.TIMELINE),
    "centralized": Registered(centralized_baseline, {}, None),
}

__all__ = [
    "REGISTRY",
    "Algorithm",
    "ClientAxes",
    "ClientView",
    "Registered",
    "RoundInputs",
    "RoundMetrics",
    "Schedule",
    "ScheduleConfig",
    "SimState",
    "Timeline",
    "Traffic",
    "aggregation",
    "centralized_baseline",
    "fedavg",
    "heterogeneous_parallel_sl",
    "linear_head",
    "local_loss_client_step",
    "local_loss_sl",
    "parallel_sl",
    "sequential_sl",
    "sequential_sl_u",
    "splitfed",
    "u_shaped_parallel_sl",
]
