"""Sphinx configuration of the sljax documentation site (`make docs`).

Built offline with myst-nb, as jax, flax and optax build theirs: Markdown pages, the notebooks rendered
from their stored outputs (never executed here: the test suite runs them), and an API reference from
the Google-style docstrings. The notebooks (notebooks/*.ipynb) and the studies (experiments/*/README.md
and their plots) live outside docs/, so each build first copies whatever of them exists into
docs/notebooks/ and docs/studies/ and writes the pages that list them, and writes one API page per
public module into docs/api/ (all three ignored by git). A hook reads the docstrings' plain-text
dialect as reStructuredText (`_docstring_dialect`), so the reference shows them as written.
"""

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "sljax"
author = "the sljax authors"
copyright = "the sljax authors"  # noqa: A001

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Offline: nothing is downloaded (no intersphinx), and the notebooks render from their stored outputs.
nb_execution_mode = "off"
# Notebook outputs the page cannot show (widget state) are skipped quietly rather than warned about.
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None),
                              ("html", "application/vnd.jupyter.widget-state+json", None)]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

html_theme = "furo"
html_title = "sljax"

# API reference: Google docstrings through napoleon; single backticks in docstrings name objects.
default_role = "py:obj"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # types joined to the documented arguments only
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_use_ivar = True  # attributes as fields: a NamedTuple's fields are not described twice
# `name` in a docstring links to the object of that name; where several share it, to the first.
suppress_warnings = ["ref.python"]

# ---------------------------------------------------------------------------------------------
# Pages written before each build: the notebooks and the studies, copied in from outside docs/, and
# the API reference, one page per public module. All three folders are ignored by git.

# The public modules, in the order of the reference; a package's submodules get pages of their own
# where the package's page would not show them. Modules that do not exist (yet) are left out.
API = [
    ("sljax.split", "Models and cuts"),
    ("sljax.protocol", "Protocols: the legs of one step"),
    ("sljax.messages", "Messages and their bytes"),
    ("sljax.training", "Training one client: fit and evaluate"),
    ("sljax.algorithms", "Algorithms: many clients"),
    ("sljax.execution", "Executors: how the client axis runs"),
    ("sljax.simulation", "Simulation: the round driver"),
    ("sljax.population", "Population-scale simulation"),
    ("sljax.network", "The simulated network clock"),
    ("sljax.codecs", "Codecs on the cut"),
    ("sljax.data", "Data sets, partitions and client batches"),
    ("sljax.models", "Models"),
    ("sljax.merges", "Merges of vertical split learning"),
    ("sljax.vertical", "Vertical split learning"),
    ("sljax.align", "Private alignment of samples"),
    ("sljax.analysis", "The cut profiler"),
    ("sljax.export", "Exporting the client half"),
    ("sljax.plots", "Plots and tables of runs"),
    ("sljax.privacy", "Privacy"),
    ("sljax.privacy.defenses", "Privacy: defenses"),
    ("sljax.privacy.accounting", "Privacy: the privacy budget"),
    ("sljax.privacy.transcript", "Privacy: transcripts"),
    ("sljax.privacy.attacks", "Privacy: attacks"),
    ("sljax.privacy.metrics", "Privacy: metrics"),
    ("sljax.privacy.report", "Privacy: the report"),
    ("sljax.transport", "Transport: split learning over a network"),
]
# Packages whose own page shows only their docstring: their members are on their submodules' pages.
API_NO_MEMBERS = {"sljax.privacy"}


def _exists(module: str) -> bool:
  import importlib.util  # noqa: PLC0415

  return importlib.util.find_spec(module) is not None


