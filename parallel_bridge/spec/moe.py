"""The mixture-of-experts families: Mixtral and Qwen3-MoE, as rows with their tensor kinds.

Each MLP is megatron-core's MoE layer: a router ``[experts, hidden]`` and per expert a SwiGLU MLP, named by
megatron-core's own model at expert-parallel size 1 (``decoder.layers.{i}.mlp.experts.local_experts.{e}.``):
the index ``{e}`` is the global expert index, whatever layout saved it. vLLM keeps each layer's experts stacked
in one fused parameter (``experts.routed_experts.w13_weight`` ``[experts, 2 * ffn, hidden]`` and ``w2_weight``
in vLLM 0.32, whose ``FusedMoE`` keeps them in a ``routed_experts`` module), each
expert split by tensor parallelism as a dense MLP is (:data:`~parallel_bridge.spec.sharding.GATED`, ``ROW``).
Routing is megatron-core's softmax router: the softmax over the chosen k (Mixtral; Qwen3-MoE's
``norm_topk_prob``) or over all experts (``moe_router_pre_softmax``, Qwen3-MoE without ``norm_topk_prob``).
Shared experts, sigmoid routing, expert bias, grouped top-k, dense layers among MoE layers and MLA (the
DeepSeek-V3 family) are refused by name (:mod:`~parallel_bridge.spec.megatron_args`, ``families.HF_REFUSED``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from parallel_bridge.spec import sharding
from parallel_bridge.spec.families import Family, register_family
from parallel_bridge.spec.schema import TensorKind

GPTConfig = Any

_E = "decoder.layers.{i}.mlp.experts.local_experts.{e}."


def _is_moe(c: Any) -> bool:
    return bool(c.num_moe_experts)


def moe_kinds(block: str, gate: str, up: str, down: str) -> tuple[TensorKind, ...]:
    """The router and expert kinds of a family whose Hugging Face MoE block is ``model.layers.{i}.<block>``
    (its router ``gate``, experts ``experts.{e}.<gate|up|down>.weight``); vLLM names the block the same."""
    hf, ex = f"model.layers.{{i}}.{block}.", f"model.layers.{{i}}.{block}.experts.{{e}}."
    return (
        TensorKind("decoder.layers.{i}.mlp.router.weight", (hf + "gate.weight",), hf + "gate.weight",
                   sharding.REPLICATED, lambda c: (c.num_moe_experts, c.hidden_size), _is_moe),
        TensorKind(_E + "linear_fc1.weight", (ex + f"{gate}.weight", ex + f"{up}.weight"), hf + "experts.routed_experts.w13_weight",
                   sharding.GATED, lambda c: (2 * c.expert_ffn, c.hidden_size), _is_moe),
        TensorKind(_E + "linear_fc2.weight", (ex + f"{down}.weight",), hf + "experts.routed_experts.w2_weight",
                   sharding.ROW, lambda c: (c.hidden_size, c.expert_ffn), _is_moe),
    )


# ------------------------------------------------------------------ mixtures of experts
def _mixtral_from_hf(c: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_moe_experts": c.get("num_local_experts"), "moe_router_topk": c.get("num_experts_per_tok"),
            "sliding_window": c.get("sliding_window")}  # a window is refused: no family computes it with MoE


def _mixtral_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    return {"num_local_experts": cfg.num_moe_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "intermediate_size": cfg.expert_ffn, "sliding_window": None, "output_router_logits": False}


def _qwen3_moe_from_hf(c: Mapping[str, Any]) -> dict[str, Any]:
    experts = c.get("num_experts") or c.get("num_local_experts")  # the Hub's name; transformers 5 writes the other
    return {"qk_layernorm": True, "num_moe_experts": experts, "moe_router_topk": c.get("num_experts_per_tok"),
            "moe_ffn_hidden_size": c.get("moe_intermediate_size"),
            "moe_router_pre_softmax": not c.get("norm_topk_prob", False)}  # transformers' default: False


def _qwen3_moe_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    return {**{"attention_bias": False, "mlp_bias": False}, "num_experts": cfg.num_moe_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "moe_intermediate_size": cfg.expert_ffn, "norm_topk_prob": not cfg.moe_router_pre_softmax,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False}


def _mixtral_refuses(cfg: GPTConfig) -> list[str]:
    if cfg.moe_router_pre_softmax:
        return ["moe_router_pre_softmax=True (Mixtral renormalises the chosen experts' weights; no Mixtral "
                "computes a softmax over all experts without it)"]
    return []


MIXTRAL = register_family(Family(
    "mixtral", "MixtralForCausalLM", frozenset({"num_moe_experts"}), from_hf=_mixtral_from_hf,
    to_hf=_mixtral_to_hf, hf_claims=frozenset({"sliding_window"}), refuses=_mixtral_refuses,
    kinds=moe_kinds("block_sparse_moe", "w1", "w3", "w2"),
))
QWEN3_MOE = register_family(Family(
    "qwen3_moe", "Qwen3MoeForCausalLM", frozenset({"num_moe_experts", "qk_layernorm"}),
    from_hf=_qwen3_moe_from_hf, to_hf=_qwen3_moe_to_hf,
    kinds=moe_kinds("mlp", "gate_proj", "up_proj", "down_proj"),
))


# ------------------------------------------------------------------ expert indices across expert-parallel ranks
LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")
"""megatron-core's per-expert names: group 2 is the (local or global) expert index."""


def is_expert(name: str) -> bool:
    """Whether a megatron-core name is one expert's tensor (``...mlp.experts.local_experts.{e}...``)."""
    return LOCAL_EXPERT.search(name) is not None


def global_expert_name(name: str, ep_rank: int, per_rank: int) -> str:
    """An expert-parallel rank's local expert name with the global expert index (megatron-core places experts
    in order: rank r holds ``[r * per_rank, (r + 1) * per_rank)``); other names unchanged."""
    return LOCAL_EXPERT.sub(lambda m: f"{m[1]}{ep_rank * per_rank + int(m[2])}{m[3]}", name)
