# Fresh machine: `make test`, `make demo` or `make demo-dino` create .venv, install, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo demo-dino install clean gpu-check

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

demo-dino: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo_dino.sh

# On a lent H100 / H200, with that machine's own python3 (no venv, no install): stage A needs only torch, Triton,
# torchvision, timm, numpy and pytest; stage B needs the DALI wheels made by `scripts/gpu_wheels.sh .gpu-wheels` and
# carried in parts (README: "GPU check"). `make gpu-check GPU_STAGE=B`; `--dry-run` prints the plan without a GPU.
GPU_STAGE ?= A
GPU_OUT ?= $(if $(OUT),$(OUT),gpu-check-out)
gpu-check:
	python3 scripts/gpu_check.py --stage $(GPU_STAGE) --out $(GPU_OUT)

clean:
	rm -rf $(VENV) *.egg-info
