# `make demo` and `make test` both set up the environment first; every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch is installed first, pinned, so that pip takes the CPU wheel on disk (or the
# machine's CUDA build) instead of resolving a newer release with several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m switchall.demo

test: setup
	$(VENV)/bin/ruff check switchall tests benchmarks tools
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check switchall tests benchmarks tools
	$(VENV)/bin/ruff format --check switchall tests benchmarks tools

clean:
	rm -rf $(VENV) runs data
