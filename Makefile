# Set-up and the two everyday commands. `make sweep` runs the default sweep,
# `make test` the test suite; both create the virtual environment first. `make peers` adds
# sae-lens and eai-sparsify (pinned to versions that keep this torch), which reading their
# SAEs (config key external), the interop tests and the benchmarks need; `make test` runs it.
VENV ?= .venv
PYTHON ?= python3
# The CPU build here; on a GPU machine use e.g. TORCH="torch==2.13.0 --index-url <your CUDA index>".
TORCH ?= torch==2.13.0
CORES ?= all
BIN := $(abspath $(VENV))/bin

.PHONY: setup peers sweep test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[workflow,dev]'
	touch $@

peers: $(VENV)/.peers

$(VENV)/.peers: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[peers]'
	touch $@

sweep: setup
	PATH=$(BIN):$$PATH snakemake --cores $(CORES)

test: peers
	PATH=$(BIN):$$PATH python -m pytest

lint: setup
	PATH=$(BIN):$$PATH snakefmt --check workflow/ Snakefile
	PATH=$(BIN):$$PATH snakemake --lint
