"""The tensors a model has, declared once per kind, both directions.

Each :class:`TensorKind` says: the megatron-core name (local spec; ``{i}`` the global layer index, ``{e}`` an
expert index where a kind has one), the Hugging Face name(s), the vLLM parameter, how tensor parallelism
shards it (a :class:`~parallel_bridge.spec.sharding.Sharding`), its full shape for a
:class:`~parallel_bridge.spec.model.GPTConfig`, and when the model has it. :data:`LLAMA_CORE` holds the Llama
family's kinds (Qwen2's QKV biases and Qwen3's QK norms are rows there, present when their feature is set);
a family registered with :func:`~parallel_bridge.spec.families.register_family` adds its own. Shape checks,
HF export and import, a serving rank's slices, the hybrid model's shards and the weight sync all derive from
here; a name no kind declares is refused (:class:`~parallel_bridge.errors.UnknownTensorError`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch

from parallel_bridge.errors import CheckpointError, LayoutError, UnknownTensorError
from parallel_bridge.spec import families, sharding


@dataclasses.dataclass(frozen=True)
class TensorKind:
    """One kind of tensor, in every naming and sharding the project meets."""

    megatron: str
    """megatron-core local-spec name; ``{i}`` is the global layer index, ``{e}`` an expert index."""
    hf: tuple[str, ...]
    """Hugging Face name(s): three for grouped QKV (q, k, v), two for gated (gate, up), else one."""
    vllm: str
    """vLLM's parameter (fused: ``qkv_proj``, ``gate_up_proj``)."""
    sharding: sharding.Sharding
    shape: Callable[[Any], tuple[int, ...]]
    """The full tensor's shape for a config."""
    present: Callable[[Any], bool] = lambda spec: True
    """Whether a model of this config has the tensor."""

    def name(self, naming: str, layer: int | None = None, expert: int | None = None) -> str | tuple[str, ...]:
        """The name(s) for ``layer`` (and ``expert``) in ``naming`` (``megatron``, ``hf`` or ``vllm``)."""
        value = getattr(self, naming)
        if isinstance(value, tuple):
            return tuple(v.format(i=layer, e=expert) for v in value)
        return value.format(i=layer, e=expert)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    @property
    def per_expert(self) -> bool:
        """One tensor per expert in megatron-core and Hugging Face (vLLM stacks a layer's experts in one)."""
        return "{e}" in self.megatron


