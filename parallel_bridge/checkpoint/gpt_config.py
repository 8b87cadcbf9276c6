"""The shape of a Llama-family megatron-core GPT as checkpoint readers, exporters and the weight sync
see it: :class:`GPTConfig` (read from Megatron-LM's ``args`` or the side file) and the full shape of
every tensor it implies (:func:`expected_shapes`)."""

from __future__ import annotations

import dataclasses
from typing import Any

CONFIG_FILE = "megatron_gpt_config.json"
"""Model configuration beside a checkpoint that carries none (megatron-core-only saves)."""


class CheckpointError(ValueError):
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

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_args(cls, args: Any, overrides: dict[str, Any] | None = None) -> GPTConfig:
        """From a Megatron-LM ``args`` namespace or dict, then ``overrides``."""
        get = (
            (lambda k, d=None: args.get(k, d))
            if isinstance(args, dict)
            else (lambda k, d=None: getattr(args, k, d))
        )
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
            or (4 * get("hidden_size") if get("hidden_size") else None),
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
        }
        values.update(overrides or {})
        missing = [
            k
            for k in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
            if not values.get(k)
        ]
        if missing:
            raise CheckpointError(
                f"the model configuration lacks {missing}; give them as overrides or in {CONFIG_FILE}"
            )
        values["padded_vocab_size"] = values["padded_vocab_size"] or values["vocab_size"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        cfg.check_supported()
        return cfg

    def check_supported(self) -> None:
        """Raise for architectures the Llama mapping does not cover (it names what is unsupported)."""
        problems = []
        if self.normalization != "RMSNorm":
            problems.append(f"normalization={self.normalization} (needs RMSNorm)")
        if not self.swiglu:
            problems.append("a non-gated MLP (needs SwiGLU)")
        if self.position_embedding_type != "rope":
            problems.append(f"position_embedding_type={self.position_embedding_type} (needs rope)")
        if self.add_bias_linear:
            problems.append("biases on linear layers")
        if problems:
            raise CheckpointError(
                "this checkpoint's architecture is not a Llama-family GPT the mapping knows: "
                + "; ".join(problems)
            )

    def to_hf_llama(self, architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
        """A Hugging Face LlamaConfig body for this model."""
        return {
            "architectures": [architecture],
            "model_type": "llama",
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
            "attention_bias": self.add_qkv_bias,
            "mlp_bias": False,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama-family megatron-core GPT and its full shape (local-spec names)."""
    d, heads, groups, h = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, cfg.hidden_size
    expected = {
        "embedding.word_embeddings.weight": (cfg.padded_vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
    }
    if not cfg.tie_embeddings:
        expected["output_layer.weight"] = (cfg.padded_vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        expected.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attention.linear_qkv.weight": ((heads + 2 * groups) * d, h),
                p + "self_attention.linear_proj.weight": (h, heads * d),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
                p + "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
            }
        )
    return expected
