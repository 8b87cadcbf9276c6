"""One declarative tensor schema for the Llama family of megatron-core GPT models, both directions.

Each :class:`TensorKind` says, once: the megatron-core name (local spec, global layer index ``{i}``), the
Hugging Face name(s), the vLLM parameter, how tensor parallelism splits it (:class:`Split`), its full
shape as a function of the model config, and when the model has it. Shape checks, HF export and import,
a serving rank's slices for vLLM, the hybrid model's shards and the weight sync all derive from
:data:`LLAMA_FAMILY`; :class:`GroupedQKV` is the one grouped-QKV layout (split, merge, a rank's rows).

Families covered: Llama 2/3 (Llama-3.1 rope scaling is config, not tensors), Qwen2/2.5 (QKV biases),
Qwen3 (QK layernorm), Mistral (sliding window is config). The config object is duck-typed: it needs
``num_layers, hidden_size, num_attention_heads, num_query_groups, head_dim, ffn_hidden_size,
padded_vocab_size, vocab_size, tie_embeddings``, and optionally ``add_qkv_bias, qk_layernorm``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

import torch


class Split(StrEnum):
    """How tensor parallelism divides a tensor."""

    REPLICATED = "replicated"
    COLUMN = "column"
    """Output rows (dim 0), contiguous per rank."""
    ROW = "row"
    """Input columns (dim 1), contiguous per rank (row-parallel weights)."""
    GLU = "glu"
    """A gated ``[gate ; up]`` on dim 0: each half is split, a rank holds ``[its gate ; its up]``."""
    QKV = "qkv"
    """Grouped ``[q heads ; k ; v]`` rows per query group on dim 0: whole groups per rank."""
    VOCAB = "vocab"
    """Vocabulary rows on dim 0; rows past ``vocab_size`` are padding."""


@dataclasses.dataclass(frozen=True)
class TensorKind:
    """One kind of tensor, in every naming and layout the project meets."""

    megatron: str
    """megatron-core local-spec name; ``{i}`` is the global layer index."""
    hf: tuple[str, ...]
    """Hugging Face name(s): three for QKV (q, k, v), two for GLU (gate, up), else one."""
    vllm: str
    """vLLM's parameter (fused: ``qkv_proj``, ``gate_up_proj``)."""
    split: Split
    shape: Callable[[Any], tuple[int, ...]]
    """The full tensor's shape for a config."""
    present: Callable[[Any], bool] = lambda cfg: True
    """Whether a model of this config has the tensor."""

    def name(self, naming: str, layer: int | None = None) -> str | tuple[str, ...]:
        """The name(s) for ``layer`` in ``naming`` (``megatron``, ``hf`` or ``vllm``)."""
        value = getattr(self, naming)
        if isinstance(value, tuple):
            return tuple(v.format(i=layer) for v in value)
        return value.format(i=layer)


def _qkv_rows(c: Any) -> int:
    return (c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim


def _has(field: str) -> Callable[[Any], bool]:
    return lambda c: bool(getattr(c, field, False))


_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
LLAMA_FAMILY: tuple[TensorKind, ...] = (
    TensorKind(
        "embedding.word_embeddings.weight",
        ("model.embed_tokens.weight",),
        "model.embed_tokens.weight",
        Split.VOCAB,
        lambda c: (c.padded_vocab_size, c.hidden_size),
    ),
    TensorKind(
        "output_layer.weight",
        ("lm_head.weight",),
        "lm_head.weight",
        Split.VOCAB,
        lambda c: (c.padded_vocab_size, c.hidden_size),
        lambda c: not c.tie_embeddings,
    ),
    TensorKind("decoder.final_layernorm.weight", ("model.norm.weight",), "model.norm.weight", Split.REPLICATED,
               lambda c: (c.hidden_size,)),
    TensorKind(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), _H + "input_layernorm.weight",
               Split.REPLICATED, lambda c: (c.hidden_size,)),
    TensorKind(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        _H + "self_attn.qkv_proj.weight",
        Split.QKV,
        lambda c: (_qkv_rows(c), c.hidden_size),
    ),
    TensorKind(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        _H + "self_attn.qkv_proj.bias",
        Split.QKV,
        lambda c: (_qkv_rows(c),),
        _has("add_qkv_bias"),
    ),
    TensorKind(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
               _H + "self_attn.q_norm.weight", Split.REPLICATED, lambda c: (c.head_dim,), _has("qk_layernorm")),
    TensorKind(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
               _H + "self_attn.k_norm.weight", Split.REPLICATED, lambda c: (c.head_dim,), _has("qk_layernorm")),
    TensorKind(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",),
               _H + "self_attn.o_proj.weight", Split.ROW,
               lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    TensorKind(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
               _H + "post_attention_layernorm.weight", Split.REPLICATED, lambda c: (c.hidden_size,)),
    TensorKind(
        _L + "mlp.linear_fc1.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        _H + "mlp.gate_up_proj.weight",
        Split.GLU,
        lambda c: (2 * c.ffn_hidden_size, c.hidden_size),
    ),
    TensorKind(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), _H + "mlp.down_proj.weight",
               Split.ROW, lambda c: (c.hidden_size, c.ffn_hidden_size)),
)
"""Every tensor of a Llama-family GPT (Llama, Qwen2, Qwen3, Mistral), in megatron-core's order."""


