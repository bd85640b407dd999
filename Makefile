# Set-up and the two everyday commands. `make sweep` runs the default sweep,
# `make test` the test suite; both create the virtual environment first. `make peers` adds
# sae-lens and eai-sparsify (pinned to versions that keep this torch), which reading their
# SAEs (config key external), the interop tests and the benchmarks need; `make test` runs it.
# `make browser` installs Debian's Chromium for the browser tests (tests/browser.py, driven by the
# `playwright` package of the dev extra, never `playwright install`) when it is absent and apt-get
# can be used (as root); `make test` runs it; without Chromium those tests are skipped with the reason.
VENV ?= .venv
PYTHON ?= python3
# The CPU build here; on a GPU machine use e.g. TORCH="torch==2.13.0 --index-url <your CUDA index>".
TORCH ?= torch==2.13.0
CORES ?= all
BIN := $(abspath $(VENV))/bin

.PHONY: setup peers browser sweep test lint

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

browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "make browser: no Chromium installed; the browser tests will be skipped"

sweep: setup
	PATH=$(BIN):$$PATH snakemake --cores $(CORES)

test: peers browser
	PATH=$(BIN):$$PATH python -m pytest

lint: setup
	PATH=$(BIN):$$PATH snakefmt --check workflow/ Snakefile
	PATH=$(BIN):$$PATH snakemake --lint
