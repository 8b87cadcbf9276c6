"""Run as a script by tests/test_kernels.py: which CPU kernels this process takes, and fingerprints (hashes
of fp32 results) of each library's kernels: ATen's log-softmax, MKL's matmul, vLLM's oneDNN GEMM, and a
vLLM engine's full log-softmax for a tiny Llama; and vLLM's torch.compile'd vocabulary mask. Prints one JSON object; oneDNN's ISA comes from its
verbose output (ONEDNN_VERBOSE=1, on stdout), which the caller parses."""

import hashlib
import json
import os
import sys

import torch


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def vllm_library() -> str:
    """The file name of the vLLM kernel library this process mapped. Not ``sys.modules["vllm._C"]``: on an
    AVX2-only or AVX-512-without-BF16 CPU vLLM imports ``vllm._C_AVX2`` / ``_C_AVX512``, whose module is named
    ``_C`` inside, so the import fails after the library loaded and no module is recorded."""
    with open("/proc/self/maps") as maps:
        names = {os.path.basename(line.split()[-1]) for line in maps if "/vllm/_C" in line}
    if len(names) != 1:
        raise RuntimeError(f"expected one vLLM kernel library mapped, found {sorted(names)}")
    return names.pop()


def _engine_logprobs(folder: str) -> str:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from parallel_bridge.serving.engines import in_process_engine, llm_engine

    with in_process_engine(1), llm_engine(model=folder, skip_tokenizer_init=True, dtype="float32", max_model_len=64,
                                          enforce_eager=True, max_logprobs=128) as llm:
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=128, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=[5, 17, 42, 9, 3, 77])], params, use_tqdm=False)[0]
        step = out.outputs[0].logprobs[0]
        return _hash(torch.tensor([step[t].logprob for t in range(128)]))


def _vocabulary_mask() -> list[int]:
    """vLLM's torch.compile'd vocabulary mask of TP rank 1 of 2 (tokens 64..127) for nine tokens."""
    from vllm.model_executor.layers.vocab_parallel_embedding import get_masked_input_and_mask

    ids = torch.tensor([3, 9, 27, 81, 11, 2, 100, 7, 8])
    return get_masked_input_and_mask(ids, 64, 128, 0, 128, 128)[0].tolist()


def main(folder: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(96, 1024, generator=g), torch.randn(1024, 200, generator=g)
    import vllm._custom_ops as ops

    result = {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "vllm_library": vllm_library(),
        "log_softmax": _hash(torch.log_softmax(a, -1)),
        "mkl_matmul": _hash(a @ b),
        "onednn_mm": _hash(ops.onednn_mm(ops.create_onednn_mm(b, 32), a, None)),
        "engine": _engine_logprobs(folder),
        "vocabulary_mask": _vocabulary_mask(),
    }
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
