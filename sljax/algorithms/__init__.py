"""Multi-client split-learning algorithms: pure `init` and `round` over a pytree state."""

from sljax.algorithms._common import Algorithm, RoundInputs, SimState
from sljax.algorithms.baselines import centralized_baseline, fedavg
from sljax.algorithms.heterogeneous import heterogeneous_parallel_sl
from sljax.algorithms.parallel import linear_head, local_loss_client_step, local_loss_sl, parallel_sl
from sljax.algorithms.sequential import sequential_sl
from sljax.algorithms.splitfed import splitfed

__all__ = [
    "Algorithm",
    "RoundInputs",
    "SimState",
    "centralized_baseline",
    "fedavg",
    "heterogeneous_parallel_sl",
    "linear_head",
    "local_loss_client_step",
    "local_loss_sl",
    "parallel_sl",
    "sequential_sl",
    "splitfed",
]
