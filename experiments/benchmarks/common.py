"""Timing helpers shared by the benchmarks: interleaved rounds, medians and paired ratios.

The machines these run on are small and shared (2 CPU cores, other jobs running), so load drifts
during a run. Timing variant A for a minute and then variant B would compare two different
machines. Instead every benchmark here

  1. compiles and warms up each variant,
  2. picks a chunk size (steps per timed chunk) so that one chunk lasts a few tens of ms,
  3. runs rounds of one chunk per variant, the order rotated and reversed from round to round,
     blocking until the device is done at the end of each chunk,

and reports per-step medians over the rounds. Chunks of the same round run within a fraction of
a second of each other, so their ratio (the paired ratio) cancels most of the drift; its median
and interquartile range say how stable a comparison is.

A variant is a `run(n)` callable that advances its own state by `n` steps and returns only when
the device has finished them (`jax.block_until_ready`), e.g.

    def run(n):
      nonlocal state
      for i in range(n):
        state, _ = step(state, batches[i % len(batches)], keys[i % len(keys)])
      jax.block_until_ready(state)
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

Run = Callable[[int], None]


def time_chunk(run: Run, steps: int) -> float:
  """Seconds per step of one chunk of `steps` steps (the run blocks until the device is done)."""
  start = time.perf_counter()
  run(steps)
  return (time.perf_counter() - start) / steps


def chunk_steps(runs: Mapping[str, Run], *, chunk_seconds: float, min_steps: int = 10, max_steps: int = 5000) -> int:
  """Steps per chunk so that a chunk of the slowest variant lasts about `chunk_seconds`.

  One number for all variants, so every variant runs the same steps on the same batches.
  """
  slowest = max(min(time_chunk(run, min_steps) for _ in range(3)) for run in runs.values())
  return int(np.clip(round(chunk_seconds / slowest), min_steps, max_steps))


def plan_chunks(seconds_per_step: Mapping[str, float], *, chunk_seconds: float, budget_seconds: float,
                min_rounds: int, max_rounds: int, max_steps: int = 5000,
                per_variant: bool = False) -> tuple[int | dict[str, int], int]:
  """(steps per chunk, interleaved rounds) from one probe per variant, for variants too slow to
  probe repeatedly (`chunk_steps` runs every variant 3 x `min_steps` times).

  Steps: a chunk of the slowest variant lasts about `chunk_seconds` (at least one step); with
  `per_variant`, a chunk of every variant does, each with its own number of steps (a dict), so
  that a fast variant timed next to slow ones is not timed on one cold step. Rounds: as many as
  fit in `budget_seconds`, clipped to [min_rounds, max_rounds]; the lower clip wins, so a slow
  set of variants may overrun the budget rather than give too few rounds for a median.
  """

  def steps_for(seconds: float) -> int:
    return int(np.clip(round(chunk_seconds / seconds), 1, max_steps))

  if per_variant:
    steps = {name: steps_for(t) for name, t in seconds_per_step.items()}
    per_round = sum(steps[name] * t for name, t in seconds_per_step.items())
  else:
    steps = steps_for(max(seconds_per_step.values()))
    per_round = steps * sum(seconds_per_step.values())
  return steps, int(np.clip(budget_seconds // per_round, min_rounds, max_rounds))


def round_order(names: list[str], r: int) -> list[str]:
  """The order of round `r`: rotated by `r`, reversed on odd rounds.

  Over 2n rounds every variant runs in every position equally often, after each of the others.
  """
  k = r % len(names)
  rotated = names[k:] + names[:k]
  return rotated[::-1] if (r // len(names)) % 2 else rotated


def interleave(runs: Mapping[str, Run], *, rounds: int, steps: int | Mapping[str, int]) -> dict[str, np.ndarray]:
  """Seconds per step of every variant, one chunk per round, shape (rounds,) per variant.

  `steps` is the steps per chunk, one number for all variants or one per variant.

  The garbage collector is off while timing (as in `timeit`), so a collection triggered by one
  variant is not charged to whichever runs next.
  """
  names = list(runs)
  times = {name: np.empty(rounds) for name in names}
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    for r in range(rounds):
      for name in round_order(names, r):
        times[name][r] = time_chunk(runs[name], steps if isinstance(steps, int) else steps[name])
  finally:
    if was_enabled:
      gc.enable()
  return times


def quartiles(samples: np.ndarray) -> tuple[float, float, float]:
  """(first quartile, median, third quartile)."""
  q1, q2, q3 = np.percentile(samples, [25, 50, 75])
  return float(q1), float(q2), float(q3)


def compare(numerator: np.ndarray, denominator: np.ndarray) -> dict[str, float]:
  """Ratio of the medians, and the quartiles of the per-round (paired) ratios."""
  q1, q2, q3 = quartiles(numerator / denominator)
  return {
      "ratio": float(np.median(numerator) / np.median(denominator)),
      "paired_q1": q1,
      "paired_median": q2,
      "paired_q3": q3,
  }


def environment() -> dict:
  """What the numbers were measured on: versions, devices and the load when the run started."""
  import flax
  import optax

  return {
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "cpus": os.cpu_count(),
      "load_1min": os.getloadavg()[0],
  }


def emit(result: dict, *, as_json: bool, print_table: Callable[[dict], None]) -> int:
  """Prints a benchmark's result: one JSON line with `--json`, else its table. Returns the exit code."""
  if as_json:
    print(json.dumps(result))
  else:
    print_table(result)
  return 0


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  """The resident set size of this process now (Linux; None elsewhere)."""
  kib = _status_kib("VmRSS")
  return None if kib is None else 1024 * kib


def reset_peak_rss() -> bool:
  """Resets this process's peak RSS to its current RSS (Linux >= 4.0); False if it cannot.

  Freed memory is first handed back to the OS (`malloc_trim`), so that what an earlier phase
  (e.g. compilation) allocated and freed is neither counted in the baseline nor silently reused.
  """
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """The peak RSS of this process since it started or since `reset_peak_rss` (VmHWM, which is
  what `getrusage(RUSAGE_SELF).ru_maxrss` reports when nothing reset it)."""
  kib = _status_kib("VmHWM")
  return 1024 * (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
