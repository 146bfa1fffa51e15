"""The privacy budget of noisy smashed data: epsilon at a given delta, per example, over a run.

What is accounted (the DP unit). The noise codecs of `sljax.privacy.defenses` clip each example's
row of the smashed data and add noise to it, on the client, before it leaves. One *release* is one
such noisy row sent to the server. Against replacing one example's input by a zero row
(``adjacency="zero_out"``, dp-accounting's REPLACE_SPECIAL; or by any other input,
``"replace_one"``, which doubles the sensitivity), each release is a Gaussian (or Laplace)
mechanism, and the releases of one example compose (adaptively: later rows come from a client half
trained on earlier answers). The accountant counts the releases of the example released most often
and composes them with `dp-accounting` (privacy loss distributions by default, or RDP):

- Rounds and steps: every step in which an example sits in its client's batch releases its row
  once (twice in U-shaped SL, whose uplink codec also encodes the gradient at the body's output).
  The data order (`sljax.data.client_batches`) reads each client's rows in a fresh random order
  every epoch, so after ``T`` steps of batch ``B`` over ``c`` rows an example has been released at
  most ``ceil(T B / c)`` times (``T ceil(B / c)`` when ``c < B``). No amplification by subsampling
  is claimed: the order is shuffled epochs, not Poisson sampling.
- Clients: each example lives on one client, and a client's releases depend on its own data only
  (the server's answers are post-processing of noisy rows), so epsilon is the worst client's: the
  one with the fewest examples. A client that sits a round out is counted as if it took part (an
  upper bound, and a pure function of the round number).

The epsilon is thus a pure function of the rounds completed (``SimState.round``), recomputed on
resume: the accountant has no state of its own to checkpoint.

What it does NOT cover, stated plainly:

- The client half's parameters: the client trains on its raw data without noise, and the rows of
  other examples are computed with those parameters. The guarantee treats each release given the
  client half that made it; where the client half itself reaches the server (SplitFed's weight
  averaging, sequential SL's relay through the server), those weights are not protected at all.
- The labels: vanilla SL sends them up in the clear (see `defenses.randomized_response`, label DP
  with its own epsilon, or U-shaped SL).
- Inference: rows sent by `predict`/`evaluate` through the codec are further releases, not counted.
- Error feedback before the noise would carry one example's remainder into another's row; the
  accountant refuses such chains.

Example:
  >>> import optax, sljax
  >>> from sljax.privacy import defenses
  >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
  ...                    server_optimizer=optax.sgd(0.1),
  ...                    uplink=defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=1.0))
  >>> config = sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=32)
  >>> acct = accountant(sl, config, num_examples=[256, 256, 256, 256], delta=1e-5)
  >>> acct.releases(8)  # 8 rounds of one step: 256 rows, 32 a step: one epoch, one release each
  1
  >>> round(acct.epsilon(8), 2)  # one Gaussian mechanism of multiplier 1 at delta 1e-5 (analytically 4.377)
  4.38
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from sljax import codecs
from sljax.algorithms import ScheduleConfig
from sljax.privacy.defenses import GAUSSIAN, LAPLACE
from sljax.protocol import UShaped, Vanilla

__all__ = ["Accountant", "accountant"]

ADJACENCIES = ("zero_out", "replace_one")
METHODS = ("pld", "rdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Accountant:
  """Epsilon at ``delta`` per example, as a function of the rounds completed. Built by :func:`accountant`.

  Frozen and hashable; no state: ``epsilon(rounds)`` is recomputed from the round number (cached).

  Attributes:
    mechanisms: ``(kind, noise_multiplier)`` of each noise codec in the uplink, ``kind`` "gaussian"
      or "laplace", the multiplier per unit sensitivity (halved for ``adjacency="replace_one"``).
    releases_per_step: rows of one example a step sends through the uplink codec (1 vanilla, 2 U-shaped).
    batch_size: each client's batch.
    local_steps: steps per round.
    num_examples: each client's number of examples.
    delta: the target delta.
    target_epsilon: stop a run before it would exceed this (`sljax.simulation.run`); None: never.
    adjacency: "zero_out" or "replace_one".
    method: "pld" (privacy loss distributions, tight: a pessimistic estimate on a grid of 2e-4 times
      the epsilon, at least 1e-4) or "rdp" (Renyi DP, a looser upper bound).
  """

  mechanisms: tuple[tuple[str, float], ...]
  releases_per_step: int
  batch_size: int
  local_steps: int
  num_examples: tuple[int, ...]
  delta: float
  target_epsilon: float | None = None
  adjacency: str = "zero_out"
  method: str = "pld"

  def releases(self, rounds: int) -> int:
    """The most times any one example's row has been sent after ``rounds`` rounds (per codec)."""
    steps = _check_rounds(rounds) * self.local_steps
    batch = self.batch_size
    worst = 0
    for count in self.num_examples:
      times = -(-steps * batch // count) if count >= batch else steps * -(-batch // count)
      worst = max(worst, times)
    return worst * self.releases_per_step

  def event(self, rounds: int) -> dp_event.DpEvent:
    """The `dp_accounting` event of the releases of one example after ``rounds`` rounds."""
    return _event(self.mechanisms, self.releases(rounds))

  def epsilon(self, rounds: int) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds: 0 before the first release."""
    return _epsilon(self.mechanisms, self.releases(rounds), self.delta, self.method)

  def last_round(self, start: int, rounds: int) -> int:
    """The last round in ``[start, rounds]`` that ends within ``target_epsilon`` (``rounds`` without a target).

    Raises:
      ValueError: if ``target_epsilon`` is already spent at ``start``: the next round would exceed it.
    """
    if self.target_epsilon is None or start >= rounds:
      return rounds
    if self.epsilon(start + 1) > self.target_epsilon:
      raise ValueError(
          f"target_epsilon: the budget target_epsilon={self.target_epsilon} is already spent at the start "
          f"(round {start}): epsilon is {self.epsilon(start):.4g} now and would be {self.epsilon(start + 1):.4g} "
          f"after round {start + 1} (delta={self.delta}). Raise target_epsilon or the noise_multiplier.")
    lo, hi = start + 1, rounds  # epsilon(lo) <= target; epsilon grows with the rounds
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if self.epsilon(mid) <= self.target_epsilon:
        lo = mid
      else:
        hi = mid - 1
    return lo

  def record(self, rounds: int) -> dict[str, float]:
    """What a round's metrics record carries: ``{"dp_epsilon": ..., "dp_delta": ...}``."""
    return {"dp_epsilon": self.epsilon(rounds), "dp_delta": self.delta}

  def check_run(self, local_steps: int) -> None:
    """Raises a ValueError unless the algorithm run takes ``local_steps`` steps per round, as accounted."""
    if local_steps != self.local_steps:
      raise ValueError(f"accountant: built for local_steps={self.local_steps}, but the algorithm takes "
                       f"local_steps={local_steps}; build it with the algorithm's ScheduleConfig.")


@functools.lru_cache(maxsize=4096)
def _epsilon(mechanisms: tuple[tuple[str, float], ...], releases: int, delta: float, method: str) -> float:
  """Epsilon at `delta` of `releases` releases (cached: a run asks again every round)."""
  if releases == 0:
    return 0.0
  relation = NeighboringRelation.REPLACE_SPECIAL
  event = _event(mechanisms, releases)
  rdp = float(rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(delta))
  if method == "rdp":
    return rdp
  # The PLD's privacy-loss grid, relative to the epsilon (the RDP bound): its cost grows with
  # epsilon / interval, and its estimate is pessimistic, within about an interval of the exact value.
  interval = max(1e-4, _PLD_RELATIVE_INTERVAL * rdp)
  engine = pld_privacy_accountant.PLDAccountant(neighboring_relation=relation, value_discretization_interval=interval)
  return float(engine.compose(event).get_epsilon(delta))


_PLD_RELATIVE_INTERVAL = 2e-4


def _event(mechanisms: tuple[tuple[str, float], ...], releases: int) -> dp_event.DpEvent:
  """`releases` releases of one example's row, each through every noise codec of the uplink."""
  one = [dp_event.GaussianDpEvent(m) if kind == "gaussian" else dp_event.LaplaceDpEvent(m) for kind, m in mechanisms]
  return dp_event.SelfComposedDpEvent(one[0] if len(one) == 1 else dp_event.ComposedDpEvent(one), releases)


def _check_rounds(rounds) -> int:
  if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
    raise ValueError(f"rounds: expected an int >= 0, got {rounds!r}")
  return int(rounds)


def _noise_codecs(description: dict[str, Any], found: list, feedback: list) -> None:
  """Collects the noise codecs of a codec description (in chain order), and what runs before them."""
  name = description["name"]
  if name == "chain":
    for inner in description["codecs"]:
      _noise_codecs(inner, found, feedback)
    return
  if name in (GAUSSIAN, LAPLACE):
    if feedback:
      raise ValueError(
          f"sl: the uplink runs {feedback[0]} with error feedback before the noise codec {name}: its residual "
          "carries one example's remainder into another's row, which the per-example accounting cannot bound. "
          "Put the error-feedback codec after the noise, or drop error feedback.")
    found.append(description)
  elif description.get("error_feedback"):
    feedback.append(name)


def accountant(
    sl: Vanilla | UShaped,
    config: ScheduleConfig,
    *,
    num_examples: int | Sequence[int] | Any,
    delta: float,
    target_epsilon: float | None = None,
    adjacency: str = "zero_out",
    method: str = "pld",
) -> Accountant:
  """The privacy accountant of a run whose uplink codec adds noise (`defenses.gaussian_noise`, `laplace_noise`).

  Reads the noise codecs from ``sl.uplink`` (its configuration, as the network handshake does), the
  batch size and steps per round from ``config``; counts releases per example as the module
  docstring says and composes them with `dp-accounting`. Give it to ``sljax.simulation.run(...,
  accountant=...)``, which records ``dp_epsilon`` and ``dp_delta`` every round and, with a
  ``target_epsilon``, stops after the last round within it.

  Args:
    sl: the protocol (`sljax.vanilla` or `sljax.u_shaped`) whose uplink holds the noise codec.
    config: the run's `sljax.algorithms.ScheduleConfig`.
    num_examples: each client's number of training examples, e.g. ``data.count`` of the run's
      `ClientData`; or one int for all.
    delta: the delta of the reported ``(epsilon, delta)``, in (0, 1); below 1 / (examples) is customary.
    target_epsilon: if given (> 0), `run` stops before a round that would exceed it.
    adjacency: "zero_out" (one example's input replaced by a zero row; sensitivity the clip norm) or
      "replace_one" (replaced by any input; twice that sensitivity).
    method: "pld" (privacy loss distributions: tight) or "rdp" (Renyi DP: faster, looser).

  Returns:
    An :class:`Accountant`.

  Example:
    >>> import optax, sljax
    >>> from sljax.privacy import defenses
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
    ...                    server_optimizer=optax.sgd(0.1),
    ...                    uplink=defenses.gaussian_noise(clip_norm=1.0, noise_multiplier=2.0))
    >>> config = sljax.algorithms.ScheduleConfig(num_clients=2, batch_size=32, local_steps=5)
    >>> acct = accountant(sl, config, num_examples=[320, 160], delta=1e-5, target_epsilon=8.0)
    >>> acct.releases(10), round(acct.epsilon(10), 2)  # 50 steps of 32 over 160 rows: 10 epochs
    (10, 7.51)
    >>> acct.last_round(0, 100)  # simulation.run(..., rounds=100, accountant=acct) stops here
    11

  Raises:
    TypeError: if ``sl`` is not a vanilla or U-shaped protocol, or ``config`` not a ScheduleConfig.
    ValueError: naming the argument: no noise codec in ``sl.uplink`` (or error feedback before it),
      ``delta`` outside (0, 1), ``target_epsilon`` not > 0, a bad ``adjacency``, ``method`` or
      ``num_examples``.
  """
  if not isinstance(sl, (Vanilla, UShaped)):
    raise TypeError(f"sl: expected a protocol from sljax.vanilla or sljax.u_shaped, got {type(sl).__name__}")
  if not isinstance(config, ScheduleConfig):
    raise TypeError(f"config: expected a sljax.algorithms.ScheduleConfig, got {type(config).__name__}")
  found: list[dict[str, Any]] = []
  _noise_codecs(codecs.describe(sl.uplink), found, [])
  if not found:
    raise ValueError(f"sl: the uplink codec adds no noise to account for (expected "
                     f"sljax.privacy.defenses.{GAUSSIAN} or {LAPLACE} in it); got {sl.uplink.config}")
  if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
    raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")
  if target_epsilon is not None and (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real)
                                     or not 0 < target_epsilon < math.inf):
    raise ValueError(f"target_epsilon: expected a finite number > 0 or None, got {target_epsilon!r}")
  if adjacency not in ADJACENCIES:
    raise ValueError(f"adjacency: expected one of {ADJACENCIES}, got {adjacency!r}")
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  counts = np.atleast_1d(np.asarray(num_examples))
  if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer) or (counts < 1).any():
    raise ValueError(f"num_examples: expected a positive int or one positive int per client (e.g. data.count), "
                     f"got {num_examples!r}")
  if counts.size not in (1, config.num_clients):
    raise ValueError(f"num_examples: expected one count or {config.num_clients} (config.num_clients), got "
                     f"{counts.size}")
  sensitivity = 2.0 if adjacency == "replace_one" else 1.0
  mechanisms = tuple(("gaussian" if d["name"] == GAUSSIAN else "laplace", d["noise_multiplier"] / sensitivity)
                     for d in found)
  return Accountant(mechanisms=mechanisms, releases_per_step=2 if isinstance(sl, UShaped) else 1,
                    batch_size=config.batch_size, local_steps=config.local_steps,
                    num_examples=tuple(sorted({int(c) for c in counts})), delta=float(delta),
                    target_epsilon=None if target_epsilon is None else float(target_epsilon),
                    adjacency=adjacency, method=method)
