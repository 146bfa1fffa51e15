"""Executes tutorial notebooks top to bottom and stores them with their outputs.

    .venv/bin/python notebooks/execute.py notebooks/01_split_learning_in_ten_minutes.ipynb
    .venv/bin/python notebooks/execute.py notebooks/*.ipynb    # all of them

Each notebook runs in a fresh `python3` kernel (the one ipykernel installs in the environment
running this script) with notebooks/ as its working directory, and is written back in place with
its outputs, so that it reads well on GitHub without running. A notebook that raises is not
written, and the script exits with status 1. The test suite (tests/test_notebooks.py) runs every
notebook the same way, through `execute`, on a copy that it never writes back.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent


def execute(notebook: nbformat.NotebookNode, *, timeout: float, cwd: str | pathlib.Path = NOTEBOOKS,
            kernel_name: str = "python3") -> nbformat.NotebookNode:
  """Runs every code cell of `notebook` in a fresh kernel, in place, and returns it.

  Args:
    notebook: read with `nbformat.read(path, as_version=4)`; its outputs are replaced.
    timeout: seconds for the whole notebook (each cell gets what is left), kernel start excluded.
    cwd: the kernel's working directory.
    kernel_name: the Jupyter kernel to run it in.

  Raises:
    nbclient.exceptions.CellExecutionError: a cell raised (the message holds its traceback), or the
      notebook ran past `timeout` (the running cell is interrupted first; the message says so).
  """
  deadline = None

  def cell_timeout(cell) -> int:
    """What is left of the notebook's time (nbclient limits cells, not notebooks), counted from the first cell."""
    nonlocal deadline
    del cell
    if deadline is None:
      deadline = time.monotonic() + timeout
    return max(1, math.ceil(deadline - time.monotonic()))

  client = NotebookClient(
      notebook, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}}, timeout_func=cell_timeout,
      # Past the time, interrupt the cell (its `finally` blocks run: e.g. it stops the processes it started), then
      # fail as a cell that raised.
      interrupt_on_timeout=True,
      error_on_timeout={"ename": "TimeoutError", "evalue": f"the notebook ran past its {timeout:g} s",
                        "traceback": [f"TimeoutError: the notebook ran past its {timeout:g} s (cell interrupted)"]},
      record_timing=False,  # no timestamps in the stored notebooks: a re-run changes only what it computes
  )
  client.execute()
  return notebook


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds per notebook (default 600)")
  args = parser.parse_args(argv)
  status = 0
  for path in args.notebooks:
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    try:
      execute(notebook, timeout=args.timeout)
    except Exception as e:  # noqa: BLE001 -- reported, the others still run
      print(f"{path}: failed after {time.perf_counter() - start:.1f} s\n{e}", file=sys.stderr)
      status = 1
      continue
    nbformat.write(notebook, path)
    print(f"{path}: executed in {time.perf_counter() - start:.1f} s, outputs stored")
  return status


if __name__ == "__main__":
  sys.exit(main())
