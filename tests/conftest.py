"""Strict test settings: rank promotion raises, several CPU devices for sharding tests, and XLA
compiling for a quick start rather than a fast run."""

import os

# Before jax is imported anywhere: four host devices, so sharding tests run on a CPU-only machine.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# The tests check math, not speed, and most of their time is XLA compiling tiny programs: with the
# backend's (LLVM's) optimizations off, a third less of it. The xdist workers and the `sljax serve` and
# `sljax client` processes the tests start inherit the flag, so they compile the same programs as the
# test process (their bitwise comparisons hold). The library and the programs jax traces are unchanged.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
