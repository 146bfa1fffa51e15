"""Progress bars: no tqdm warning in a notebook, a widget only with ipywidgets, lines in logs."""

import io
import pathlib
import re
import subprocess
import sys
import types

import IPython
import pytest

import sljax
from sljax import _progress
from sljax._progress import bar_kind, progress_bar


def test_import_in_a_kernel_without_ipywidgets_warns_nothing():
  # `ipykernel.zmqshell` imported is what tqdm.auto takes for a notebook: with tqdm.auto at import,
  # `import sljax` printed "TqdmWarning: IProgress not found" here (ipywidgets is not installed).
  code = "import ipykernel.zmqshell, warnings; warnings.simplefilter('always'); import sljax"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert "IProgress" not in out.stderr and "Warning" not in out.stderr, out.stderr


def test_only_the_progress_module_imports_tqdm():
  root = pathlib.Path(sljax.__file__).parent
  importers = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                     if re.search(r"^\s*(from|import) tqdm", path.read_text(), re.MULTILINE))
  assert importers == ["_progress.py"]


@pytest.fixture
def kernel(monkeypatch):
  """This process made to look like a Jupyter kernel (a ZMQ shell running)."""
  shell = type("ZMQInteractiveShell", (), {})()
  monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
  monkeypatch.setattr(IPython, "get_ipython", lambda: shell)


def test_kind_in_a_kernel_depends_on_ipywidgets(kernel, monkeypatch):
  monkeypatch.setattr(_progress, "_has_widgets", lambda: False)
  assert bar_kind(io.StringIO()) == "text"  # a kernel renders carriage returns: redrawn in place
  assert type(progress_bar(range(2), desc="x", file=io.StringIO())).__name__ == "tqdm"
  monkeypatch.setattr(_progress, "_has_widgets", lambda: True)
  assert bar_kind(io.StringIO()) == "widget"


def test_kind_outside_a_kernel_depends_on_the_stream(monkeypatch):
  monkeypatch.delitem(sys.modules, "ipykernel.zmqshell", raising=False)
  terminal = io.StringIO()
  terminal.isatty = lambda: True
  assert bar_kind(terminal) == "text"
  assert bar_kind(io.StringIO()) == "lines"


def test_a_log_gets_one_line_per_update_with_its_postfix():
  log = io.StringIO()
  with progress_bar(range(3), desc="rounds", file=log, mininterval=0) as bar:
    for r in bar:
      bar.set_postfix(loss=f"{r:.1f}")
  text = log.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert [line.split("|")[2].split()[0] for line in lines] == ["0/3", "1/3", "2/3", "3/3", "3/3"]
  # the postfix set after round r shows on the line that counts round r, not one before
  assert [line.split("loss=")[1].rstrip("]") for line in lines[1:4]] == ["0.0", "1.0", "2.0"]


def test_a_log_by_default_gets_at_most_a_line_a_second_and_the_end():
  log = io.StringIO()
  for _ in progress_bar(range(1000), desc="steps", file=log):
    pass
  lines = log.getvalue().splitlines()
  assert len(lines) <= 3 and "1000/1000" in lines[-1], lines


def test_disabled_writes_nothing():
  log = io.StringIO()
  assert list(progress_bar(range(3), desc="x", disable=True, file=log)) == [0, 1, 2]
  assert log.getvalue() == ""
