"""An engine asked for float32 computes in float32 in every worker, or is refused naming the path that is not.

vLLM's CPU build takes bf16 paths on machines that have them (AMX attention and GEMMs for bf16 models) and
lets variables relax fp32 math (``ONEDNN_DEFAULT_FPMATH_MODE`` for its oneDNN GEMMs,
``VLLM_FLOAT32_MATMUL_PRECISION`` for torch matmuls); ``serving.llm_engine`` reads each worker's numerics
and refuses such an engine before it serves a token.
"""

import pytest

from parallel_bridge.adapters.vllm_numerics import EngineNumericsError, describe, fp32_problems

FP32 = {
    "dtype": "float32", "kv_cache_dtype": "auto", "parameter_dtypes": ["float32"], "attention": ["CPU_ATTN (vec)"],
    "gemm": ["oneDNN"], "kernel_library": "_C.abi3.so", "aten_capability": "AVX512",
    "fp32_matmul_precision": "highest", "onednn_fpmath_mode": None,
}


@pytest.mark.parametrize(
    "change,needle",
    [({"parameter_dtypes": ["bfloat16", "float32"]}, "parameters in bfloat16"),
     ({"kv_cache_dtype": "fp8"}, "a fp8 KV cache"),
     ({"attention": ["CPU_ATTN (amx)"]}, "attention CPU_ATTN (amx) (a bf16 kernel)"),
     ({"gemm": ["SGL packed (AMX)"]}, "SGL packed (AMX) GEMMs"),
     ({"fp32_matmul_precision": "medium"}, "VLLM_FLOAT32_MATMUL_PRECISION"),
     ({"onednn_fpmath_mode": "BF16"}, "ONEDNN_DEFAULT_FPMATH_MODE")],
)
def test_each_lower_precision_path_is_named(change, needle):
    assert fp32_problems(FP32) == []
    problems = fp32_problems({**FP32, **change})
    assert len(problems) == 1 and needle in problems[0], problems


def test_the_log_line_names_backend_gemm_dtypes_and_kernels():
    assert describe(FP32) == ("attention CPU_ATTN (vec); GEMM oneDNN; float32 weights, float32 KV cache; "
                              "vLLM kernels _C.abi3.so, ATen AVX512")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def _engine(folder):
    from parallel_bridge.serving.engines import in_process_engine, llm_engine

    return in_process_engine(1), llm_engine(model=str(folder), skip_tokenizer_init=True, dtype="float32",
                                            max_model_len=32, enforce_eager=True)


@pytest.mark.slow
@pytest.mark.parity
def test_a_float32_engine_reports_float32_paths(tiny_llama):
    pytest.importorskip("vllm")
    from parallel_bridge.adapters.vllm_numerics import engine_numerics

    scope, engine = _engine(tiny_llama)
    with scope, engine as llm:
        (numerics,) = engine_numerics(llm)
    assert fp32_problems(numerics) == [] and numerics["dtype"] == "float32"
    assert numerics["gemm"] == ["oneDNN"] and numerics["attention"] == ["CPU_ATTN (vec)"], numerics


@pytest.mark.slow
def test_a_relaxed_onednn_math_mode_is_refused(tiny_llama, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "BF16")
    scope, engine = _engine(tiny_llama)
    with pytest.raises(EngineNumericsError, match="worker 0 runs oneDNN math mode 'BF16'"), scope, engine:
        pass
