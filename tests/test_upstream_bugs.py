"""Upstream bugs this project works around or refuses, each pinned by a minimal reproduction with vLLM's own
classes on a model transformers saved (no project code in the served path), marked expected-to-fail (strict):
the day vLLM fixes one, its test passes and the suite says so; then drop the workaround or the refusal.

- ``vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py`` (``_setup_kernel``): on the CPU, a
  second ``process_weights_after_loading`` (any weight reload or update) copies checkpoint-layout weights into the
  storage the CPU kernel had prepacked and skips the prepacking: wrong numbers, no error (the vLLM #42821 class).
  The weight sync sets the kernel up again instead (``sync/receiving._rebuild_cpu_moe_kernel``).
- ``csrc/cpu/cpu_fused_moe.cpp:242``: ``enable_expert_parallel=True`` at TP=2 crashes the CPU fused-MoE kernel
  (global expert ids index the local experts' weights; here a worker dies, exit -9, in the first forward). The loader and the sync refuse expert-parallel serving on
  the CPU (``adapters/vllm.CPU_EP_CRASH``).
- ``vllm/v1/attention/backends/cpu_mla`` (``CPU_MLA``): DeepSeek-V3's MLA in fp32 is right for a one-token prompt
  and wrong beyond. DeepSeek-V3 is not served here (refused by name).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("vllm")

from _helpers import greedy, hf_decode  # noqa: E402
from test_moe_hf import hf_moe_model  # noqa: E402

from parallel_bridge.numerics import parity  # noqa: E402

PROMPTS = [[5, 17, 42], [3, 9, 27, 81, 11, 2]]
VOCAB = 100


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream") / "mixtral"
    model = hf_moe_model("mixtral", folder)
    return folder, hf_decode(model, PROMPTS, 4, VOCAB)


def _engine_kwargs():
    return {"model": None, "skip_tokenizer_init": True, "dtype": "float32", "max_model_len": 64,
            "enforce_eager": True}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="vLLM 0.32 CPU fused MoE: a weight reload copies unpacked weights into prepacked storage")
def test_vllm_cpu_moe_serves_the_same_after_reloading_its_own_weights(mixtral):
    """vLLM's own ``reload_weights`` of the same safetensors must leave the numbers unchanged."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    folder, _ = mixtral
    llm = LLM(**{**_engine_kwargs(), "model": str(folder)}, tensor_parallel_size=1)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=5, detokenize=False, ignore_eos=True)

    def run():
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs[0]) for o in outs]

    try:
        before = run()
        llm.collective_rpc("reload_weights", kwargs={"is_checkpoint_format": True})
        after = run()
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [b[0] for b in before] == [a[0] for a in after], ("tokens changed by a reload", before, after)
    for (_, b), (_, a) in zip(before, after, strict=True):
        assert all(abs(b[t].logprob - a[t].logprob) < 1e-6 for t in b if t in a), (b, a)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="vLLM 0.32 CPU fused MoE with expert parallelism at TP=2: a worker dies in its first forward")
def test_vllm_cpu_fused_moe_with_expert_parallelism(mixtral, monkeypatch):
    """Stock vLLM, TP=2 with ``enable_expert_parallel=True``, in its own process (it crashes): must serve what
    transformers computes."""
    folder, reference = mixtral
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from _helpers import greedy
        out = greedy({str(folder)!r}, 2, {PROMPTS!r}, 4, in_process=False, enable_expert_parallel=True)
        print("TOKENS" + json.dumps([t for t, _ in out]))
    """)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400,
                          env={**__import__("os").environ, **env})
    died = [line for line in (proc.stdout + proc.stderr).splitlines() if "died unexpectedly" in line]
    assert proc.returncode == 0, f"exit {proc.returncode}: {died or proc.stderr[-400:]}"
    tokens = __import__("json").loads(proc.stdout.split("TOKENS")[-1])
    assert tokens == [r[0] for r in reference]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="vLLM 0.32 CPU_MLA attention backend: fp32 MLA wrong for prompts longer than one token")
def test_vllm_cpu_mla_matches_transformers_beyond_one_token(tmp_path):
    """A tiny DeepSeek-V3 (MLA with the 576-wide latent CPU_MLA takes: kv_lora_rank 512 + rope 64), served by
    stock vLLM: its first-step log-softmax must match transformers' within the parity rule's bound."""
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=64, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 if "norm" in name else 0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "dsv3")
    reference = hf_decode(model, PROMPTS, 1, VOCAB)
    served = greedy(tmp_path / "dsv3", 1, PROMPTS, 1, logprobs=VOCAB, in_process=False)
    zmax = max(r[2] for r in reference)
    bound = parity.logprob_bound(zmax, parity.reduction_length(
        hidden=128, ffn=256, layers=1, vocab=VOCAB, heads=2, head_dim=96, seq_len=8))
    for (_, steps), (_, first, _) in zip(served, reference, strict=True):
        gap = max(abs(steps[0][t] - first[t]) for t in range(VOCAB))
        assert gap <= bound.max, f"CPU_MLA first-step gap {gap:.2e} > bound {bound.max:.2e}"
