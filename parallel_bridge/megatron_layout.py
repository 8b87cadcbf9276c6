"""How megatron-core's GPT tensors are split across tensor-parallel ranks and pipeline stages.

Verified against megatron-core 0.16.1's layers (see tests/test_megatron_adapter.py,
which moves a GPTModel's weights between TP sizes with these functions and
checks the loss is unchanged):
- column-parallel (split on dim 0): ``embedding.word_embeddings``, ``output_layer``,
  ``linear_qkv`` (rows grouped per query group, so a chunk holds whole groups);
- gated ``linear_fc1`` (SwiGLU): each rank holds ``[gate_shard ; up_shard]``, so the
  full tensor ``[gate ; up]`` is split half by half;
- row-parallel (split on dim 1): ``linear_proj``, ``linear_fc2`` weights;
- replicated: norms, row-parallel biases.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch

SplitKind = Literal["column", "glu", "row", "replicated"]

_LAYER = re.compile(r"^(?P<prefix>.*?layers\.)(?P<index>\d+)(?P<rest>\..*)$")


def split_kind(name: str, gated_linear_unit: bool = True) -> SplitKind:
    """How the tensor called ``name`` is divided across tensor-parallel ranks."""
    if name.endswith("layer_norm_weight") or name.endswith("layer_norm_bias") or "layernorm" in name:
        return "replicated"
    if "linear_fc1." in name:
        return "glu" if gated_linear_unit else "column"
    if "word_embeddings." in name or "output_layer." in name or "linear_qkv." in name:
        return "column"
    if "linear_proj." in name or "linear_fc2." in name:
        return "row" if name.endswith(".weight") else "replicated"
    return "replicated"


def shard(name: str, full: torch.Tensor, tp: int, rank: int, gated_linear_unit: bool = True) -> torch.Tensor:
    """This TP rank's part of the full tensor ``name``."""
    kind = split_kind(name, gated_linear_unit)
    if kind == "replicated" or tp == 1:
        return full
    if kind == "row":
        return _chunk(name, full, tp, dim=1)[rank]
    if kind == "column":
        return _chunk(name, full, tp, dim=0)[rank]
    gate, up = _chunk(name, full, 2, dim=0)
    return torch.cat([_chunk(name, gate, tp, 0)[rank], _chunk(name, up, tp, 0)[rank]], dim=0)


def merge(name: str, shards: Sequence[torch.Tensor], gated_linear_unit: bool = True) -> torch.Tensor:
    """The full tensor ``name`` from its TP shards (rank order)."""
    kind = split_kind(name, gated_linear_unit)
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "row":
        return torch.cat(list(shards), dim=1)
    if kind == "column":
        return torch.cat(list(shards), dim=0)
    halves = [_chunk(name, s, 2, 0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def _chunk(name: str, t: torch.Tensor, parts: int, dim: int) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % parts:
        raise ValueError(
            f"tensor {name} of shape {tuple(t.shape)} cannot be split in {parts} along dim {dim}"
        )
    return torch.chunk(t, parts, dim=dim)


def layer_offset(num_layers: int, pp: int, pp_rank: int) -> int:
    """Index of the first transformer layer on pipeline stage ``pp_rank`` (even split)."""
    if num_layers % pp:
        raise ValueError(f"pipeline size {pp} does not divide num_layers={num_layers}")
    return pp_rank * (num_layers // pp)


def to_global_name(name: str, offset: int) -> str:
    """A stage-local name (``decoder.layers.0...``) with the layer index made global."""
    m = _LAYER.match(name)
    return name if m is None else f"{m['prefix']}{int(m['index']) + offset}{m['rest']}"


def qkv_shard(
    name: str, full: torch.Tensor, num_heads: int, num_groups: int, head_dim: int, tp: int, rank: int
) -> torch.Tensor:
    """This rank's rows of a grouped ``linear_qkv`` tensor, kv groups replicated when fewer than tp.

    With ``num_groups >= tp`` this is the plain column split (whole groups per
    rank). With fewer groups than ranks (which Megatron cannot train, but vLLM
    serves by replicating kv heads), each rank keeps one group's k and v and its
    own slice of that group's query heads, still in grouped order.
    """
    per = num_heads // num_groups
    rows = num_groups * (per + 2) * head_dim
    if full.shape[0] != rows:
        raise ValueError(
            f"tensor {name} has {full.shape[0]} rows, but {num_heads} heads in {num_groups} query groups "
            f"of head_dim {head_dim} need {rows}"
        )
    if num_groups >= tp:
        return _chunk(name, full, tp, dim=0)[rank]
    grouped = full.view(num_groups, per + 2, head_dim, *full.shape[1:])
    sharing = tp // num_groups
    group, j = rank // sharing, rank % sharing
    q_local = per // sharing
    q = grouped[group, j * q_local : (j + 1) * q_local]
    kv = grouped[group, per:]
    return torch.cat([q, kv], dim=0).reshape(-1, *full.shape[1:])


def split_dim(kind: SplitKind) -> int | None:
    """The dimension TP splits a tensor of this kind along (None: replicated)."""
    return {"column": 0, "glu": 0, "row": 1}.get(kind)


def shard_pieces(kind: SplitKind, local_len: int, tp: int, start: int, length: int) -> list[tuple[int, int, int]]:
    """The TP shards' pieces that make up entries ``[start, start + length)`` of the full tensor
    along its split dimension, in order: ``(shard, local_start, length)``.

    Column and row splits are contiguous per rank; a gated ``[gate ; up]`` tensor
    has each rank's gate rows in the first half and its up rows in the second.
    """
    if kind == "glu":
        if local_len % 2:
            raise ValueError(f"a gated shard of {local_len} rows cannot hold equal gate and up halves")
        half = local_len // 2
        segments = [(t * half, half, t, 0) for t in range(tp)]
        segments += [(tp * half + t * half, half, t, half) for t in range(tp)]
    else:
        segments = [(t * local_len, local_len, t, 0) for t in range(tp)]
    out = []
    for full_start, n, shard, local_start in segments:
        a, b = max(start, full_start), min(start + length, full_start + n)
        if a < b:
            out.append((shard, local_start + a - full_start, b - a))
    return out
