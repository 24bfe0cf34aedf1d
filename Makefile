# DRiffusion-TRT: every target installs what it needs (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup test test-all demo export build-engines triton-repo serve bench bench-speed bench-quality bench-load train-reference train-reference-flow gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==$(TORCH_VERSION)  # bytecode is written on first import
	$(BIN)/pip install -q --no-compile "numpy<2" cuda-python -e ".[cpu,serve,bench,dev]"
	$(BIN)/pip install -q --no-deps open_clip_torch==3.3.0  # CLIP's BPE merges, for the tokenizer
	touch $(STAMP)

# the suite runs on TEST_WORKERS processes, one test module per worker at a time (servers
# spend much of their time waiting on each other, so two workers fit a 2-core machine)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "slow or not slow"

demo: setup  ## main job: reference engines on 2 CPU devices behind Triton, every digit sequential vs DRiffusion (DEMO_ARGS=--quick)
	$(BIN)/driffusion demo $(DEMO_ARGS)

bench: bench-speed bench-quality  ## the benchmarks, results under out/bench/

bench-speed: $(STAMP)  ## speed per mode and window: unet_sim (client and server paths) and reference CPU devices (SPEED_ARGS to change)
	$(BIN)/driffusion bench speed $(SPEED_ARGS)

bench-quality: $(STAMP)  ## accuracy, digits-FD, distance to sequential per mode and window (QUALITY_ARGS)
	$(BIN)/driffusion bench quality $(QUALITY_ARGS)

# the model that export, build-engines, triton-repo and serve work on: a preset (reference,
# reference-flow, tiny-sd; serve also takes sim) or a diffusers pipeline folder
MODEL ?= reference
export: $(STAMP)  ## validated ONNX of MODEL in out/onnx/<model>
	$(BIN)/driffusion export --model $(MODEL) $(EXPORT_ARGS)

build-engines: $(STAMP)  ## TensorRT plans per GPU, or ONNX Runtime engines without TensorRT/GPU (MODEL)
	$(BIN)/driffusion build-engines --model $(MODEL) $(ENGINE_ARGS)

train-reference: $(STAMP)  ## retrain the bundled reference model (~12 min on 2 free cores)
	$(BIN)/python -m models.train_reference

train-reference-flow: $(STAMP)  ## retrain the bundled flow-matching reference (SD3 transformer; ~16 min, TRAIN_ARGS=--threads 1 on a busy box)
	$(BIN)/python -m models.train_reference_flow $(TRAIN_ARGS)

GPU_CHECK_OUT ?= out/gpu_check
gpu-check: $(STAMP)  ## measure the GPU path here (GPU_CHECK_ARGS=--dry-run rehearses it on the CPU)
	$(BIN)/python scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

triton-repo: $(STAMP)  ## model repository for MODEL, building what is missing (TRITON_ARGS to change)
	$(BIN)/driffusion triton-repo --model $(MODEL) --devices 2 $(TRITON_ARGS)

serve: $(STAMP)  ## Triton for MODEL on 127.0.0.1: gRPC 8001, HTTP 8000, metrics 8002; Ctrl-C stops
	$(BIN)/driffusion serve --model $(MODEL) --devices 2 $(TRITON_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