def _qkv_rows(c: Any) -> int:
    return (c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim


def _has(field: str) -> Callable[[Any], bool]:
    return lambda c: bool(getattr(c, field, False))


def _dense(c: Any) -> bool:
    """The dense MLP: every layer of a model without experts (an MoE family's layers have its kinds instead)."""
    return not getattr(c, "num_moe_experts", None)


L, H = "decoder.layers.{i}.", "model.layers.{i}."
"""The per-layer prefixes of megatron-core and Hugging Face names (for rows defined elsewhere too)."""
LLAMA_CORE: tuple[TensorKind, ...] = (
    TensorKind("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "model.embed_tokens.weight",
               sharding.VOCAB, lambda c: (c.padded_vocab_size, c.hidden_size)),
    TensorKind("output_layer.weight", ("lm_head.weight",), "lm_head.weight", sharding.VOCAB,
               lambda c: (c.padded_vocab_size, c.hidden_size), lambda c: not c.tie_embeddings),
    TensorKind("decoder.final_layernorm.weight", ("model.norm.weight",), "model.norm.weight", sharding.REPLICATED,
               lambda c: (c.hidden_size,)),
    TensorKind(L + "input_layernorm.weight", (H + "input_layernorm.weight",), H + "input_layernorm.weight",
               sharding.REPLICATED, lambda c: (c.hidden_size,)),
    TensorKind(L + "self_attention.linear_qkv.weight",
               (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
               H + "self_attn.qkv_proj.weight", sharding.GROUPED_QKV, lambda c: (_qkv_rows(c), c.hidden_size)),
    TensorKind(L + "self_attention.linear_qkv.bias",
               (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
               H + "self_attn.qkv_proj.bias", sharding.GROUPED_QKV, lambda c: (_qkv_rows(c),), _has("add_qkv_bias")),
    TensorKind(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",),
               H + "self_attn.q_norm.weight", sharding.REPLICATED, lambda c: (c.head_dim,), _has("qk_layernorm")),
    TensorKind(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",),
               H + "self_attn.k_norm.weight", sharding.REPLICATED, lambda c: (c.head_dim,), _has("qk_layernorm")),
    TensorKind(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",),
               H + "self_attn.o_proj.weight", sharding.ROW, lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    TensorKind(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",),
               H + "post_attention_layernorm.weight", sharding.REPLICATED, lambda c: (c.hidden_size,)),
    TensorKind(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
               H + "mlp.gate_up_proj.weight", sharding.GATED, lambda c: (2 * c.ffn_hidden_size, c.hidden_size), _dense),
    TensorKind(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), H + "mlp.down_proj.weight",
               sharding.ROW, lambda c: (c.hidden_size, c.ffn_hidden_size), _dense),
)
"""Every tensor of a Llama-family GPT (Llama, Qwen2, Qwen3, Mistral), in megatron-core's order."""


def all_kinds() -> tuple[TensorKind, ...]:
    """The core's kinds and those of every registered family."""
    return LLAMA_CORE + tuple(k for f in families.families() for k in f.kinds)


def kinds_of(spec: Any) -> tuple[TensorKind, ...]:
    """The kinds a model of ``spec``'s family may have: the core's and its family's (families may name one
    megatron-core tensor differently on the Hugging Face side: Mixtral's ``block_sparse_moe``)."""
    return LLAMA_CORE + spec.family.kinds


def _pattern(template: str) -> re.Pattern[str]:
    """The template as a regex; a wrapper's prefix (``module.``) is allowed before it."""
    body = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{e}"), r"(?P<e>\d+)")
    return re.compile(r"(?:^|\.)" + body + "$")


class Located(NamedTuple):
    """A tensor name's kind and indices."""

    kind: TensorKind
    layer: int | None
    expert: int | None


_PATTERNS: dict[str, re.Pattern[str]] = {}


def kind_of(megatron_name: str, spec: Any = None) -> Located:
    """The kind of a megatron-core tensor and its layer (and expert) index; a name no kind declares raises
    :class:`UnknownTensorError` naming it (and the family of ``spec``, when given)."""
    for kind in all_kinds() if spec is None else kinds_of(spec):
        pattern = _PATTERNS.setdefault(kind.megatron, _pattern(kind.megatron))
        m = pattern.search(megatron_name)
        if m:
            groups = m.groupdict()
            return Located(kind, _int(groups.get("i")), _int(groups.get("e")))
    where = f"a {spec.family.model_type} GPT" if spec is not None else "any family the schema maps"
    raise UnknownTensorError(
        f"tensor {megatron_name} has no place in {where}: no tensor kind declares it (MoE, MLA, biases the "
        "config does not declare, or another architecture?); refused rather than guessed"
    )


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def sharding_of(megatron_name: str) -> sharding.Sharding:
    """How tensor parallelism shards the tensor ``megatron_name`` (an unknown name raises)."""
    return kind_of(megatron_name).kind.sharding


def tensors(spec: Any) -> Iterator[tuple[str, TensorKind, int | None]]:
    """Every (megatron name, kind, layer) a model of ``spec`` has, in megatron-core's order (an expert kind once
    per expert, in expert order)."""
    for kind in kinds_of(spec):
        if not kind.present(spec):
            continue
        if kind.per_layer:
            for i in range(spec.num_layers):
                for e in range(spec.num_moe_experts) if kind.per_expert else (None,):
                    yield kind.name("megatron", i, e), kind, i
        else:
            yield kind.megatron, kind, None


def expected_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model and its full shape, under megatron-core names."""
    return {name: kind.shape(spec) for name, kind, _ in tensors(spec)}


def to_hf(name: str, tensor: torch.Tensor, spec: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of one full megatron-core tensor (vocabulary padding dropped)."""
    kind, layer, expert = kind_of(name, spec)
    yield from zip(kind.name("hf", layer, expert), kind.sharding.to_hf(name, tensor, spec), strict=True)


def hf_shapes(kind: TensorKind, spec: Any) -> list[tuple[int, ...]]:
    """The shapes of the kind's Hugging Face parts (in ``kind.hf`` order; the vocabulary unpadded)."""
    return kind.sharding.hf_shapes(kind.shape(spec), spec)


def from_hf(
    kind: TensorKind, layer: int | None, parts: list[torch.Tensor], spec: Any, expert: int | None = None
) -> torch.Tensor:
    """The full megatron-core tensor of ``kind`` (for ``layer`` and ``expert``) from its Hugging Face parts (in
    ``kind.hf`` order), the vocabulary padded with zero rows to ``padded_vocab_size``."""
    name = kind.name("megatron", layer, expert)
    full = kind.sharding.from_hf(name, parts, spec)
    expected = kind.shape(spec)
    if tuple(full.shape) != expected:
        raise CheckpointError(
            f"tensor {name} built from {list(kind.name('hf', layer, expert))} has shape {tuple(full.shape)}, but "
            f"config.json implies {expected}"
        )
    return full


# ------------------------------------------------------------------ layers across pipeline stages
_LAYER = re.compile(r"^(?P<prefix>.*?layers\.)(?P<index>\d+)(?P<rest>\..*)$")


def layer_offset(num_layers: int, pp: int, pp_rank: int) -> int:
    """Index of the first transformer layer on pipeline stage ``pp_rank`` (even split)."""
    if num_layers % pp:
        raise LayoutError(f"pipeline size {pp} does not divide num_layers={num_layers}")
    return pp_rank * (num_layers // pp)


def layer_of(name: str) -> int | None:
    """The layer index in a (local or global) per-layer name, else None."""
    m = _LAYER.match(name)
    return None if m is None else int(m["index"])


def global_name(name: str, offset: int) -> str:
    """A stage-local name (``decoder.layers.0...``) with the layer index made global."""
    m = _LAYER.match(name)
    return name if m is None else f"{m['prefix']}{int(m['index']) + offset}{m['rest']}"


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s part of the full tensor ``name`` (its kind's :meth:`Sharding.shard`)."""
    return sharding_of(name).shard(name, full, tp, rank)


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor ``name`` from its TP shards (its kind's :meth:`Sharding.merge`)."""
    return sharding_of(name).merge(name, shards)


_MOE_TENSOR = re.compile(r"\.mlp\.(experts|router|shared_experts)\.")
_EXPERT_INDEX = re.compile(r"local_experts\.(\d+)\.|\.weight(\d+)$")


def moe_tensors(names: Iterable[str]) -> tuple[list[str], int]:
    """megatron-core's MoE tensors among ``names`` (router, experts, shared experts: SequentialMLP's
    ``local_experts.{e}``, TEGroupedMLP's ``weight{e}`` or stacked) and how many distinct experts they index (0:
    none indexed)."""
    moe = [n for n in names if _MOE_TENSOR.search(n)]
    return moe, len({m[1] or m[2] for n in moe if (m := _EXPERT_INDEX.search(n))})
