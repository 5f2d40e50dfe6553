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

.PHONY: demo test lint gpu-test clean-venv browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/otterhd demo --workdir demo_output

# The web page test (tests/integration/test_serve_app.py) drives Debian's chromium through chromium-driver:
# installed once, quietly, where apt-get exists and we are root; skipped when already there.
browser:
	@command -v chromedriver >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	    >/dev/null; } || echo "make: could not install chromium + chromium-driver (the browser test needs them)"

test: lint browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/gpu

lint: $(STAMP)
	$(BIN)/ruff check otterhd_ray jobs tests benchmarks scripts
	$(BIN)/lint-imports  # layering contracts: [tool.importlinter] in pyproject.toml

clean-venv:
	rm -rf $(VENV)
