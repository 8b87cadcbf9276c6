"""Mixtures of experts between Hugging Face and Megatron: ``convert --to megatron --tp 2 --ep 2`` of tiny random
Mixtral and Qwen3-MoE models saved by transformers, loaded by megatron-core's own ``dist_checkpointing`` into a
model built at TP=2, EP=2 (4 ranks), and served by vLLM from the import. Parity with transformers' forward: the
full first-step log-softmax within the parity rule's bound (max and mean), greedy tokens equal.
"""

import pytest

from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import compare, first_step_and_tokens, hf_decode  # noqa: E402
from test_hf_import import VOCAB, convert, hf_model  # noqa: E402

FAMILIES = {
    "mixtral": ("MixtralConfig", {"rope_theta": 10000.0, "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
                {"num_moe_experts": 4, "moe_router_topk": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"rope_theta": 10000.0, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "norm_topk_prob": True, "head_dim": 32, "tie_word_embeddings": False},
                  {"num_moe_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 64, "qk_layernorm": True}),
}


def hf_moe_model(family, folder, seed=7):
    """A random tiny MoE model of ``family`` saved by transformers in ``folder`` (every expert its own weights)."""
    return hf_model(family, folder, FAMILIES, seed)


def variant(family, tp):
    return {"groups": 2, "tied": False, "vocab": VOCAB, "padded": 128 * tp, "seed": 0,
            "config": FAMILIES[family][2]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_import")
    out = {}
    for family in FAMILIES:
        model = hf_moe_model(family, root / f"{family}_hf")
        proc = convert(root / f"{family}_hf", root / f"{family}_mg", "--to", "megatron", "--tp", 2, "--ep", 2)
        assert proc.returncode == 0, proc.stderr
        out[family] = (root / f"{family}_mg", hf_decode(model, mc.PROMPTS, mc.STEPS, VOCAB))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_loads_the_moe_import_at_tp2_ep2(imported, family):
    folder, reference = imported[family]
    decoded = run_distributed(mc.reference_from_dist, 4, str(folder), variant(family, 2), 2, 1, 2, timeout_s=300)
    for rank_decode in decoded:
        compare(rank_decode, reference, f"{family}: HF imported, Megatron at TP=2 EP=2", mc.length(variant(family, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_moe_import(imported, family):
    folder, reference = imported[family]
    served = first_step_and_tokens(folder, 1, VOCAB, mc.PROMPTS, mc.STEPS, load_format="megatron",
                                   config_format="megatron")
    compare(served, reference, f"{family}: HF -> Megatron -> vLLM", mc.length(variant(family, 2)))


@pytest.mark.slow
def test_import_refuses_an_ep_that_does_not_divide_the_experts(tmp_path):
    hf_moe_model("mixtral", tmp_path / "hf")
    for extra, says in ((["--ep", "3"], "--ep 3: expert-parallel size 3 does not divide num_moe_experts=4"),):
        proc = convert(tmp_path / "hf", tmp_path / "out", "--to", "megatron", *extra)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("parallel-bridge convert: error:")]
        assert proc.returncode == 1 and len(errors) == 1 and says in errors[0], (says, proc.stderr[-800:])
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
