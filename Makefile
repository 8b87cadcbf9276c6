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

# On an AVX2-only CPU the caps change nothing (tests/test_kernels.py checks both runs agree bit for bit there),
# so the default run above already was the AVX2 run and this one is skipped.
test-avx2: setup
	@if $(PY) -c "import sys, torch; sys.exit(torch.backends.cpu.get_cpu_capability() != 'AVX2')"; then \
		echo "test-avx2: this CPU is AVX2-only, its default run took the AVX2 kernels: skipped"; \
	else env $(KERNEL_CAPS) PYTHONPATH=$(CURDIR)/tests/kernel_caps $(PY) -m pytest -q -m parity tests; fi

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
