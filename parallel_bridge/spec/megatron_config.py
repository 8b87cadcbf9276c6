"""GPTConfig from the Megatron side, written once: Megatron-LM's ``args`` (or the side file), a megatron-core
``TransformerConfig`` with the ``GPTModel`` arguments it lacks, and a built ``GPTModel``. Every argument is
read through :mod:`parallel_bridge.spec.megatron_args`'s classification, so one that changes the math away
from the families the schema maps is refused by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from parallel_bridge.errors import ModelConfigError
from parallel_bridge.spec import megatron_args as margs

if TYPE_CHECKING:
    from parallel_bridge.spec.model import GPTConfig

Getter = Callable[..., Any]


def _getter(args: Any) -> Getter:
    if isinstance(args, Mapping):
        return lambda k, d=None: args.get(k, d)
    return lambda k, d=None: getattr(args, k, d)


def _check_keys(cls: type[GPTConfig], args: Any, overrides: Mapping[str, Any] | None) -> None:
    """Refuse overrides that are not a mapping of known fields, and side-file keys no table classifies."""
    from parallel_bridge.spec.model import check_field

    known = {f.name for f in dataclasses.fields(cls)}
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ModelConfigError(f"config overrides must be a JSON object of field: value, got {type(overrides).__name__}")
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ModelConfigError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
    if isinstance(args, Mapping):
        strange = sorted(set(args) - known - margs.MAPPED - margs.NO_MATH - set(margs.NEUTRAL))
        if strange:
            raise ModelConfigError(
                f"unknown model configuration keys {strange}: parallel_bridge does not know whether they "
                f"change the math; known: {sorted(known)}"
            )
        for name in known & set(args):
            check_field(name, args[name])
    for name, value in (overrides or {}).items():
        check_field(name, value, "override")


def _fields_of_args(get: Getter) -> dict[str, Any]:
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
    }


def config_from_args(cls: type[GPTConfig], args: Any, overrides: Mapping[str, Any] | None = None) -> GPTConfig:
    """:meth:`GPTConfig.from_args`: a Megatron-LM ``args`` namespace or a dict, then ``overrides``."""
    from parallel_bridge.spec.model import CONFIG_FILE

    _check_keys(cls, args, overrides)
    get = _getter(args)
    values = {**_fields_of_args(get), **(overrides or {})}
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size") if values.get(k) is None]
    if missing:
        raise ModelConfigError(f"the model configuration lacks {missing}; give them as overrides or in {CONFIG_FILE}")
    refused = [r for r in margs.refused_features(get) if r.split("=")[0] not in (overrides or {})]
    cfg = cls(**values)
    cfg.check_supported(refused)
    return cfg


def config_from_transformer_config(
    cls: type[GPTConfig],
    config: Any,
    *,
    vocab_size: int,
    padded_vocab_size: int,
    max_position_embeddings: int,
    tie_embeddings: bool,
    rotary_base: float = 10000.0,
    rope_scaling_factor: float | None = None,
) -> GPTConfig:
    """:meth:`GPTConfig.from_megatron`: a megatron-core ``TransformerConfig`` and the model's vocabulary,
    context and rope settings, which the config does not hold."""
    return cls(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size,
        max_position_embeddings=max_position_embeddings,
        rotary_base=rotary_base,
        norm_epsilon=config.layernorm_epsilon,
        tie_embeddings=tie_embeddings,
        add_bias_linear=config.add_bias_linear,
        add_qkv_bias=getattr(config, "add_qkv_bias", config.add_bias_linear),
        normalization=config.normalization,
        swiglu=config.gated_linear_unit,
        kv_channels=config.kv_channels,
        qk_layernorm=bool(config.qk_layernorm),
        rope_scaling_factor=rope_scaling_factor,
        sliding_window=sliding_window_of(config.window_size),
    )


def config_of_model(cls: type[GPTConfig], model: Any, vocab_size: int | None = None) -> GPTConfig:
    """:meth:`GPTConfig.of_model`: a built megatron-core ``GPTModel``, or a model carrying its ``spec``."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, cls):
        return spec if vocab_size is None else spec.replace(vocab_size=vocab_size)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "vocab_size"):
        raise ModelConfigError(
            f"{type(model).__name__} is neither a megatron-core GPTModel nor a model with a GPTConfig spec; pass "
            "config= (a parallel_bridge GPTConfig) to describe it"
        )
    if getattr(model, "rotary_scaling", False):
        raise ModelConfigError(
            "the GPTModel uses rope scaling, whose factor megatron-core does not keep on the model; pass "
            "config=GPTConfig(..., rope_scaling_factor=F) to describe it"
        )
    attrs = {"position_embedding_type": getattr(model, "position_embedding_type", "rope")}
    changed = margs.refused_features(lambda k, d: attrs[k] if k in attrs else getattr(config, k, d))
    changed += margs.unclassified_changes(config)
    if changed:
        raise ModelConfigError(
            f"the model uses {', '.join(changed)}, which no family parallel_bridge maps computes; syncing or "
            "saving it as one would serve different numbers, so it is refused"
        )
    return config_from_transformer_config(
        cls, config, vocab_size=vocab_size or model.vocab_size, padded_vocab_size=model.vocab_size,
        max_position_embeddings=model.max_sequence_length, tie_embeddings=model.share_embeddings_and_output_weights,
        rotary_base=getattr(model, "rotary_base", 10000.0),
    )


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
