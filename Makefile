# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench experiments docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sljax demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

bench: $(STAMP)
	$(BIN)/python experiments/benchmarks/step_overhead.py

# The studies (experiments/README.md), each with --quick, writing to build/experiments/<study>/ so the
# committed full results stay; the full runs: `make experiments STUDY_ARGS= STUDY_OUT=experiments`.
STUDIES := splitfed_accuracy communication compression gpsl_pitfall
STUDY_ARGS ?= --quick
STUDY_OUT ?= build/experiments
experiments: $(STAMP)
	for s in $(STUDIES); do $(BIN)/python experiments/$$s/run.py $(STUDY_ARGS) --out $(STUDY_OUT)/$$s/results.json || exit 1; done

# The documentation site, offline, warnings as errors: docs/_build/html/index.html
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info docs/_build docs/api docs/notebooks docs/studies
