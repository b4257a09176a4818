# Fresh machine: `make test` or `make demo` create .venv, install, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev,mlflow]"
	@# an older install's pynvml package (now nvidia-ml-py, same module) warns on every import of torch
	$(BIN)/pip uninstall -y -q pynvml 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

# On a lent H100 / H200: GPU-marked tests, real fused kernels, bench all --quick (<= 8 min) -> bench/results/<gpu>/.
# `python scripts/gpu_check.py --dry-run` lists the steps and the wheels they need beyond torch and triton.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info
