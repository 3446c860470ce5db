# videoflash: `make quickstart` and `make test` each create (or reuse) the virtual environment.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

# DeepSpeed compiles a small op at first start; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/videoflash/torch_extensions
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv quickstart test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools
	$(PY) -m pip install -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m videoflash.quickstart

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs outputs .pytest_cache
