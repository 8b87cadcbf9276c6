"""The shape of a Llama-family megatron-core GPT as checkpoint readers, exporters and the weight sync
see it: :class:`GPTConfig`, read from Megatron-LM's ``args`` or the side file, written as the Hugging Face
config of its family (Llama, Qwen2, Qwen3). The tensors it implies are :mod:`parallel_bridge.spec.schema`'s."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from parallel_bridge.errors import BridgeError
from parallel_bridge.spec import megatron_args as ma

CONFIG_FILE = "megatron_gpt_config.json"
"""Model configuration beside a checkpoint that carries none (megatron-core-only saves)."""


class CheckpointError(BridgeError, ValueError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model facts serving needs, from Megatron-LM's ``args`` or the side file."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    normalization: str = "RMSNorm"
    swiglu: bool = True
    position_embedding_type: str = "rope"
    kv_channels: int | None = None
    qk_layernorm: bool = False
    rope_scaling_factor: float | None = None
    """Llama-3.1 rope scaling (megatron-core's: low/high frequency factors 1 and 4, original context 8192)."""
    sliding_window: int | None = None
    """Tokens each query attends to, itself included, on every layer (HF's ``sliding_window``; megatron-core's
    ``window_size=(sliding_window - 1, 0)``)."""

    def __post_init__(self) -> None:
        """Types and ranges of every field, named, before anything reads a tensor with them."""
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name))
        h, heads, groups = self.hidden_size, self.num_attention_heads, self.num_query_groups
        if heads % groups:
            raise CheckpointError(
                f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}"
            )
        if self.kv_channels is None and h % heads:
            raise CheckpointError(
                f"hidden_size={h} is not a multiple of num_attention_heads={heads}; give kv_channels"
            )
        if self.vocab_size > self.padded_vocab_size:
            raise CheckpointError(
                f"vocab_size={self.vocab_size} is larger than padded_vocab_size={self.padded_vocab_size}: "
                f"the checkpoint stores only {self.padded_vocab_size} vocabulary rows"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_args(cls, args: Any, overrides: dict[str, Any] | None = None) -> GPTConfig:
        """From a Megatron-LM ``args`` namespace or a dict (the side file), then ``overrides``.

        Arguments that change the math away from a Llama GPT are refused by name
        (:mod:`~parallel_bridge.spec.megatron_args`); so are keys of a dict or of
        ``overrides`` that no table knows.
        """
        get = (
            (lambda k, d=None: args.get(k, d))
            if isinstance(args, dict)
            else (lambda k, d=None: getattr(args, k, d))
        )
        known = {f.name for f in dataclasses.fields(cls)}
        if overrides is not None and not isinstance(overrides, dict):
            raise CheckpointError(
                f"config overrides must be a JSON object of field: value, got {type(overrides).__name__}"
            )
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise CheckpointError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
        if isinstance(args, dict):
            strange = sorted(set(args) - known - ma.MAPPED - ma.NO_MATH - set(ma.NEUTRAL))
            if strange:
                raise CheckpointError(
                    f"unknown model configuration keys {strange}: parallel_bridge does not know whether they "
                    f"change the math; known: {sorted(known)}"
                )
            for name in known & set(args):
                check_field(name, args[name])
        heads = get("num_attention_heads")
        groups = (
            get("num_query_groups")
            if get("group_query_attention", get("num_query_groups") is not None)
            else None
        )
        values = {
            "num_layers": get("num_layers"),
            "hidden_size": get("hidden_size"),
            "num_attention_heads": heads,
            "num_query_groups": groups or heads,
            "ffn_hidden_size": get("ffn_hidden_size")
            or (4 * get("hidden_size") if isinstance(get("hidden_size"), int) else None),
            "padded_vocab_size": get("padded_vocab_size") or get("vocab_size"),
            "vocab_size": get("true_vocab_size") or get("vocab_size") or get("padded_vocab_size"),
            "max_position_embeddings": get("max_position_embeddings") or get("seq_length") or 4096,
            "rotary_base": get("rotary_base", 10000.0) or 10000.0,
            "norm_epsilon": get("norm_epsilon", get("layernorm_epsilon", 1e-5)) or 1e-5,
            "tie_embeddings": not get(
                "untie_embeddings_and_output_weights", not get("tie_embeddings", False)
            ),
            "add_bias_linear": bool(get("add_bias_linear", False)),
            "add_qkv_bias": bool(get("add_qkv_bias", get("add_bias_linear", False))),
            "normalization": get("normalization", "RMSNorm") or "RMSNorm",
            "swiglu": bool(get("swiglu", get("gated_linear_unit", True))),
            "position_embedding_type": get("position_embedding_type", "rope") or "rope",
            "kv_channels": get("kv_channels"),
            "qk_layernorm": bool(get("qk_layernorm", False)),
            "rope_scaling_factor": _rope_scaling_factor(get),
            "sliding_window": (  # Megatron-LM's window_size, or the side file's own field
                sliding_window_of(get("window_size")) if get("window_size") is not None else get("sliding_window")
            ),
        }
        for name, value in (overrides or {}).items():
            check_field(name, value, "override")
        values.update(overrides or {})
        missing = [
            k
            for k in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
            if values.get(k) is None
        ]
        if missing:
            raise CheckpointError(
                f"the model configuration lacks {missing}; give them as overrides or in {CONFIG_FILE}"
            )
        refused = [r for r in ma.refused_features(get) if r.split("=")[0] not in (overrides or {})]
        cfg = cls(**values)
        cfg.check_supported(refused)
        return cfg

    @classmethod
    def from_hf(cls, config: dict[str, Any], padded_vocab_size: int | None = None) -> GPTConfig:
        """From a Hugging Face config.json body of a family the schema knows (llama, qwen2, qwen3, mistral);
        anything that family computes and megatron-core's GPT cannot is refused by name."""
        model_type = config.get("model_type")
        if model_type not in HF_FAMILIES:
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; the schema knows {sorted(HF_FAMILIES)}"
            )
        heads = config.get("num_attention_heads")
        refused = [f"{k}={config[k]!r} ({meaning})" for k, (ok, meaning) in _HF_REFUSED.items()
                   if k in config and config[k] not in ok]
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        factor = None
        if rope_type == "llama3":
            fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            off = [f"{k}={rope.get(k)}" for k, v in fixed.items() if rope.get(k) != v]
            if off:
                refused.append(f"rope_scaling {', '.join(off)} (megatron-core's Llama-3.1 scaling fixes {fixed})")
            factor = float(rope.get("factor", 8.0))
        elif rope_type != "default":
            refused.append(f"rope_type={rope_type!r} (rope scaling other than Llama-3.1's)")
        if refused:
            raise CheckpointError(
                f"this {model_type} model uses " + "; ".join(refused) + ", which parallel_bridge does not map to megatron-core's GPT; refused rather than converted wrong"
            )
        vocab = config.get("vocab_size")
        return cls(
            num_layers=config.get("num_hidden_layers"),
            hidden_size=config.get("hidden_size"),
            num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            ffn_hidden_size=config.get("intermediate_size"),
            vocab_size=vocab,
            padded_vocab_size=padded_vocab_size or vocab,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rotary_base=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            add_qkv_bias=model_type == "qwen2",
            kv_channels=config.get("head_dim"),
            qk_layernorm=model_type == "qwen3",
            rope_scaling_factor=factor,
            sliding_window=config.get("sliding_window") if model_type == "mistral" else None,
        )

    def check_supported(self, refused: list[str] | None = None) -> None:
        """Raise for architectures the Llama mapping does not cover, naming each argument at fault."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        problems = [*(refused or []), *ma.refused_features(lambda k, d: own.get(k, d))]
        if problems:
            raise CheckpointError(
                "this checkpoint's architecture is not a Llama-family GPT the mapping knows: "
                + "; ".join(dict.fromkeys(problems))
                + ". Serving it as one would give wrong numbers, so it is refused"
            )

    @property
    def family(self) -> tuple[str, str]:
        """(Hugging Face model_type, vLLM architecture) of the family that computes this model."""
        if self.sliding_window is not None:
            if self.qk_layernorm or self.add_qkv_bias:
                raise CheckpointError(
                    f"sliding_window={self.sliding_window} with QK layernorm or QKV biases: no family the schema "
                    "maps computes both"
                )
            return "mistral", "MistralForCausalLM"
        if self.qk_layernorm:
            return "qwen3", "Qwen3ForCausalLM"
        if self.add_qkv_bias:
            return "qwen2", "Qwen2ForCausalLM"
        return "llama", "LlamaForCausalLM"

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """The Hugging Face config.json body of this model's family (``architecture`` overrides the name)."""
        model_type, default = self.family
        if model_type == "qwen2" and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise CheckpointError(
                f"kv_channels={self.kv_channels} with hidden_size={self.hidden_size} and "
                f"num_attention_heads={self.num_attention_heads}: Qwen2 derives head_dim from them"
            )
        body: dict[str, Any] = {
            "architectures": [architecture or default],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": float(self.rotary_base),
            "rms_norm_eps": float(self.norm_epsilon),
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if model_type != "qwen2":  # Qwen2 always has QKV biases and never an o_proj bias
            body.update(attention_bias=self.add_qkv_bias, mlp_bias=False)
        if model_type == "mistral":
            body["sliding_window"] = self.sliding_window
        if self.rope_scaling_factor is not None:
            body["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_theta": float(self.rotary_base),
            }
        return body


HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Hugging Face model types whose tensors the schema maps."""
_HF_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "attention_bias": ((False,), "biases on q, k, v and o projections"),
    "mlp_bias": ((False,), "MLP biases"),
    "hidden_act": (("silu",), "an activation other than SiLU"),
    "partial_rotary_factor": ((1.0, 1), "partial rotary embedding"),
    "use_sliding_window": ((False,), "sliding-window attention"),
}
"""Hugging Face config fields -> (values megatron-core's GPT computes, what another value means)."""


def sliding_window_of(window_size: Any) -> int | None:
    """megatron-core's causal ``window_size=(left, 0)`` as the tokens each query sees (left + 1); a window
    that looks ahead (right > 0) is refused."""
    if window_size is None:
        return None
    if not isinstance(window_size, (list, tuple)) or len(window_size) != 2 or window_size[1] != 0:
        raise CheckpointError(
            f"window_size={window_size!r}: only causal windows (left, 0) map to a sliding window; refused"
        )
    return int(window_size[0]) + 1


def _rope_scaling_factor(get: Any) -> float | None:
    """Megatron-LM's ``use_rope_scaling`` (or ``rope_scaling``) switches ``rope_scaling_factor`` (default 8) on;
    the side file holds the factor itself (None: no scaling)."""
    switched = get("use_rope_scaling", get("rope_scaling", None))
    factor = get("rope_scaling_factor", None)
    if switched is None:
        return factor
    return float(factor or 8.0) if switched else None


def check_field(name: str, value: Any, what: str = "model config field") -> None:
    """Raise naming ``name`` when ``value`` has the wrong type or range for that GPTConfig field."""
    kind = _FIELD_TYPES[name]
    if value is None and name in _OPTIONAL:
        return
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, kind if kind is int else (int, float)) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {bool: "true or false", float: "a positive number", int: "a positive integer"}.get(kind, "a string")
        raise CheckpointError(f"{what} {name}={value!r} must be {want}")


_HINTS = typing.get_type_hints(GPTConfig)
_FIELD_TYPES = {n: next(t for t in typing.get_args(h) or (h,) if t is not type(None)) for n, h in _HINTS.items()}
"""Each field's type, from GPTConfig's annotations (``int | None`` is int)."""
_OPTIONAL = frozenset(n for n, h in _HINTS.items() if type(None) in typing.get_args(h))
