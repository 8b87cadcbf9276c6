# The README's commands. `make demo` and `make test` set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# The AVX2 kernel family on any machine (tests/test_kernels.py checks each library took it): torch's ATen,
# oneDNN (torch's and vLLM's), MKL, and vLLM's own kernel library (tests/kernel_caps/sitecustomize.py).
# torch.compile's cache keys miss ATEN_CPU_CAPABILITY: an AVX2 process reusing kernels an AVX-512 one cached
# computed garbage (vLLM's vocabulary mask at TP=2), so the capped run has a cache of its own.
KERNEL_CAPS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PARALLEL_BRIDGE_KERNEL_CAP=avx2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-avx2

.PHONY: setup demo test test-suite test-avx2 test-quick test-gpu lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m parallel_bridge demo

# the whole suite on this machine's best kernels, then the parity-sensitive set on AVX2 kernels
test: setup lint test-suite test-avx2

test-suite: setup
	$(PY) -m pytest -q tests

test-avx2: setup
	env $(KERNEL_CAPS) PYTHONPATH=$(CURDIR)/tests/kernel_caps $(PY) -m pytest -q -m parity tests

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
