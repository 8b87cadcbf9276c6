#!/usr/bin/env bash
# The GPU lane in one run on a CUDA machine (the `device` tool's H200): the tests marked `gpu`, then the GPU
# benchmarks (attention: dense B8 H16 S2048 D128 and packed GQA 32/8 vs SDPA-cuDNN/flash and torch's varlen;
# megatron overhead), results in benchmarks/results/gpu-* and copied to $OUT.
#
# That machine has torch but no megatron-core or pytest: prepare wheels here first (device README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl megatron-core==0.19.2 pytest pluggy iniconfig
# then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p benchmarks/results
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee benchmarks/results/gpu-tests.txt
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 benchmarks/attention.py --repeats 20 || status=1
python3 benchmarks/megatron_overhead.py || status=1
[ -n "${OUT:-}" ] && cp benchmarks/results/gpu-* "$OUT"/
exit $status
