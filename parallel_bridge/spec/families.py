"""Model families as rows: which Hugging Face ``model_type`` and class, which vLLM class, and which
features of a megatron-core GPT each one computes.

A family is data. :func:`register_family` adds one (a row, its tensor kinds and the Megatron arguments it
maps); :func:`family_of` picks the family of a :class:`~parallel_bridge.spec.model.GPTConfig` from the
features it has set, and :func:`family_for_hf` the family of a ``config.json``. The HF config of a family is
read and written once, here (:func:`config_from_hf`, :func:`config_to_hf`); anything a family does not
compute is refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from parallel_bridge.errors import ModelConfigError

GPTConfig = Any
"""A :class:`~parallel_bridge.spec.model.GPTConfig` (named here without importing it: the model imports its
families, not the other way round)."""
TensorKind = Any
"""A :class:`~parallel_bridge.spec.schema.TensorKind` (likewise)."""


def _nothing(_: Any) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of Llama-like GPTs (dense or mixture-of-experts) and how each side names it."""

    model_type: str
    """Hugging Face ``model_type``."""
    architecture: str
    """The Hugging Face class, which is also vLLM's own model class of the family."""
    features: frozenset[str] = frozenset()
    """GPTConfig fields this family sets (truthy): a config with exactly these set is this family's."""
    from_hf: Callable[[Mapping[str, Any]], dict[str, Any]] = _nothing
    """The family's own GPTConfig fields, from its config.json."""
    to_hf: Callable[[GPTConfig], dict[str, Any]] = _nothing
    """config.json fields only this family writes."""
    hf_claims: frozenset[str] = frozenset()
    """config.json fields the family reads itself (not refused for it)."""
    recognise: Callable[[Mapping[str, Any]], bool] = lambda config: True
    """Among the families of one ``model_type``, whether a config.json is this family's."""
    megatron_claims: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Megatron arguments the Llama core refuses that this family maps: name -> the value it maps."""
    kinds: tuple[TensorKind, ...] = ()
    """Tensor kinds beyond the Llama core's (:data:`parallel_bridge.spec.schema.LLAMA_CORE`)."""
    refuses: Callable[[GPTConfig], list[str]] = lambda cfg: []
    """Settings of a config of this family's features that the family still does not compute
    (``name=value (meaning)``), refused by :meth:`GPTConfig.check_supported`."""


_FAMILIES: list[Family] = []

UNMAPPED: dict[str, str] = {
    "deepseek_v3": "DeepSeek-V3 / Kimi-K2 (MLA attention, sigmoid routing with an expert bias and groups, shared "
                   "experts, dense first layers)",
    "deepseek_v2": "DeepSeek-V2 (MLA attention, shared experts)",
    "kimi_k2": "Kimi-K2 (DeepSeek-V3's architecture: MLA attention, sigmoid routing, shared experts)",
    "qwen2_moe": "Qwen2-MoE (a shared expert with a sigmoid gate)",
    "glm4_moe": "GLM-4.5 (sigmoid routing with an expert bias, shared experts, dense first layers)",
    "gpt_oss": "GPT-OSS (attention sinks, alternating sliding windows, biased clamped SwiGLU experts)",
}
"""Mixture-of-experts model types known and not mapped: what in each one no family computes."""

HF_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "attention_bias": ((False,), "biases on q, k, v and o projections"),
    "mlp_bias": ((False,), "MLP biases"),
    "hidden_act": (("silu",), "an activation other than SiLU"),
    "partial_rotary_factor": ((1.0, 1), "partial rotary embedding"),
    "use_sliding_window": ((False,), "sliding-window attention"),
    "decoder_sparse_step": ((1,), "dense layers among the MoE layers"),
    "mlp_only_layers": (([],), "dense layers among the MoE layers"),
    "shared_expert_intermediate_size": ((0, None), "shared experts"),
    "n_shared_experts": ((0, None), "shared experts"),
    "num_nextn_predict_layers": ((0, None), "multi-token prediction layers"),
}
"""config.json fields -> (values megatron-core's GPT computes, what another value means), unless the
family claims the field."""


def register_family(family: Family) -> Family:
    """Add a family (its rows are read by the schema, the HF config and the Megatron argument checks)."""
    if any(f.features == family.features for f in _FAMILIES):
        raise ModelConfigError(f"a family with features {sorted(family.features)} is registered already")
    _FAMILIES.append(family)
    return family


def unregister_family(family: Family) -> None:
    """Remove a family :func:`register_family` added (for tests that define their own)."""
    _FAMILIES.remove(family)


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES)


def feature_fields() -> frozenset[str]:
    """Every GPTConfig field some family selects by."""
    return frozenset().union(*(f.features for f in _FAMILIES))


def family_of(cfg: GPTConfig) -> Family:
    """The family that computes ``cfg``: the one whose features are exactly those ``cfg`` sets."""
    active = frozenset(name for name in feature_fields() if getattr(cfg, name))
    for family in _FAMILIES:
        if family.features == active:
            return family
    raise ModelConfigError(
        f"{', '.join(f'{n}={getattr(cfg, n)!r}' for n in sorted(active))}: no family parallel_bridge maps "
        f"computes this combination (families: {', '.join(f.model_type for f in _FAMILIES)})"
    )


