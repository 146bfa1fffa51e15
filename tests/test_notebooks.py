"""Every tutorial notebook in notebooks/ runs top to bottom without an error, within its time limit.

One test per notebook, named by its file, so a notebook added to notebooks/ is tested without
touching this file. Each runs in a fresh `python3` kernel with notebooks/ as its working
directory, through `notebooks/execute.py` (the script that stores the notebooks with their
outputs), on a copy in memory: the stored notebook is never written. The kernel inherits this
session's environment (tests/conftest.py): XLA's backend optimizations off and the session's
persistent compilation cache, also for the processes a notebook starts (`sljax serve`).
"""

import importlib.util
import os
import pathlib
import sys

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
TIMEOUT = 240  # seconds per notebook, kernel start excluded: a hang fails; a loaded CI machine does not (05 takes ~45 s alone)

_spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_without_error(name):
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
