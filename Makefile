# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
# torch: the CPU build (torch==2.13.0, a local file on CPU machines) unless a GPU is visible, where a plain
# `pip install torch` takes the CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: demo test lint gpu-test clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/otterhd demo --workdir demo_output

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/gpu

lint: $(STAMP)
	$(BIN)/ruff check otterhd_ray jobs tests benchmarks scripts
	$(BIN)/lint-imports  # layering contracts: [tool.importlinter] in pyproject.toml

clean-venv:
	rm -rf $(VENV)