def _pattern(template: str) -> re.Pattern[str]:
    """The template as a regex; a wrapper's prefix (``module.``) is allowed before it."""
    return re.compile(r"(?:^|\.)" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_BY_MEGATRON = [(_pattern(k.megatron), k) for k in LLAMA_FAMILY]


class UnknownTensorError(KeyError):
    """A tensor name the schema has no kind for (another architecture)."""

    def __str__(self) -> str:
        return str(self.args[0])


def kind_of(megatron_name: str) -> tuple[TensorKind, int | None]:
    """The kind of a megatron-core tensor and its layer index (None outside the layers)."""
    for pattern, kind in _BY_MEGATRON:
        m = pattern.search(megatron_name)
        if m:
            return kind, int(m[1]) if m.groups() else None
    raise UnknownTensorError(f"tensor {megatron_name} has no place in a Llama-family GPT")


def split_of(megatron_name: str) -> Split:
    """How TP divides the tensor ``megatron_name`` (names outside the schema are replicated: norms' extra
    state, biases of replicated layers)."""
    try:
        return kind_of(megatron_name)[0].split
    except UnknownTensorError:
        return Split.REPLICATED


def tensors(cfg: Any) -> Iterator[tuple[str, TensorKind, int | None]]:
    """Every (megatron name, kind, layer) a model of ``cfg`` has, in megatron-core's order."""
    for kind in LLAMA_FAMILY:
        if not kind.present(cfg):
            continue
        if "{i}" in kind.megatron:
            for i in range(cfg.num_layers):
                yield kind.name("megatron", i), kind, i
        else:
            yield kind.megatron, kind, None


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model and its full shape, under megatron-core names."""
    return {name: kind.shape(cfg) for name, kind, _ in tensors(cfg)}


@dataclasses.dataclass(frozen=True)
class GroupedQKV:
    """megatron-core's grouped QKV rows: per query group ``[q heads of the group ; k ; v]``, each ``head_dim``
    rows. The one place this layout is written."""

    heads: int
    groups: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.groups

    @property
    def rows(self) -> int:
        return self.groups * (self.per_group + 2) * self.head_dim

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.shape[0] != self.rows:
            raise ValueError(
                f"tensor {name} has {tensor.shape[0]} rows, but {self.heads} heads in {self.groups} query groups "
                f"of head_dim {self.head_dim} need {self.rows}"
            )

    def split(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grouped rows -> (q, k, v), each heads-major (Hugging Face's q_proj, k_proj, v_proj)."""
        self._check(name, tensor)
        rest = tensor.shape[1:]
        grouped = tensor.reshape(self.groups, self.per_group + 2, self.head_dim, *rest)
        return (
            grouped[:, : self.per_group].reshape(-1, *rest),
            grouped[:, self.per_group].reshape(-1, *rest),
            grouped[:, self.per_group + 1].reshape(-1, *rest),
        )

    def merge(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(q, k, v), heads-major -> grouped rows (the inverse of :meth:`split`)."""
        rest, d = q.shape[1:], self.head_dim
        parts = (
            q.reshape(self.groups, self.per_group, d, *rest),
            k.reshape(self.groups, 1, d, *rest),
            v.reshape(self.groups, 1, d, *rest),
        )
        return torch.cat(parts, dim=1).reshape(self.rows, *rest)

    def rank_groups(self, tp: int, rank: int) -> tuple[list[int], range]:
        """(kv groups, query heads) TP rank ``rank`` keeps: whole groups when groups >= tp, else one group's
        k and v (replicated over tp / groups ranks) and its share of that group's query heads."""
        if self.groups >= tp:
            per_rank = self.groups // tp
            groups = list(range(rank * per_rank, (rank + 1) * per_rank))
            return groups, range(groups[0] * self.per_group, (groups[-1] + 1) * self.per_group)
        sharing = tp // self.groups
        group, j = rank // sharing, rank % sharing
        q_local = self.per_group // sharing
        start = group * self.per_group + j * q_local
        return [group], range(start, start + q_local)

    def rank_rows(self, tp: int, rank: int, order: str = "grouped") -> list[tuple[int, int]]:
        """Row ranges ``(start, length)`` of the grouped tensor that rank ``rank`` keeps, in ``grouped`` order
        (megatron-core's own shard) or ``qkv`` order (vLLM's ``qkv_proj``: its q heads, then k, then v)."""
        groups, heads = self.rank_groups(tp, rank)
        per, d = self.per_group, self.head_dim

        def q_row(h: int) -> int:
            return ((h // per) * (per + 2) + h % per) * d

        if order == "qkv":
            q = [(q_row(h), d) for h in heads]
            k = [((g * (per + 2) + per) * d, d) for g in groups]
            v = [((g * (per + 2) + per + 1) * d, d) for g in groups]
            return _merge_ranges(q) + _merge_ranges(k) + _merge_ranges(v)
        rows = []
        for g in groups:
            rows += [(q_row(h), d) for h in heads if h // per == g]
            rows.append(((g * (per + 2) + per) * d, 2 * d))  # the group's k and v
        return _merge_ranges(rows)

    def shard(self, name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s rows of the full grouped tensor, in grouped order (kv replicated when fewer
        groups than ranks, which vLLM serves and Megatron cannot train)."""
        self._check(name, full)
        return torch.cat([full[a : a + n] for a, n in self.rank_rows(tp, rank)], dim=0)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, n in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


def qkv_of(cfg: Any) -> GroupedQKV:
    """The grouped-QKV layout of a config."""
    return GroupedQKV(cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim)


def to_hf(name: str, tensor: torch.Tensor, cfg: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of one full megatron-core tensor (vocabulary padding dropped)."""
    kind, layer = kind_of(name)
    names = kind.name("hf", layer)
    if kind.split is Split.QKV:
        yield from zip(names, qkv_of(cfg).split(name, tensor))
    elif kind.split is Split.GLU:
        yield from zip(names, tensor.chunk(2, dim=0))
    elif kind.split is Split.VOCAB:
        if tensor.shape[0] < cfg.vocab_size:
            raise ValueError(f"tensor {name} has {tensor.shape[0]} vocabulary rows, fewer than vocab_size={cfg.vocab_size}")
        yield names[0], tensor[: cfg.vocab_size]
    else:
        yield names[0], tensor


def hf_shapes(kind: TensorKind, cfg: Any) -> list[tuple[int, ...]]:
    """The shapes of the kind's Hugging Face parts (in ``kind.hf`` order; the vocabulary unpadded)."""
    full = kind.shape(cfg)
    rest = full[1:]
    if kind.split is Split.QKV:
        kv = cfg.num_query_groups * cfg.head_dim
        return [(cfg.num_attention_heads * cfg.head_dim, *rest), (kv, *rest), (kv, *rest)]
    if kind.split is Split.GLU:
        return [(full[0] // 2, *rest)] * 2
    if kind.split is Split.VOCAB:
        return [(cfg.vocab_size, *rest)]
    return [full]


def from_hf(kind: TensorKind, layer: int | None, parts: list[torch.Tensor], cfg: Any) -> torch.Tensor:
    """The full megatron-core tensor of ``kind`` from its Hugging Face parts (in ``kind.hf`` order),
    the vocabulary padded with zero rows to ``padded_vocab_size``."""
    if kind.split is Split.QKV:
        full = qkv_of(cfg).merge(*parts)
    elif kind.split is Split.GLU:
        full = torch.cat(parts, dim=0)
    elif kind.split is Split.VOCAB:
        (full,) = parts
        pad = cfg.padded_vocab_size - full.shape[0]
        full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])]) if pad > 0 else full
    else:
        (full,) = parts
    expected = kind.shape(cfg)
    if tuple(full.shape) != expected:
        raise ValueError(
            f"tensor {kind.name('megatron', layer)} built from {list(kind.name('hf', layer))} has shape "
            f"{tuple(full.shape)}, but config.json implies {expected}"
        )
    return full
