"""Progress bars that suit where they are shown: a notebook, a terminal or a log.

`tqdm.auto` decides at import time and, in a Jupyter kernel without ipywidgets, warns
`IProgress not found` on `import sljax`. `progress_bar` decides when a bar is made, and warns
about nothing:

- in a Jupyter kernel with ipywidgets: the notebook widget (`tqdm.notebook`);
- in a Jupyter kernel without ipywidgets, or in a terminal: plain text redrawn in place;
- anywhere else (the stream is not a terminal: a log file, CI, a captured stream): one line per
  update, at most one every `mininterval` seconds (1 by default), and the final count at the end.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.std import tqdm as _text_bar


def _in_notebook() -> bool:
  """Whether this process is a Jupyter kernel that renders rich output (as `tqdm.autonotebook` decides)."""
  if "ipykernel.zmqshell" not in sys.modules:
    return False
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None else None
  if shell is None:
    return False
  name = type(shell).__name__.lower()
  console = any(k == "QT_API" or k.startswith("SPYDER") for k in os.environ) or "qt" in name or "spyder" in name
  return not console


def _has_widgets() -> bool:
  return importlib.util.find_spec("ipywidgets") is not None


def _is_terminal(file: Any) -> bool:
  try:
    return bool(file.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def bar_kind(file: IO[str] | None = None) -> str:
  """Which bar `progress_bar` makes for `file` (stderr by default): "widget", "text" or "lines"."""
  if _in_notebook():
    return "widget" if _has_widgets() else "text"
  return "text" if _is_terminal(sys.stderr if file is None else file) else "lines"


class _Lines:
  """A stream for a bar that writes each redraw as a line of its own (no carriage returns)."""

  def __init__(self, stream: IO[str]):
    self.stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").rstrip()
    if text:  # the erasing writes (spaces and carriage returns) leave nothing
      self.stream.write(text + "\n")

  def flush(self) -> None:
    self.stream.flush()


class _LineBar(_text_bar):
  """A text bar for logs: a postfix waits for the next line instead of forcing one of its own, so
  every line shows the count and the postfix of the same update."""

  def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):  # noqa: ARG002 -- never refreshes
    super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable: Iterable | None = None, *, desc: str, disable: bool = False, total: int | None = None,
                 leave: bool = False, file: IO[str] | None = None, **kwargs: Any):
  """A tqdm progress bar of the kind that suits where it is shown (see the module docstring).

  Args:
    iterable: what to iterate over, or None with `total` and `bar.update(n)`.
    desc: the bar's label.
    disable: show nothing (the bar still iterates).
    total: the number of steps, when `iterable` has no length.
    leave: keep the bar once it is done (in a terminal or notebook; a log always keeps its lines).
    file: the text stream (stderr by default); ignored by the notebook widget.
    **kwargs: passed to tqdm (e.g. `mininterval`).

  Returns:
    A `tqdm` (a context manager; iterate over it, or `update` it): `tqdm.notebook.tqdm`,
    `tqdm.tqdm`, or a `tqdm.tqdm` that writes lines.

  Example:
    >>> import io
    >>> log = io.StringIO()
    >>> for _ in progress_bar(range(3), desc="rounds", file=log, mininterval=0):
    ...   pass
    >>> log.getvalue().splitlines()[-1].startswith("rounds: 100%")
    True
  """
  if disable:
    return _text_bar(iterable, desc=desc, total=total, disable=True)
  kind = bar_kind(file)
  if kind == "widget":
    from tqdm.notebook import tqdm as widget_bar  # noqa: PLC0415 -- imports ipywidgets

    return widget_bar(iterable, desc=desc, total=total, leave=leave, **kwargs)
  if kind == "text":
    return _text_bar(iterable, desc=desc, total=total, leave=leave, file=file, **kwargs)
  kwargs.setdefault("mininterval", 1.0)
  return _LineBar(iterable, desc=desc, total=total, leave=True, file=_Lines(sys.stderr if file is None else file),
                  ascii=True, **kwargs)
