"""What a running vLLM engine computes with, read in its workers, and a check that an fp32 engine is fp32.

vLLM's CPU build chooses kernels per machine: its kernel library by CPUID (``_C`` with AVX-512 and BF16,
``_C_AVX512`` or ``_C_AVX2``), AMX attention and AMX GEMMs for bf16 models, oneDNN GEMMs whose math mode
``ONEDNN_DEFAULT_FPMATH_MODE`` may relax, and torch matmuls whose fp32 precision
``VLLM_FLOAT32_MATMUL_PRECISION`` may lower. An engine asked for float32 must not take any of the
down-converting paths, or its numbers are not the trainer's; :func:`check_fp32` refuses it by name.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from parallel_bridge.errors import BridgeError


class EngineNumericsError(BridgeError):
    """A vLLM engine computes in another precision than it was asked for; the message names the path."""


_GEMMS = {
    "onednn_mm": "oneDNN",
    "weight_packed_linear_cpu": "SGL packed (AMX)",
    "zentorch_linear_unary": "zentorch",
    "linear": "torch",
}
"""vLLM's CPU GEMM paths, by the op its ``cpu_linear`` calls (``model_executor/layers/utils.py``)."""


EXTENSION = "parallel_bridge.adapters.vllm_numerics.NumericsExtension"
"""vLLM's ``worker_extension_cls`` that gives each worker :meth:`NumericsExtension.parallel_bridge_numerics`
(vLLM serializes RPCs by name; a function would need ``VLLM_ALLOW_INSECURE_SERIALIZATION``)."""


class NumericsExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``."""

    def parallel_bridge_numerics(self) -> dict[str, Any]:
        return worker_numerics(self)


def worker_numerics(worker: Any) -> dict[str, Any]:
    """In a vLLM worker: its dtypes, attention backend and ISA, GEMM paths and kernel library."""
    import torch

    config = worker.vllm_config
    layers = config.compilation_config.static_forward_context.values()
    attention = sorted(
        {f"{layer.attn_backend.get_name()}" + (f" ({layer.isa})" if getattr(layer, "isa", None) else "")
         for layer in layers if hasattr(layer, "attn_backend")}
    )
    model = worker.model_runner.model
    gemms = set()
    for module in model.modules():
        call = getattr(module, "cpu_linear", None)
        if call is not None and hasattr(call, "__code__"):
            gemms |= {_GEMMS[n] for n in call.__code__.co_names if n in _GEMMS}
    library = sys.modules.get("vllm._C")
    return {
        "dtype": str(config.model_config.dtype).removeprefix("torch."),
        "kv_cache_dtype": config.cache_config.cache_dtype,
        "parameter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "attention": attention,
        "gemm": sorted(gemms) or ["platform"],
        "kernel_library": os.path.basename(library.__file__) if library is not None else None,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "onednn_fpmath_mode": os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE"),
    }


def engine_numerics(llm: Any) -> list[dict[str, Any]]:
    """:func:`worker_numerics` of every worker of a ``vllm.LLM`` built with ``worker_extension_cls=EXTENSION``."""
    return list(llm.collective_rpc("parallel_bridge_numerics"))


def fp32_problems(numerics: dict[str, Any]) -> list[str]:
    """What in one worker's numerics is not float32 all the way (empty when it is)."""
    problems = [f"parameters in {d}" for d in numerics["parameter_dtypes"] if d != "float32"]
    if numerics["kv_cache_dtype"] not in ("auto", "float32"):
        problems.append(f"a {numerics['kv_cache_dtype']} KV cache")
    problems += [f"attention {a} (a bf16 kernel)" for a in numerics["attention"] if "amx" in a.lower()]
    problems += [f"{g} GEMMs (bf16/int8 only)" for g in numerics["gemm"] if "AMX" in g]
    if numerics["fp32_matmul_precision"] != "highest":
        problems.append(f"fp32 matmul precision {numerics['fp32_matmul_precision']!r} (VLLM_FLOAT32_MATMUL_PRECISION)")
    mode = numerics["onednn_fpmath_mode"]
    if mode is not None and mode.lower() != "strict":
        problems.append(f"oneDNN math mode {mode!r} (ONEDNN_DEFAULT_FPMATH_MODE lets fp32 GEMMs down-convert)")
    return problems


def check_fp32(llm: Any) -> dict[str, Any]:
    """Raise :class:`EngineNumericsError` naming the worker and the path when an engine built for float32
    computes any part in a lower precision; return worker 0's numerics (for logs and reports)."""
    everyone = engine_numerics(llm)
    for rank, numerics in enumerate(everyone):
        if numerics["dtype"] != "float32":
            continue
        problems = fp32_problems(numerics)
        if problems:
            raise EngineNumericsError(
                f"the vLLM engine was built for float32, but worker {rank} runs " + "; ".join(problems)
                + ": its log-probabilities would not be comparable with an fp32 trainer's. Unset the variable "
                "named, or serve in the lower precision knowingly"
            )
    return everyone[0]


def describe(numerics: dict[str, Any]) -> str:
    """One line for logs: attention backend, GEMM path, dtypes, kernel library."""
    cache = numerics["dtype"] if numerics["kv_cache_dtype"] == "auto" else numerics["kv_cache_dtype"]
    return (
        f"attention {', '.join(numerics['attention'])}; GEMM {', '.join(numerics['gemm'])}; "
        f"{numerics['dtype']} weights, {cache} KV cache; "
        f"vLLM kernels {numerics['kernel_library']}, ATen {numerics['aten_capability']}"
    )