def _api_pages() -> dict[pathlib.Path, bytes]:
  import importlib  # noqa: PLC0415
  import types  # noqa: PLC0415

  import pkgutil  # noqa: PLC0415

  modules = [(name, title) for name, title in API if _exists(name)]
  # A new module of sljax.privacy gets its page without being listed above.
  privacy = importlib.import_module("sljax.privacy")
  for info in pkgutil.iter_modules(privacy.__path__, "sljax.privacy."):
    if not info.name.rsplit(".", 1)[1].startswith("_") and info.name not in dict(modules):
      modules.append((info.name, f"Privacy: {info.name.rsplit('.', 1)[1]}"))
  pages = {}
  for name, title in modules:
    options = ":no-members:" if name in API_NO_MEMBERS else ":members:"
    pages[DOCS / "api" / f"{name}.md"] = (f"# `{name}`: {title}\n\n```{{eval-rst}}\n.. automodule:: {name}\n"
                                          f"   {options}\n```\n").encode()
  # The flat names of `sljax`: each links to where its module documents it.
  sljax = importlib.import_module("sljax")
  documented = [importlib.import_module(name) for name, _ in modules]
  rows = []
  for flat in sljax.__all__:
    value = getattr(sljax, flat)
    if isinstance(value, types.ModuleType):
      target = f"{{doc}}`sljax.{flat} <{value.__name__}>`" if _exists(value.__name__) else f"`sljax.{flat}`"
    else:
      home = next((m.__name__ for m in documented
                   if getattr(m, flat, None) is value and flat in getattr(m, "__all__", vars(m))), None)
      target = f"{{py:obj}}`sljax.{flat} <{home}.{flat}>`" if home else f"`sljax.{flat}`"
    summary = (getattr(value, "__doc__", None) or "").strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
    rows.append(f"| {target} | {summary} |")
  toctree = "\n".join(name for name, _ in modules)
  pages[DOCS / "api" / "index.md"] = f"""# API reference

`import sljax` gives the names most programs need, flat; the modules below hold the rest. Each name of
`sljax` is documented in its module's page.

| name | summary |
|---|---|
{chr(10).join(rows)}

```{{toctree}}
:maxdepth: 1

{toctree}
```
""".encode()
  return pages


def _notebook_and_study_pages() -> tuple[dict[pathlib.Path, bytes], dict[pathlib.Path, bytes]]:
  notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
  studies = sorted(p.parent for p in (ROOT / "experiments").glob("*/README.md"))
  sources = {DOCS / "notebooks" / nb.name: nb for nb in notebooks}
  for study in studies:
    for path in study.iterdir():
      if path.name == "README.md" or path.suffix.lower() in (".png", ".svg", ".jpg", ".jpeg", ".gif"):
        sources[DOCS / "studies" / study.name / path.name] = path
  kept = {source.resolve() for source in sources.values()}
  pages = {copy: _copied(source, copy, kept) for copy, source in sources.items()}
  notebook_pages = {copy: data for copy, data in pages.items() if copy.is_relative_to(DOCS / "notebooks")}
  study_pages = {copy: data for copy, data in pages.items() if copy.is_relative_to(DOCS / "studies")}
  for study in studies:  # plots the README does not show yet: at its end
    readme = DOCS / "studies" / study.name / "README.md"
    text = study_pages[readme].decode()
    shown = {m.group(2) for m in _LINK.finditer(text) if m.group(1).startswith("!")}
    plots = sorted(p.name for p in study_pages if p.parent == readme.parent and p.suffix != ".md" and p.name not in shown)
    if plots:
      figures = "\n\n".join(f"![{name}]({name})" for name in plots)
      study_pages[readme] = f"{text.rstrip()}\n\n## Plots\n\n{figures}\n".encode()

  listed = "\n".join(nb.stem for nb in notebooks)
  notebook_pages[DOCS / "notebooks" / "index.md"] = (f"""# Notebooks

Tutorials, each runnable top to bottom on a laptop's CPU in a few minutes; the test suite executes every
one of them. They are shown here with the outputs stored in them: open them from `notebooks/` in
Jupyter to run them yourself.

```{{toctree}}
:maxdepth: 1

{listed}
```
""" if notebooks else "# Notebooks\n\nThe tutorials will be in `notebooks/`, at the repository's root.\n").encode()
  listed = "\n".join(f"{s.name}/README" for s in studies)
  _own_index(ROOT / "notebooks" / "README.md", notebook_pages, DOCS / "notebooks" / "index.md", kept,
             "\n".join(nb.stem for nb in notebooks))
  study_pages[DOCS / "studies" / "index.md"] = f"""# Studies

Each study is a folder of `experiments/` with one command that runs it, fixed seeds, a JSON file of
figures and its plots. Its README states the command, what the literature reports and what sljax
measured; `experiments/benchmarks/` holds the speed and scale measurements.

```{{toctree}}
:maxdepth: 1

{listed}
```
""".encode()
  _own_index(ROOT / "experiments" / "README.md", study_pages, DOCS / "studies" / "index.md", kept, listed)
  return notebook_pages, study_pages


