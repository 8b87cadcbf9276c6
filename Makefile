# The README's commands. `make demo` and `make test` set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-quick test-gpu lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m parallel_bridge demo

test: setup lint
	$(PY) -m pytest -q tests

test-quick: setup
	$(PY) -m pytest -q -m "not slow" tests

# On a CUDA machine: NCCL, megatron-core layers and TrainableAttention on the GPU (skipped elsewhere);
# scripts/gpu_check.sh runs these and the GPU benchmarks in one go.
test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

lint: setup
	$(PY) -m ruff check parallel_bridge tests benchmarks examples

bench: setup
	@for b in benchmarks/*.py; do $(PY) $$b || exit 1; done
