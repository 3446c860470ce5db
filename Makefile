# videoflash: `make quickstart` and `make test` each create (or reuse) the virtual environment,
# installed from requirements/lock.txt (the exact versions that were tested).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
# `make test-latest` resolves today's newest releases in a venv of its own
LATEST_VENV ?= .venv-latest

# DeepSpeed compiles a small op at first start; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/videoflash/torch_extensions
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv quickstart eval-figures test test-fast test-latest lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	if [ "$$(id -u)" = 0 ]; then bash scripts/install_ffmpeg.sh; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools
	$(PY) -m pip install -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
	$(PY) -m pip check
	@$(PY) -c "from videoflash.model.video_io import torchcodec_problem as p; m = p(); print('notice: ' + m + \
		'; videos decode with decord (slower): scripts/install_ffmpeg.sh as root installs FFmpeg' if m else 'video decoder: torchcodec')"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m videoflash.quickstart

# after `make quickstart`: its benchmark-fixture scores and NIAH heatmap (docs/PERFORMANCE.md)
eval-figures: $(STAMP)
	$(PY) scripts/quickstart_eval.py --model runs/quickstart/stage4/export --out runs/quickstart/stage4/eval

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Drift check: the newest releases pyproject.toml admits (no lock), then the whole suite.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --upgrade pip wheel setuptools
	$(LATEST_VENV)/bin/python -m pip install --upgrade -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/resolved.txt
	diff <(grep -v '^ *#' $(LOCK) | grep -v '^$$') $(LATEST_VENV)/resolved.txt || true
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Regenerate the lock after a change of dependencies (pip-tools' pip-compile, in a venv of its own).
# torch/torchvision are held at the CUDA build that runs on CPU here and on the GPU machines.
lock:
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install -q pip-tools)
	.venv-tools/bin/pip-compile --quiet --strip-extras --extra dev --no-emit-index-url --no-emit-find-links \
		--upgrade-package torch==2.14.1 --upgrade-package torchvision==0.29.1 \
		--output-file $(LOCK) pyproject.toml

clean:
	rm -rf runs outputs .pytest_cache
