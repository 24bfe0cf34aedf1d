# DRiffusion-TRT: every target installs what it needs (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup test test-all demo export build-engines triton-repo serve bench bench-speed bench-quality bench-load train-reference gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q "numpy<2" cuda-python -e ".[cpu,serve,bench,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

train-reference: $(STAMP)  ## retrain the bundled reference model (~12 min on 2 free cores)
	$(BIN)/python scripts/train_reference.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
