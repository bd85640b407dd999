# Set-up and the two everyday commands. `make sweep` runs the default sweep,
# `make test` the test suite; both create the virtual environment first. The peers extra
# (sae-lens, eai-sparsify, pinned to versions that keep this torch) is installed after torch,
# for the interop tests and benchmarks.
VENV ?= .venv
PYTHON ?= python3
# The CPU build here; on a GPU machine use e.g. TORCH="torch==2.13.0 --index-url <your CUDA index>".
TORCH ?= torch==2.13.0
CORES ?= all
BIN := $(abspath $(VENV))/bin

.PHONY: setup sweep test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[workflow,dev,peers]'
	touch $@

sweep: setup
	PATH=$(BIN):$$PATH snakemake --cores $(CORES)

test: setup
	PATH=$(BIN):$$PATH python -m pytest

lint: setup
	PATH=$(BIN):$$PATH snakefmt --check workflow/ Snakefile
	PATH=$(BIN):$$PATH snakemake --lint
