"""Every tutorial notebook in notebooks/ runs top to bottom without an error, within its time limit.

One test per notebook, named by its file, so a notebook added to notebooks/ is tested without
touching this file. Each runs in a fresh `python3` kernel with notebooks/ as its working
directory, through `notebooks/execute.py` (the script that stores the notebooks with their
outputs), on a copy in memory: the stored notebook is never written. The kernel inherits this
session's environment (tests/conftest.py): XLA's backend optimizations off and the session's
persistent compilation cache, also for the processes a notebook starts (`sljax serve`). The notebooks that
spend their time running a few programs for many steps, rather than compiling many, run with the optimizations
on (XLA's default), like a user's kernel.
"""

import importlib.util
import os
import pathlib
import sys

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
TIMEOUT = 240  # seconds per notebook, kernel start excluded: a hang fails; a loaded CI machine does not (05 takes ~45 s alone)
# Unoptimized, their training steps run up to 7 times slower: these compile a little slower optimized, but finish
# sooner (CPU time, same load: 05 50 -> 37 s, 06 46 -> 41 s); the others are faster unoptimized (02: 21 s against 33).
OPTIMIZED = {"05_domain_recipes.ipynb", "06_privacy.ipynb"}

_spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_without_error(name, monkeypatch):
  if name in OPTIMIZED:  # the kernel (and any process it starts) inherits the flags
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "").strip())
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)  # executed in memory, never written back
  execute.execute(notebook, timeout=TIMEOUT, cwd=NOTEBOOKS)


def test_kernels_run_in_this_environment_and_inherit_the_test_settings(tmp_path):
  """A notebook's kernel runs this Python environment (not another `python3` kernel registered for the
  user) and sees the XLA flags and the compilation cache of tests/conftest.py."""
  cell = nbformat.v4.new_code_cell("import os, sys; print(sys.prefix); print(os.environ['XLA_FLAGS']); "
                                   "print(os.environ['JAX_COMPILATION_CACHE_DIR'])")
  notebook = execute.execute(nbformat.v4.new_notebook(cells=[cell]), timeout=TIMEOUT, cwd=tmp_path)
  prefix, flags, cache = notebook.cells[0].outputs[0]["text"].splitlines()
  assert prefix == sys.prefix
  assert "--xla_backend_optimization_level=0" in flags.split()
  assert cache == os.environ["JAX_COMPILATION_CACHE_DIR"]