def _own_index(readme: pathlib.Path, pages: dict[pathlib.Path, bytes], index: pathlib.Path, kept: set[pathlib.Path],
               listed: str) -> None:
  """Where the folder has a README of its own, it is the index page; a hidden table of contents lists every page."""
  if readme.exists() and listed:
    text = _copied(readme, index, kept).decode().rstrip()
    pages[index] = f"{text}\n\n```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{listed}\n```\n".encode()


_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _relink(text: str, source: pathlib.Path, copy: pathlib.Path, kept: set[pathlib.Path]) -> str:
  """Rewrites the relative links of `source`'s Markdown for its copy at `copy`.

  A link to a page of docs/ or to a file copied alongside (`kept`) points at it from the copy; a link
  to any other file of the repository (a script, a results file) becomes its path in code font, since
  the site does not hold it.
  """

  def one(match: re.Match) -> str:
    opening, target, closing = match.groups()
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL or an anchor
      return match.group(0)
    path, _, anchor = target.partition("#")
    resolved = (source.parent / path).resolve()
    if resolved in kept:
      return match.group(0)
    if resolved.is_relative_to(DOCS) and resolved.suffix in (".md", ".ipynb") and resolved.exists():
      new = os.path.relpath(resolved, copy.parent) + (f"#{anchor}" if anchor else "")
      return f"{opening}{new}{closing}"
    shown = os.path.relpath(resolved, ROOT)
    if opening.startswith("!"):
      return f"`{shown}`"
    label = opening[1:-2]
    return label if label.strip("`") == shown else f"{label} (`{shown}`)"

  return _LINK.sub(one, text)


def _copied(source: pathlib.Path, copy: pathlib.Path, kept: set[pathlib.Path]) -> bytes:
  """What `copy` holds: `source`, with the links of its Markdown (or of its notebook's Markdown cells) rewritten."""
  if source.suffix == ".md":
    return _relink(source.read_text(encoding="utf-8"), source.resolve(), copy, kept).encode()
  if source.suffix == ".ipynb":
    import json  # noqa: PLC0415

    notebook = json.loads(source.read_text(encoding="utf-8"))
    for cell in notebook.get("cells", []):
      if cell.get("cell_type") == "markdown":
        text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell["source"] = _relink(text, source.resolve(), copy, kept)
    return (json.dumps(notebook, indent=1, ensure_ascii=False) + "\n").encode()
  return source.read_bytes()


def _sync(into: pathlib.Path, pages: dict[pathlib.Path, bytes]) -> None:
  """Makes `into` hold exactly `pages`; files whose bytes are unchanged keep their modification time, so an
  incremental build reads only what changed."""
  for path, data in pages.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
      path.write_bytes(data)
  if into.exists():
    for path in sorted(into.rglob("*"), reverse=True):
      if path.is_file() and path not in pages:
        path.unlink()
      elif path.is_dir() and not any(path.iterdir()):
        path.rmdir()


_notebooks, _studies = _notebook_and_study_pages()
_sync(DOCS / "notebooks", _notebooks)
_sync(DOCS / "studies", _studies)
_sync(DOCS / "api", _api_pages())


# ---------------------------------------------------------------------------------------------
# The docstrings' dialect. sljax docstrings are Google style read as plain text: shapes such as
# `(N, *feature_shape)`, `|AUC - 0.5|`, plurals such as `Exchange`s, and code shown by indenting it
# under a line that ends with ":". Before napoleon reads a docstring, these become what reStructuredText
# means by them (escaped characters, literal blocks), so the reference shows the text as written.

_SECTIONS = {"args", "arguments", "attributes", "example", "examples", "keyword args", "keyword arguments",
             "methods", "note", "notes", "other parameters", "parameters", "raises", "references", "return",
             "returns", "see also", "todo", "warning", "warnings", "warns", "yield", "yields"}
