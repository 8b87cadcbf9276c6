"""The model's specification: :class:`GPTConfig`, the one model config of the project.

A megatron-core GPT of a Llama-like family, as training, checkpoints, serving and the weight sync all see it.
Each conversion is written once, here: from Megatron-LM's ``args`` or the side file and from a megatron-core
``TransformerConfig`` or ``GPTModel`` (every argument read through :mod:`~parallel_bridge.spec.megatron_args`'s
classification), from and to a Hugging Face config of its family (:mod:`~parallel_bridge.spec.families`' rows), and to the keyword arguments of megatron-core's ``TransformerConfig``
and ``GPTModel`` (:meth:`GPTConfig.megatron_config`, :meth:`GPTConfig.megatron_model`). The tensors it
implies are :mod:`parallel_bridge.spec.schema`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from parallel_bridge.errors import ModelConfigError
from parallel_bridge.spec import (
    families,
    megatron_fields,
    moe,  # noqa: F401 - registers the MoE families with their tensor kinds
)
from parallel_bridge.spec import megatron_args as margs

CONFIG_FILE = "megatron_gpt_config.json"
"""Model configuration beside a checkpoint that carries none (megatron-core-only saves)."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The sizes and features of a Llama-like megatron-core GPT."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    """Real vocabulary rows (the tokenizer's)."""
    padded_vocab_size: int | None = None
    """Rows the embedding and output layer store, padding included (None: ``vocab_size``)."""
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
    num_moe_experts: int | None = None
    """Experts of every MLP (None: a dense model). Each layer's MLP is then megatron-core's MoE layer: a
    router (``[experts, hidden]``, no bias) choosing ``moe_router_topk`` experts per token, each a SwiGLU MLP
    of ``moe_ffn_hidden_size`` columns."""
    moe_router_topk: int | None = None
    """Experts each token is routed to (MoE only)."""
    moe_ffn_hidden_size: int | None = None
    """Each expert's FFN columns (None: ``ffn_hidden_size``, as megatron-core defaults)."""
    moe_router_pre_softmax: bool = False
    """The softmax over all experts before the top-k, weights not renormalised (Qwen3-MoE's
    ``norm_topk_prob=False``); False: a softmax over the chosen k (Mixtral; ``norm_topk_prob=True``)."""

    def __post_init__(self) -> None:
        """Types and ranges of every field, named, before anything reads a tensor with them."""
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name))
        h, heads, groups = self.hidden_size, self.num_attention_heads, self.num_query_groups
        if heads % groups:
            raise ModelConfigError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
        if self.kv_channels is None and h % heads:
            raise ModelConfigError(f"hidden_size={h} is not a multiple of num_attention_heads={heads}; give kv_channels")
        self._check_moe()
        if self.vocab_size > self.padded_vocab_size:
            raise ModelConfigError(
                f"vocab_size={self.vocab_size} is larger than padded_vocab_size={self.padded_vocab_size}: "
                f"the checkpoint stores only {self.padded_vocab_size} vocabulary rows"
            )

    def _check_moe(self) -> None:
        experts, topk = self.num_moe_experts, self.moe_router_topk
        if experts is None:
            extra = [n for n in ("moe_router_topk", "moe_ffn_hidden_size") if getattr(self, n) is not None]
            extra += ["moe_router_pre_softmax"] if self.moe_router_pre_softmax else []
            if extra:
                raise ModelConfigError(f"{', '.join(extra)} set on a dense model (num_moe_experts is not set)")
        elif topk is None or topk > experts:
            raise ModelConfigError(
                f"moe_router_topk={topk} with num_moe_experts={experts}: an MoE model routes each token to "
                f"between 1 and num_moe_experts experts"
            )

    @property
    def expert_ffn(self) -> int:
        """Each expert's FFN columns (MoE) or the dense MLP's."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with ``changes`` (checked like any config)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ Megatron side
    @classmethod
    def from_args(cls, args: Any, overrides: Mapping[str, Any] | None = None) -> GPTConfig:
        """From a Megatron-LM ``args`` namespace or a dict (the side file), then ``overrides``; arguments that
        change the math away from the families the schema maps are refused by name."""
        return config_from_args(cls, args, overrides)

    @classmethod
    def from_megatron(cls, config: Any, **model: Any) -> GPTConfig:
        """From a megatron-core ``TransformerConfig`` and the ``GPTModel`` arguments it does not hold
        (``vocab_size``, ``padded_vocab_size``, ``max_position_embeddings``, ``tie_embeddings``,
        ``rotary_base``, ``rope_scaling_factor``)."""
        return config_from_transformer_config(cls, config, **model)

    @classmethod
    def of_model(cls, model: Any, vocab_size: int | None = None) -> GPTConfig:
        """The spec of a built model: a megatron-core ``GPTModel`` (unwrapped), or any model with a ``spec``
        attribute (the project's HybridLlama). ``vocab_size``: real rows, when fewer than the model's."""
        return config_of_model(cls, model, vocab_size)

    def megatron_config(self) -> dict[str, Any]:
        """Keyword arguments of megatron-core's ``TransformerConfig`` for this model (parallel degrees and
        training settings come from the caller)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "ffn_hidden_size": self.ffn_hidden_size,
            "kv_channels": self.head_dim,
            "layernorm_epsilon": self.norm_epsilon,
            "add_bias_linear": self.add_bias_linear,
            "add_qkv_bias": self.add_qkv_bias,
            "qk_layernorm": self.qk_layernorm,
            "window_size": None if self.sliding_window is None else (self.sliding_window - 1, 0),
            **self._megatron_moe(),
        }

    def _megatron_moe(self) -> dict[str, Any]:
        """The MoE fields of ``TransformerConfig`` (none for a dense model): routing as the config says, every
        token kept (no capacity), no auxiliary losses in the forward."""
        if self.num_moe_experts is None:
            return {}
        return {
            "num_moe_experts": self.num_moe_experts,
            "moe_router_topk": self.moe_router_topk,
            "moe_ffn_hidden_size": self.expert_ffn,
            "moe_router_pre_softmax": self.moe_router_pre_softmax,
            "moe_token_dispatcher_type": "allgather",
            "moe_grouped_gemm": False,
        }

    def megatron_model(self) -> dict[str, Any]:
        """Keyword arguments of megatron-core's ``GPTModel`` for this model (besides its config)."""
        return {
            "vocab_size": self.padded_vocab_size,
            "max_sequence_length": self.max_position_embeddings,
            "share_embeddings_and_output_weights": self.tie_embeddings,
            "rotary_base": self.rotary_base,
            "rope_scaling_factor": self.rope_scaling_factor,
        }

    # ------------------------------------------------------------ Hugging Face side
    @classmethod
    def from_hf(cls, config: Any, padded_vocab_size: int | None = None) -> GPTConfig:
        """From a Hugging Face config (a config.json body, or a transformers config object) of a family the
        schema knows; anything that family computes and megatron-core's GPT cannot is refused by name."""
        body = config if isinstance(config, Mapping) else config.to_dict()
        _, fields = families.config_from_hf(body)
        cfg = cls(**fields, padded_vocab_size=padded_vocab_size)
        cfg.check_supported()  # fields the family reads may combine into what no family computes
        return cfg

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """The Hugging Face config.json body of this model's family (``architecture`` overrides the class)."""
        return families.config_to_hf(self, architecture)

    @property
    def family(self) -> families.Family:
        """The family that computes this model (:func:`parallel_bridge.spec.families.family_of`)."""
        return families.family_of(self)

    def check_supported(self, refused: list[str] | None = None) -> None:
        """Raise for features no registered family maps, naming each argument at fault."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        problems = [*(refused or []), *margs.refused_features(lambda k, d: own.get(k, d))]
        if problems:
            raise ModelConfigError(
                "this model is not a Llama-family GPT the mapping knows: "
                + "; ".join(dict.fromkeys(problems))
                + ". Serving it as one would give wrong numbers, so it is refused"
            )
        unmapped = self.family.refuses(self)  # a combination of features no family computes is refused too
        if unmapped:
            raise ModelConfigError(f"this {self.family.model_type} model uses {'; '.join(unmapped)}; refused")


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
        raise ModelConfigError(f"{what} {name}={value!r} must be {want}")


_HINTS = typing.get_type_hints(GPTConfig)
_FIELD_TYPES = {n: next(t for t in typing.get_args(h) or (h,) if t is not type(None)) for n, h in _HINTS.items()}
"""Each field's type, from GPTConfig's annotations (``int | None`` is int)."""
_OPTIONAL = frozenset(n for n, h in _HINTS.items() if type(None) in typing.get_args(h))


# ------------------------------------------------------------------ the Megatron side, written once
# (fields by Megatron name: spec/megatron_fields.py)
def _check_keys(cls: type[GPTConfig], args: Any, overrides: Mapping[str, Any] | None) -> None:
    """Refuse overrides that are not a mapping of known fields, and side-file keys no table classifies."""
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


def args_fields(args: Any) -> tuple[dict[str, Any], list[str]]:
    """GPTConfig fields a Megatron-LM ``args`` namespace (or a side-file dict) states, and the features it turns
    on that no family maps (``name=value (meaning)``, refused once the config is built)."""
    _check_keys(GPTConfig, args, None)
    get = megatron_fields.getter(args)
    return megatron_fields.fields_of_args(get), margs.refused_features(get)


def build_config(
    cls: type[GPTConfig], fields: Mapping[str, Any], refused: list[str], overrides: Mapping[str, Any] | None = None
) -> GPTConfig:
    """A checked GPTConfig from ``fields`` then ``overrides``; a refused feature an override sets is settled."""
    _check_keys(cls, {}, overrides)
    values = {**fields, **(overrides or {})}
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size") if values.get(k) is None]
    if missing:
        raise ModelConfigError(f"the model configuration lacks {missing}; give them as overrides or in {CONFIG_FILE}")
    cfg = cls(**values)
    cfg.check_supported([r for r in refused if r.split("=")[0] not in (overrides or {})])
    return cfg


def config_from_args(cls: type[GPTConfig], args: Any, overrides: Mapping[str, Any] | None = None) -> GPTConfig:
    """:meth:`GPTConfig.from_args`: a Megatron-LM ``args`` namespace or a dict, then ``overrides``."""
    fields, refused = args_fields(args)
    return build_config(cls, fields, refused, overrides)


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
        sliding_window=megatron_fields.sliding_window_of(config.window_size),
        **megatron_fields.moe_fields_of_args(lambda k, d=None: getattr(config, k, d)),
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
