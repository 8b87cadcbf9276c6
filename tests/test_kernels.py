"""Both kernel families on one machine: the AVX2 caps (``make test-avx2``) really take other kernels.

What the installed libraries honour (read in their sources and binaries, checked here):
- torch's ATen reads ``ATEN_CPU_CAPABILITY`` (``torch.backends.cpu.get_cpu_capability()`` says which);
- oneDNN reads ``ONEDNN_MAX_CPU_ISA``, in torch and in the copy linked into vLLM's ``_C`` (its verbose
  output names the ISA);
- MKL reads ``MKL_ENABLE_INSTRUCTIONS`` on Intel CPUs (on AMD it takes its AVX2 path whatever is set);
- vLLM's CPU wheel reads no variable: ``CpuPlatform.import_kernels`` loads ``_C`` (AVX-512 + BF16),
  ``_C_AVX512`` or ``_C_AVX2`` by CPUID, so the capped run loads ``_C_AVX2`` through
  ``tests/kernel_caps/sitecustomize.py``, as an AVX2-only CPU would.
On a CPU better than AVX2 the capped fp32 results differ bit for bit from the default ones (other kernels,
other summation orders); on an AVX2-only CPU the two runs take the same kernels and agree bit for bit.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import KERNEL_CAPS, kernel_env
from _kernel_probe import vllm_library

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
CAPS = KERNEL_CAPS


def _probe(folder: Path, capped: bool) -> tuple[dict, str]:
    # one torch.compile cache for both runs unless the caps give the capped one its own (see the test below)
    env = kernel_env({**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder.parent / "inductor")}, capped)
    env.update(PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(HERE)]), ONEDNN_VERBOSE="1",
               VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, str(HERE / "_kernel_probe.py"), str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    isa = sorted(set(re.findall(r"onednn_verbose,.*?info,cpu,isa:(.*)", proc.stdout)))
    return json.loads(line[len("PROBE "):]), " | ".join(isa)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return _probe(folder, capped=False), _probe(folder, capped=True)


@pytest.mark.slow
def test_capped_run_takes_avx2_kernels_in_every_library(probes):
    (default, default_isa), (capped, capped_isa) = probes
    print(f"\n[default] {default} oneDNN: {default_isa}\n[capped]  {capped} oneDNN: {capped_isa}")
    assert capped["aten"] == "AVX2"
    assert capped["vllm_library"] == "_C_AVX2.abi3.so"
    assert capped_isa == "Intel AVX2", capped_isa
    fingerprints = ("log_softmax", "onednn_mm", "engine")
    if default["aten"] == "AVX2":  # an AVX2-only CPU: the caps change nothing
        assert all(default[k] == capped[k] for k in fingerprints), (default, capped)
    else:  # the caps really took other kernels: ATen's, oneDNN's (vLLM's GEMMs) and the served logprobs
        assert default["vllm_library"] != capped["vllm_library"]
        assert default_isa != capped_isa
        assert all(default[k] != capped[k] for k in fingerprints), (default, capped)
    # torch.compile's cache keys miss ATEN_CPU_CAPABILITY: an AVX2 process reusing what an AVX-512 process compiled
    # (vLLM's vocabulary mask, TP rank 1 of 2) got an index of 140423624222032 for token 8 and crashed. The capped
    # run compiles into a cache of its own, so after the default run filled the shared one its mask is right.
    want = [0, 0, 0, 17, 0, 0, 36, 0, 0]
    assert default["vocabulary_mask"] == want and capped["vocabulary_mask"] == want

@pytest.mark.parity
def test_this_process_takes_the_kernels_its_caps_say():
    """The run's own kernels: capped (``make test-avx2``) or the machine's best (``make test``)."""
    import torch
    import vllm._custom_ops  # noqa: F401 - loads vLLM's kernel library the way vLLM does

    library = vllm_library()
    if os.environ.get("PARALLEL_BRIDGE_KERNEL_CAP") == "avx2":
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"
        assert library == "_C_AVX2.abi3.so"
        assert {k: os.environ.get(k) for k in CAPS} == CAPS
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").endswith("inductor-avx2")  # see the test below
    else:
        best = "_C.abi3.so" if torch.cpu._is_avx512_bf16_supported() else (
            "_C_AVX512.abi3.so" if torch.cpu._is_avx512_supported() else "_C_AVX2.abi3.so")
        assert library == best


@pytest.mark.parity
def test_makefile_caps_are_these():
    text = (HERE.parent / "Makefile").read_text()
    for name, value in CAPS.items():
        assert f"{name}={value}" in text, name