# Inline literals (``x``), interpreted text (`x`, :role:`x`) and explicit escapes pass unchanged.
_INLINE = re.compile(r"(``.+?``|(?::[\w:.-]+:)?`[^`]+`(?:_|__)?|\\.)")


_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)]|\(\d+\))\s+")


def _escape_inline(line: str) -> str:
  marker = _LIST_ITEM.match(line)
  head, line = (marker.group(0), line[marker.end():]) if marker else ("", line)
  pieces = _INLINE.split(line)
  for i, piece in enumerate(pieces):
    if i % 2 == 0:  # plain text
      pieces[i] = piece.replace("*", r"\*").replace("|", r"\|")
    elif piece.startswith("`") and i + 1 < len(pieces) and re.match(r"\w", pieces[i + 1]):
      pieces[i] = piece + "\\ "  # `Exchange`s: interpreted text must end before a word character
  return head + "".join(pieces)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _is_section(line: str) -> bool:
  return line.strip().endswith(":") and line.strip()[:-1].lower() in _SECTIONS


def _docstring_dialect(app, what, name, obj, options, lines) -> None:
  """Rewrites `lines` (a docstring, before napoleon) from sljax's plain-text dialect into reStructuredText:

  - a block indented under a paragraph after a blank line (not a list, not a doctest) is code: a literal block;
  - a list, or an indented block, that starts or ends without a blank line gets one;
  - `*`, `|` and plurals of interpreted text are escaped outside literals;
  - a Returns section is prose: napoleon takes no type from its first line.
  """
  del app, what, name, obj, options
  out = []
  literal_indent = None  # inside a literal block or a doctest: lines more indented than this pass as they are
  list_indent = None  # inside a list item: the indent of its marker
  for i, line in enumerate(lines):
    stripped = line.strip()
    if literal_indent is not None:
      if not stripped or _indent(line) > literal_indent:
        out.append(line)
        continue
      literal_indent = None
    if not stripped:
      out.append(line)
      continue
    if stripped.startswith(">>>"):
      literal_indent = _indent(line) - 1  # a doctest block runs to the next blank line or dedent
      list_indent = None
      out.append(line)
      continue
    previous = next((j for j in range(len(out) - 1, -1, -1) if out[j].strip()), None)
    after_blank = previous is not None and not out[-1].strip()
    if (after_blank and _indent(line) > _indent(out[previous]) and not _is_section(out[previous])
        and not _LIST_ITEM.match(line) and not out[previous].strip().endswith("::")):
      if out[previous].rstrip().endswith(":"):
        out[previous] = out[previous].rstrip() + ":"
      else:
        start = previous
        while start > 0 and out[start - 1].strip():
          start -= 1
        out[-1:] = ["", " " * _indent(out[start]) + "::", ""]
      literal_indent = _indent(line) - 1
      list_indent = None
      out.append(line)
      continue
    item = _LIST_ITEM.match(line)
    if out and out[-1].strip() and (
        (list_indent is not None and not item and _indent(line) <= list_indent)  # a list ends
        or (item and list_indent is None and _indent(line) <= _indent(out[-1]))  # a list starts under a line
        or (_indent(line) == 0 and _indent(out[-1]) > 0)):  # an indented block ends
      out.append("")
    if item:
      list_indent = _indent(line)
    elif list_indent is not None and _indent(line) <= list_indent:
      list_indent = None
    if stripped.endswith("::"):
      literal_indent = _indent(line)
    else:
      line = _escape_inline(line)
      if previous is not None and not after_blank and out[previous].strip().lower() in ("returns:", "yields:"):
        # Napoleon reads "type: description" from a Returns section's first line, splitting at its first
        # colon even inside `...`; sljax's Returns are prose, so an empty type comes first.
        line = " " * _indent(line) + ": " + line.lstrip()
    out.append(line)
  lines[:] = out


def setup(app):
  # Before napoleon (priority 500) turns the Google sections into reStructuredText.
  app.connect("autodoc-process-docstring", _docstring_dialect, priority=400)
