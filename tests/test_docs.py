"""The documentation site builds with warnings as errors (`make docs`): every page, the notebooks as stored,
the studies, and the API reference from the docstrings."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytest.importorskip("myst_nb", reason="the docs extra (sphinx, myst-nb, furo) builds the site")


def test_docs_build_without_warnings(tmp_path):
  notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
  studies = sorted(readme.parent for readme in (ROOT / "experiments").glob("*/README.md"))
  # In a process of its own: Sphinx's warnings are the build's to report, not pytest's to raise.
  build = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
       str(ROOT / "docs"), str(tmp_path / "html")],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  assert build.returncode == 0, f"the docs build failed (make docs shows the same):\n{build.stderr[-8000:]}"
  html = tmp_path / "html"
  for page in ("index", "getting_started", "concepts", "protocol", "algorithms", "notebooks/index", "studies/index",
               "api/index", "api/sljax.algorithms"):
    assert (html / f"{page}.html").exists(), page
  # The API reference holds the docstrings, not just the headings.
  algorithms = (html / "api" / "sljax.algorithms.html").read_text(encoding="utf-8")
  assert 'id="sljax.algorithms.parallel_sl"' in algorithms
  # Every notebook and every study's README of the repository is a page of the site.
  for notebook in notebooks:
    assert (html / "notebooks" / f"{notebook.stem}.html").exists(), notebook.name
  for study in studies:
    assert (html / "studies" / study.name / "README.html").exists(), study.name
