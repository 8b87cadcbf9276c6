"""The machine facts fp32 results depend on: the CPU, its vector extensions, the kernel family torch takes,
and the caps a user set. Two machines that differ here sum in other orders (``parallel_bridge.numerics.parity``)."""

from __future__ import annotations

import os
import platform

import torch

KERNEL_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "PARALLEL_BRIDGE_KERNEL_CAP")
"""Variables that cap which instruction-set kernels torch (ATen), oneDNN, MKL and, in this project's capped
test run, vLLM's CPU kernel library take."""
_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Which of the vector extensions that change kernels this CPU has."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in _FEATURES if f in flags]


def machine_kernels() -> dict[str, object]:
    """CPU, features, ATen's kernel capability in this process and the caps set (for reports and logs)."""
    return {
        "cpu": cpu_name(),
        "features": cpu_features(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "caps": {k: os.environ[k] for k in KERNEL_CAPS if k in os.environ},
    }


def describe() -> str:
    m = machine_kernels()
    caps = ", ".join(f"{k}={v}" for k, v in m["caps"].items()) or "none"
    return f"{m['cpu']} ({', '.join(m['features']) or 'no AVX2'}); ATen kernels {m['aten_capability']}; caps: {caps}"
