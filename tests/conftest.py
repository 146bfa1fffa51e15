"""Strict test settings: rank promotion raises, and several CPU devices for sharding tests."""

import os

# Before jax is imported anywhere: four host devices, so sharding tests run on a CPU-only machine.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
