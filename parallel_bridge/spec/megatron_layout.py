"""How megatron-core's GPT tensors are split across tensor-parallel ranks and pipeline stages: shard, merge,
and the pieces of a slice, for the split each tensor kind has in :mod:`parallel_bridge.spec.schema`.

Verified against megatron-core 0.16.1's layers (see tests/test_megatron_adapter.py, which moves a
GPTModel's weights between TP sizes with these functions and checks the loss is unchanged). A gated
``linear_fc1`` rank holds ``[gate_shard ; up_shard]``; a grouped ``linear_qkv`` rank holds whole query
groups (kv replication for serving is :meth:`parallel_bridge.spec.schema.GroupedQKV.shard`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch

from parallel_bridge.spec.schema import Split, split_of

SplitKind = Literal["column", "glu", "row", "replicated"]

_LAYER = re.compile(r"^(?P<prefix>.*?layers\.)(?P<index>\d+)(?P<rest>\..*)$")
_KINDS: dict[Split, SplitKind] = {
    Split.COLUMN: "column",
    Split.QKV: "column",
    Split.VOCAB: "column",
    Split.GLU: "glu",
    Split.ROW: "row",
    Split.REPLICATED: "replicated",
}


def split_kind(name: str) -> SplitKind:
    """How the tensor called ``name`` is divided across tensor-parallel ranks (from the schema)."""
    return _KINDS[split_of(name)]


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of the full tensor ``name``."""
    kind = split_kind(name)
    if kind == "replicated" or tp == 1:
        return full
    if kind == "row":
        return _chunk(name, full, tp, dim=1)[rank]
    if kind == "column":
        return _chunk(name, full, tp, dim=0)[rank]
    gate, up = _chunk(name, full, 2, dim=0)
    return torch.cat([_chunk(name, gate, tp, 0)[rank], _chunk(name, up, tp, 0)[rank]], dim=0)


def merge(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor ``name`` from its TP shards (rank order)."""
    kind = split_kind(name)
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