def family_for_hf(config: Mapping[str, Any]) -> Family:
    """The family of a Hugging Face config.json body, by ``model_type`` and then by its fields."""
    model_type = config.get("model_type")
    of_type = [f for f in _FAMILIES if f.model_type == model_type]
    if not of_type and model_type in UNMAPPED:
        raise ModelConfigError(
            f"config.json has model_type {model_type!r}: {UNMAPPED[model_type]}, which parallel_bridge does not map "
            f"yet; refused rather than converted wrong"
        )
    if not of_type:
        known = sorted({f.model_type for f in _FAMILIES})
        raise ModelConfigError(f"config.json has model_type {model_type!r}; the schema knows {known}")
    matching = [f for f in of_type if f.recognise(config)]
    # the most specific wins: a family that claims fields before the plain one of the same model_type
    matching.sort(key=lambda f: -len(f.hf_claims))
    return matching[0] if matching else of_type[0]


def megatron_claims() -> dict[str, list[Any]]:
    """Megatron argument -> the values some registered family maps (the core refuses them otherwise)."""
    out: dict[str, list[Any]] = {}
    for family in _FAMILIES:
        for name, value in family.megatron_claims.items():
            out.setdefault(name, []).append(value)
    return out


# ------------------------------------------------------------------ the HF config, both directions
_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_factor(config: Mapping[str, Any], refused: list[str]) -> float | None:
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        off = [f"{k}={rope.get(k)}" for k, v in _ROPE_FIXED.items() if rope.get(k) != v]
        if off:
            refused.append(f"rope_scaling {', '.join(off)} (megatron-core's Llama-3.1 scaling fixes {_ROPE_FIXED})")
        return float(rope.get("factor", 8.0))
    if rope_type != "default":
        refused.append(f"rope_type={rope_type!r} (rope scaling other than Llama-3.1's)")
    return None


def config_from_hf(config: Mapping[str, Any]) -> tuple[Family, dict[str, Any]]:
    """(family, GPTConfig fields) of a config.json body; what the family does not compute is refused."""
    family = family_for_hf(config)
    refused = [f"{k}={config[k]!r} ({meaning})" for k, (ok, meaning) in HF_REFUSED.items()
               if k in config and k not in family.hf_claims and config[k] not in ok]
    factor = _rope_factor(config, refused)
    if refused:
        raise ModelConfigError(
            f"this {family.model_type} model uses " + "; ".join(refused)
            + ", which parallel_bridge does not map to megatron-core's GPT; refused rather than converted wrong"
        )
    heads = config.get("num_attention_heads")
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    fields = {
        "num_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "ffn_hidden_size": config.get("intermediate_size"),
        "vocab_size": config.get("vocab_size"),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "rotary_base": float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "kv_channels": config.get("head_dim"),
        "rope_scaling_factor": factor,
    }
    return family, {**fields, **family.from_hf(config)}


def config_to_hf(cfg: GPTConfig, architecture: str | None = None) -> dict[str, Any]:
    """The Hugging Face config.json body of ``cfg``'s family (``architecture`` overrides the class name)."""
    family = family_of(cfg)
    body: dict[str, Any] = {
        "architectures": [architecture or family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": float(cfg.rotary_base),
        "rms_norm_eps": float(cfg.norm_epsilon),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **family.to_hf(cfg),
    }
    if cfg.rope_scaling_factor is not None:
        body["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **_ROPE_FIXED,
                                "rope_theta": float(cfg.rotary_base)}
    return body


# ------------------------------------------------------------------ the built-in families
def _no_biases(cfg: GPTConfig) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False}


def _qwen2_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ModelConfigError(
            f"kv_channels={cfg.kv_channels} with hidden_size={cfg.hidden_size} and "
            f"num_attention_heads={cfg.num_attention_heads}: Qwen2 derives head_dim from them"
        )
    return {}  # Qwen2 always has QKV biases and never an o_proj bias


LLAMA = register_family(Family("llama", "LlamaForCausalLM", to_hf=_no_biases))
QWEN2 = register_family(Family("qwen2", "Qwen2ForCausalLM", frozenset({"add_qkv_bias"}),
                               from_hf=lambda c: {"add_qkv_bias": True}, to_hf=_qwen2_to_hf))
QWEN3 = register_family(Family("qwen3", "Qwen3ForCausalLM", frozenset({"qk_layernorm"}),
                               from_hf=lambda c: {"qk_layernorm": True}, to_hf=_no_biases))
MISTRAL = register_family(Family(
    "mistral", "MistralForCausalLM", frozenset({"sliding_window"}),
    from_hf=lambda c: {"sliding_window": c.get("sliding_window")},
    to_hf=lambda cfg: {**_no_biases(cfg), "sliding_window": cfg.sliding_window},
))

