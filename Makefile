# `make demo` and `make test` both set up the environment first; every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SBIN ?= /usr/sbin

.PHONY: setup demo test lint clean slurm-deps

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

test: setup slurm-deps
	$(VENV)/bin/ruff check switchall tests benchmarks tools
	$(PY) -m pytest -q

# The Slurm tests start a real two-node cluster on this machine (tests/launch/slurm_cluster.py)
# from Debian's slurm-wlm and munge. Installed here when missing and we are root with apt-get
# (CI); otherwise those tests skip and say why. Quiet and instant when they are present.
slurm-deps:
	@if ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null 2>&1 \
	    && ! [ -x $(SBIN)/slurmctld -a -x $(SBIN)/slurmd -a -x $(SBIN)/munged ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing slurm-wlm and munge for the Slurm tests (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends slurm-wlm munge; } >/dev/null 2>&1 \
	      || echo "WARNING: apt-get could not install slurm-wlm and munge: Slurm tests will skip"; \
	  else \
	    echo "NOTE: slurm-wlm and munge are missing (install them as root): Slurm tests will skip"; \
	  fi; \
	fi

lint: setup
	$(VENV)/bin/ruff check switchall tests benchmarks tools
	$(VENV)/bin/ruff format --check switchall tests benchmarks tools

clean:
	rm -rf $(VENV) runs data
