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
# lmms-eval (the `eval` extra) pins av<16, which the training stack's lock does not hold: it has a
# venv and a lock of its own; the lock starts from requirements/lock.txt, so the two share every
# other version (and pip's wheels). tests/test_lmms_eval.py runs lmms-eval's CLI in it.
EVAL_VENV ?= .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_LOCK := requirements/eval-lock.txt
EVAL_STAMP := $(EVAL_VENV)/.installed-$(shell cat pyproject.toml $(EVAL_LOCK) | sha1sum | cut -c1-12)

# DeepSpeed compiles a small op at first start; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/videoflash/torch_extensions
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv eval-venv quickstart eval-figures test test-fast test-latest lock eval-lock clean

# $(call build_venv,VENV,LOCK): the venv from the lock's exact versions, videoflash editable in it
define build_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --upgrade pip wheel setuptools
	$(1)/bin/python -m pip install -r $(2)
	$(1)/bin/python -m pip install --no-deps -e .
	$(1)/bin/python -m pip check
endef

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	if [ "$$(id -u)" = 0 ]; then bash scripts/install_ffmpeg.sh; fi
	$(call build_venv,$(VENV),$(LOCK))
	@$(PY) -c "from videoflash.model.video_io import torchcodec_problem as p; m = p(); print('notice: ' + m + \
		'; videos decode with decord (slower): scripts/install_ffmpeg.sh as root installs FFmpeg' if m else 'video decoder: torchcodec')"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

eval-venv: $(EVAL_STAMP)

$(EVAL_STAMP): pyproject.toml $(EVAL_LOCK)
	$(call build_venv,$(EVAL_VENV),$(EVAL_LOCK))
	$(EVAL_PY) -c "from lmms_eval.models import get_model; get_model('videoflash')"
	rm -f $(EVAL_VENV)/.installed-* && touch $(EVAL_STAMP)

quickstart: $(STAMP)
	$(PY) -m videoflash.quickstart

# after `make quickstart`: its benchmark-fixture scores and NIAH heatmap (docs/PERFORMANCE.md)
eval-figures: $(STAMP)
	$(PY) scripts/quickstart_eval.py --model runs/quickstart/stage4/export --out runs/quickstart/stage4/eval

test: $(STAMP) $(EVAL_STAMP)
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

# The eval venv's lock: pip-compile starts from the main lock's versions (it keeps each pin it can)
# and moves only what lmms-eval needs moved.
eval-lock:
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install -q pip-tools)
	cp $(LOCK) $(EVAL_LOCK)
	.venv-tools/bin/pip-compile --quiet --strip-extras --extra dev --extra eval --no-emit-index-url --no-emit-find-links \
		--upgrade-package torch==2.14.1 --upgrade-package torchvision==0.29.1 \
		--output-file $(EVAL_LOCK) pyproject.toml

clean:
	rm -rf runs outputs .pytest_cache
