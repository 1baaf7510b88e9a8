# Two entry points for a fresh machine (see README):
#   make run    set up, then build shards from the embedded corpus, train configs/tiny.yaml,
#               evaluate and export to Hugging Face (artifacts/)
#   make test   set up, then run the test suite
#   make test-fast  the edit-loop tier: the suite without tests marked slow or distributed
# Set-up creates .venv and installs torch *before* the package: a bare `torch` requirement on a
# machine without torch would pull several GB of CUDA wheels. On a GPU cluster, install the torch
# build you want into the venv first (or set TORCH_SPEC); nothing is reinstalled if it imports.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/hybrid-lm run $(CONFIG)

test: setup
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow and not distributed" --durations=10 $(PYTEST_ARGS)

bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf artifacts runs .pytest_cache
