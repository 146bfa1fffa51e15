"""Strict test settings: rank promotion raises, several CPU devices for sharding tests, and XLA
compiling for a quick start rather than a fast run, once per session."""

import atexit
import os
import shutil
import tempfile

# Before jax is imported anywhere: four host devices, so sharding tests run on a CPU-only machine.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# The tests check math, not speed, and most of their time is XLA compiling tiny programs: with the
# backend's (LLVM's) optimizations off, a third less of it. The xdist workers and the `sljax serve` and
# `sljax client` processes the tests start inherit the flag, so they compile the same programs as the
# test process (their bitwise comparisons hold). The library and the programs jax traces are unchanged.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One persistent compilation cache for the session, in a temporary directory (never the user's
# ~/.cache): the xdist workers and the `sljax serve` and `sljax client` processes the tests start
# inherit JAX_COMPILATION_CACHE_DIR, so a program one of them compiled is loaded, not compiled again,
# by every other process, server or test that builds it anew. Every program is cached, however fast it
# compiled. tests/compile_helpers.py counts a program loaded from the cache as a compilation.
if "SLJAX_TEST_COMPILATION_CACHE" not in os.environ:  # the first process of the session: it makes the directory
  os.environ["SLJAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="sljax-test-xla-")
  atexit.register(shutil.rmtree, os.environ["SLJAX_TEST_COMPILATION_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SLJAX_TEST_COMPILATION_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The files whose every test takes 20 s or more (a notebook, the docs build, two processes), run first: under
# xdist (`make test`: -n 2) the run then ends on short tests, not with one worker busy for a minute while the other
# idles. The order within them, and of every other test, stays as collected.
_LONGEST_FIRST = ("test_notebooks.py", "test_docs.py", "test_multihost.py")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in _LONGEST_FIRST)  # stable: False (the long ones) first


def pytest_addoption(parser):
  parser.addoption("--fault-matrix", choices=("default", "full"), default="default",
                   help="tests/test_faults.py: 'full' kills a client at every kill point, with and without its "
                        "checkpoint, for every algorithm served over the network (48 cells, a few minutes); "
                        "'default' runs the full matrix for parallel SL and a few cells for each other algorithm")
