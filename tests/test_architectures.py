"""The Llama family beyond Llama 2: Qwen2 (QKV biases, tied embeddings), Qwen3 (QK layernorm), Mistral (a
sliding window of 4 tokens, shorter than the prompts) and Llama-3.1 rope scaling, each written by megatron-core's own save code at TP=2 (torch_dist and legacy), served by vLLM's
own model class of the family through ``load_format="megatron"`` at TP=1 and TP=2, and exported to a
Hugging Face folder that stock transformers loads.

Parity: the full first-step log-softmax over the vocabulary matches megatron-core's own forward of the same
checkpoint within the parity rule's bound (``parallel_bridge.numerics.parity``: fp32 rounding of the model's sums,
max and mean, ~1e-4 and ~1e-5 here; vLLM's and transformers' kernels sum in other orders than Megatron's
unfused ops; measured gaps printed with -s), and 4 greedy tokens are equal. Each family's own tensors carry
values a dropped or misplaced mapping would change (QKV biases and QK-norm weights are perturbed from
Megatron's zero/one initialisation), and a check shows the reference moves by more than 10 times the bound
without them.
"""

import pytest
import torch

from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import OnDemand, compare, first_step_and_tokens, hf_decode  # noqa: E402

from parallel_bridge.numerics import parity  # noqa: E402

FAMILIES = {
    "qwen2": {"groups": 2, "tied": True, "vocab": 100, "padded": 128, "seed": 11, "config": {"add_qkv_bias": True},
              "architecture": "Qwen2ForCausalLM"},
    "qwen3": {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 12, "config": {"qk_layernorm": True},
              "architecture": "Qwen3ForCausalLM"},
    "mistral": {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 14, "config": {"window_size": (3, 0)},
                "architecture": "MistralForCausalLM"},
    "llama3": {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 13, "rope_scaling_factor": 8.0,
               "rotary_base": 500000, "architecture": "LlamaForCausalLM"},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(family, "dist" or "legacy") -> (the folder megatron-core's own code wrote from TP=2, Megatron's reference
    decode of it), written when first asked."""
    root = tmp_path_factory.mktemp("families")

    def write(key):
        family, fmt = key
        v, folder = FAMILIES[family], root / f"{family}_{fmt}"
        if fmt == "legacy":
            return folder, run_distributed(mc.save_legacy, 2, str(folder), 2, v, timeout_s=300)[0]
        run_distributed(mc.save_dist, 2, str(folder), 2, 1, v, timeout_s=300)
        return folder, run_distributed(mc.reference_from_dist, 1, str(folder), v, timeout_s=300)[0]

    return OnDemand(write)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_names_the_family(written, family):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    (dist, _), (legacy, _) = written[family, "dist"], written[family, "legacy"]
    for folder in (dist, legacy):
        assert MegatronCheckpoint.open(folder).config.to_hf()["architectures"] == [FAMILIES[family]["architecture"]]


SERVED = [pytest.param(f, 1, marks=pytest.mark.parity) for f in FAMILIES] + [("qwen2", 2), ("qwen3", 2)]
"""Every family at TP=1; at TP=2 the families whose own tensors are sharded or replicated differently from
Llama's (Qwen2's QKV biases, Qwen3's QK norms): Mistral's window and Llama-3.1's rope scaling are config, so
their tensors slice exactly as Llama's, which the checkpoint tests serve at TP=2."""


@pytest.mark.slow
@pytest.mark.parametrize("family,tp", SERVED)
def test_vllm_serves_the_family(written, family, tp, monkeypatch):
    if tp == 2:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    dist, reference = written[family, "dist"]
    served = first_step_and_tokens(
        dist, tp, FAMILIES[family]["vocab"], mc.PROMPTS, mc.STEPS, load_format="megatron", config_format="megatron"
    )
    compare(served, reference, f"{family} torch_dist (TP=2) served at TP={tp}", mc.length(FAMILIES[family]))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_legacy_checkpoint(written, family):
    legacy, reference = written[family, "legacy"]
    served = first_step_and_tokens(
        legacy, 1, FAMILIES[family]["vocab"], mc.PROMPTS, mc.STEPS, load_format="megatron", config_format="megatron"
    )
    compare(served, reference, f"{family} legacy (TP=2) served at TP=1", mc.length(FAMILIES[family]))


def _hf_decode(model, vocab):
    return hf_decode(model, mc.PROMPTS, mc.STEPS, vocab)


def _bound(reference, family):
    return parity.logprob_bound(max(r[2] for r in reference), mc.length(FAMILIES[family]))


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_export_matches_megatron_in_transformers(written, family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from parallel_bridge.checkpoint.hf_export import export_hf
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    dist, reference = written[family, "dist"]
    out = export_hf(MegatronCheckpoint.open(dist), tmp_path / "hf")
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == [FAMILIES[family]["architecture"]]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    length = mc.length(FAMILIES[family])
    compare(_hf_decode(model, FAMILIES[family]["vocab"]), reference, f"{family} exported, in transformers", length)
    # the family's own feature matters at this bound: without it the same weights drift far past it
    if family == "mistral":
        config.sliding_window = None
        plain = AutoModelForCausalLM.from_pretrained(out, config=config, dtype=torch.float32).eval()
    elif family == "llama3":
        config.rope_scaling = config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta
                                                        if hasattr(config, "rope_theta") else 500000.0}
        plain = AutoModelForCausalLM.from_pretrained(out, config=config, dtype=torch.float32).eval()
    else:
        plain = model
        with torch.no_grad():
            for name, p in plain.named_parameters():
                if name.endswith("_proj.bias") or name.endswith("_norm.weight") and "self_attn" in name:
                    p.copy_(torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p))
    without = parity.Gap.between([r[1] for r in _hf_decode(plain, FAMILIES[family]["vocab"])], [r[1] for r in reference])
    assert without.max > 10 * _bound(reference, family).max, without
