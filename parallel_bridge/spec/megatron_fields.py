"""GPTConfig fields from Megatron's argument names: Megatron-LM's ``args`` (or the side file's own fields) and
megatron-core's ``TransformerConfig``, read once here for :mod:`~parallel_bridge.spec.model`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from parallel_bridge.errors import ModelConfigError

Getter = Callable[..., Any]


def getter(args: Any) -> Getter:
    if isinstance(args, Mapping):
        return lambda k, d=None: args.get(k, d)
    return lambda k, d=None: getattr(args, k, d)


def fields_of_args(get: Getter) -> dict[str, Any]:
    """GPTConfig fields from Megatron-LM's argument names (or the side file's own)."""
    heads = get("num_attention_heads")
    groups = get("num_query_groups") if get("group_query_attention", get("num_query_groups") is not None) else None
    hidden = get("hidden_size")
    window = get("window_size")
    return {
        "num_layers": get("num_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": groups or heads,
        "ffn_hidden_size": get("ffn_hidden_size") or (4 * hidden if isinstance(hidden, int) else None),
        "padded_vocab_size": get("padded_vocab_size") or get("vocab_size"),
        "vocab_size": get("true_vocab_size") or get("vocab_size") or get("padded_vocab_size"),
        "max_position_embeddings": get("max_position_embeddings") or get("seq_length") or 4096,
        "rotary_base": get("rotary_base", 10000.0) or 10000.0,
        "norm_epsilon": get("norm_epsilon", get("layernorm_epsilon", 1e-5)) or 1e-5,
        "tie_embeddings": not get("untie_embeddings_and_output_weights", not get("tie_embeddings", False)),
        "add_bias_linear": bool(get("add_bias_linear", False)),
        "add_qkv_bias": bool(get("add_qkv_bias", get("add_bias_linear", False))),
        "normalization": get("normalization", "RMSNorm") or "RMSNorm",
        "swiglu": bool(get("swiglu", get("gated_linear_unit", True))),
        "position_embedding_type": get("position_embedding_type", "rope") or "rope",
        "kv_channels": get("kv_channels"),
        "qk_layernorm": bool(get("qk_layernorm", False)),
        "rope_scaling_factor": _rope_scaling_factor(get),
        # Megatron-LM's window_size, or the side file's own field
        "sliding_window": sliding_window_of(window) if window is not None else get("sliding_window"),
        **moe_fields_of_args(get),
    }


def moe_fields_of_args(get: Getter) -> dict[str, Any]:
    """The MoE fields from Megatron-LM's ``num_experts`` (``num_moe_experts`` in megatron-core and the side
    file); Megatron-LM's MoE defaults (top-2, a softmax over the chosen) where an MoE model leaves them out."""
    experts = get("num_moe_experts") or get("num_experts")
    if not experts:
        return {}
    return {
        "num_moe_experts": experts,
        "moe_router_topk": get("moe_router_topk") or 2,
        "moe_ffn_hidden_size": get("moe_ffn_hidden_size"),
        "moe_router_pre_softmax": bool(get("moe_router_pre_softmax", False)),
    }


def sliding_window_of(window_size: Any) -> int | None:
    """megatron-core's causal ``window_size=(left, 0)`` as the tokens each query sees (left + 1); a window
    that looks ahead (right > 0) is refused."""
    if window_size is None:
        return None
    if not isinstance(window_size, (list, tuple)) or len(window_size) != 2 or window_size[1] != 0:
        raise ModelConfigError(f"window_size={window_size!r}: only causal windows (left, 0) map to a sliding window; refused")
    return int(window_size[0]) + 1


def _rope_scaling_factor(get: Getter) -> float | None:
    """Megatron-LM's ``use_rope_scaling`` (or ``rope_scaling``) switches ``rope_scaling_factor`` (default 8) on;
    the side file holds the factor itself (None: no scaling)."""
    switched = get("use_rope_scaling", get("rope_scaling", None))
    factor = get("rope_scaling_factor", None)
    if switched is None:
        return factor
    return float(factor or 8.0) if switched else None
