"""How tensor parallelism shards each kind of tensor: one object per kind, owning every operation on it.

A :class:`Sharding` says, for its kind: this TP rank's shard of a full tensor and the full tensor from its
shards (as megatron-core holds them, verified against megatron-core 0.16.1's layers in
``tests/test_megatron_adapter.py``), the shard pieces that make up a range of the full tensor (how a
checkpoint or a weight round stores it), the slice a vLLM serving rank keeps (read from a
:class:`~parallel_bridge.spec.store.TensorStore`), the axis the weight sync hashes along, and its Hugging
Face parts in both directions. Everything else asks these objects; nothing re-derives a layout.

The kinds: :data:`REPLICATED`, :data:`COLUMN` (output rows split, contiguous per rank), :data:`ROW` (input
columns split: row-parallel weights), :data:`GATED` (``[gate ; up]``, each half split: a rank holds
``[its gate ; its up]``), :data:`GROUPED_QKV` (per query group ``[q heads ; k ; v]`` rows, whole groups per
rank) and :data:`VOCAB` (vocabulary rows; rows past ``vocab_size`` are padding). An MoE expert is one tensor per
expert, sharded by these kinds like a dense MLP (:mod:`~parallel_bridge.spec.moe`); vLLM's stacking of a layer's
experts is :func:`~parallel_bridge.spec.slices.rank_parts`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from parallel_bridge.errors import CheckpointError, ModelConfigError
from parallel_bridge.spec.store import TensorStore

GPTConfig = Any
"""A :class:`~parallel_bridge.spec.model.GPTConfig` (named here without importing it: the spec imports its
shardings, not the other way round)."""


def _chunk(name: str, t: torch.Tensor, parts: int, dim: int) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % parts:
        raise ModelConfigError(f"tensor {name} of shape {tuple(t.shape)} cannot be split in {parts} along dim {dim}")
    return torch.chunk(t, parts, dim=dim)


PartReader = Callable[[int, "int | None", int, int], torch.Tensor]
"""``(part, dim, start, length)`` -> that slice of a kind's Hugging Face part ``part`` (``dim`` None: all of it)."""


class Sharding:
    """A replicated tensor: every rank holds all of it. The base of the other kinds."""

    name = "replicated"
    dim: int | None = None
    """The dimension TP splits (None: replicated)."""
    hash_axis = 0
    """The axis the weight sync hashes along: rows (0), or columns (1) for row-parallel weights."""

    def shard(self, name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """TP rank ``rank``'s part of the full tensor, as megatron-core holds it."""
        return full

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from its TP shards (in rank order)."""
        return shards[0]

    def full_shape(self, local: Sequence[int], tp: int) -> tuple[int, ...]:
        """The full shape of a tensor whose TP shards have shape ``local``."""
        shape = list(local)
        if self.dim is not None and len(shape) > self.dim:
            shape[self.dim] *= tp
        return tuple(shape)

    def pieces(self, local_len: int, tp: int, start: int, length: int) -> list[tuple[int, int, int]]:
        """``(shard, local_start, length)`` pieces of the TP shards that make up entries ``[start, start +
        length)`` of the full tensor along :attr:`dim`, in order (contiguous per rank)."""
        return _overlaps([(t * local_len, local_len, t, 0) for t in range(tp)], start, length)

    def vllm_slice(self, store: TensorStore, name: str, spec: GPTConfig, tp: int, rank: int,
                   vocab: tuple[int, int]) -> torch.Tensor:
        """What vLLM's own model of the family keeps on TP rank ``rank``, read from ``store``."""
        return store.read(name)

    def to_hf(self, name: str, tensor: torch.Tensor, spec: GPTConfig) -> tuple[torch.Tensor, ...]:
        """The Hugging Face parts of one full megatron-core tensor (in the kind's ``hf`` order)."""
        return (tensor,)

    def from_hf(self, name: str, parts: Sequence[torch.Tensor], spec: GPTConfig) -> torch.Tensor:
        """The full megatron-core tensor from its Hugging Face parts."""
        (full,) = parts
        return full

    def hf_shapes(self, full: tuple[int, ...], spec: GPTConfig) -> list[tuple[int, ...]]:
        """The shapes of the Hugging Face parts of a tensor of full shape ``full``."""
        return [full]

    def hf_shard(self, name: str, read_part: PartReader, full: tuple[int, ...], spec: GPTConfig, tp: int,
                 rank: int) -> torch.Tensor:
        """megatron-core TP rank ``rank``'s shard of a tensor of full shape ``full``, from slices of its Hugging
        Face parts (``read_part(part, dim, start, length)``; ``dim`` None reads a part whole): only what the
        shard holds is read (a distributed import reads each byte once over all ranks)."""
        return self.from_hf(name, [read_part(i, None, 0, 0) for i in range(len(self.hf_shapes(full, spec)))], spec)

    def __repr__(self) -> str:
        return f"<{self.name} sharding>"


class ColumnParallel(Sharding):
    """Output rows (dim 0) split, contiguous per rank: megatron-core's ``ColumnParallelLinear``."""

    name, dim = "column", 0

    def shard(self, name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        return full if tp == 1 else _chunk(name, full, tp, self.dim)[rank]

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(shards), dim=self.dim)

    def vllm_slice(self, store, name, spec, tp, rank, vocab):
        local = store.shape(name)[self.dim] // tp
        return store.read(name, self.dim, rank * local, local)

    def hf_shard(self, name, read_part, full, spec, tp, rank):
        local = full[self.dim] // tp
        return read_part(0, self.dim, rank * local, local)


class RowParallel(ColumnParallel):
    """Input columns (dim 1) split, contiguous per rank: megatron-core's ``RowParallelLinear``; the sync
    hashes its columns, so a serving rank's columns are verified as they are copied."""

    name, dim, hash_axis = "row", 1, 1


class GatedColumnParallel(ColumnParallel):
    """A gated ``[gate ; up]`` on dim 0 (SwiGLU's ``linear_fc1``): each half split, a rank holds
    ``[its gate ; its up]`` (so legacy per-rank files concatenated are not ``[gate ; up]``)."""

    name = "gated"

    def shard(self, name, full, tp, rank):
        gate, up = _chunk(name, full, 2, 0)
        return torch.cat([_chunk(name, gate, tp, 0)[rank], _chunk(name, up, tp, 0)[rank]], dim=0)

    def merge(self, name, shards):
        halves = [_chunk(name, s, 2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def pieces(self, local_len, tp, start, length):
        if local_len % 2:
            raise CheckpointError(f"a gated shard of {local_len} rows cannot hold equal gate and up halves")
        half = local_len // 2
        segments = [(t * half, half, t, 0) for t in range(tp)]
        segments += [(tp * half + t * half, half, t, half) for t in range(tp)]
        return _overlaps(segments, start, length)

    def vllm_slice(self, store, name, spec, tp, rank, vocab):
        half = store.shape(name)[0] // 2 // tp
        return store.read_rows(name, [(rank * half, half), (store.shape(name)[0] // 2 + rank * half, half)])

    def to_hf(self, name, tensor, spec):
        return tuple(tensor.chunk(2, dim=0))

    def from_hf(self, name, parts, spec):
        return torch.cat(list(parts), dim=0)

    def hf_shapes(self, full, spec):
        return [(full[0] // 2, *full[1:])] * 2

    def hf_shard(self, name, read_part, full, spec, tp, rank):
        half = full[0] // 2 // tp
        return torch.cat([read_part(0, 0, rank * half, half), read_part(1, 0, rank * half, half)])


class GroupedQKVParallel(ColumnParallel):
    """megatron-core's grouped ``linear_qkv`` rows: whole query groups per rank (:class:`GroupedQKV`)."""

    name = "grouped_qkv"

    def vllm_slice(self, store, name, spec, tp, rank, vocab):
        return store.read_rows(name, GroupedQKV.of(spec).rank_rows(tp, rank, order="qkv"))

    def to_hf(self, name, tensor, spec):
        return GroupedQKV.of(spec).unfuse(name, tensor)

    def from_hf(self, name, parts, spec):
        return GroupedQKV.of(spec).fuse(*parts)

    def hf_shapes(self, full, spec):
        rest, kv = full[1:], spec.num_query_groups * spec.head_dim
        return [(spec.num_attention_heads * spec.head_dim, *rest), (kv, *rest), (kv, *rest)]

    def hf_shard(self, name, read_part, full, spec, tp, rank):
        qkv = GroupedQKV.of(spec)
        local = GroupedQKV(qkv.heads // tp, qkv.groups // tp, qkv.head_dim)  # megatron-core: whole groups per rank
        q, kv = local.heads * local.head_dim, local.groups * local.head_dim
        return local.fuse(read_part(0, 0, rank * q, q), read_part(1, 0, rank * kv, kv), read_part(2, 0, rank * kv, kv))


class VocabParallel(ColumnParallel):
    """Vocabulary rows on dim 0; rows past ``vocab_size`` are the saver's padding, dropped for Hugging Face
    and vLLM (which pads its own way) and added back as zeros on import."""

    name = "vocab"

    def vllm_slice(self, store, name, spec, tp, rank, vocab):
        return store.read(name, 0, vocab[0], vocab[1] - vocab[0])

    def to_hf(self, name, tensor, spec):
        if tensor.shape[0] < spec.vocab_size:
            raise CheckpointError(
                f"tensor {name} has {tensor.shape[0]} vocabulary rows, fewer than vocab_size={spec.vocab_size}"
            )
        return (tensor[: spec.vocab_size],)

    def from_hf(self, name, parts, spec):
        (full,) = parts
        pad = spec.padded_vocab_size - full.shape[0]
        return torch.cat([full, full.new_zeros(pad, *full.shape[1:])]) if pad > 0 else full

    def hf_shapes(self, full, spec):
        return [(spec.vocab_size, *full[1:])]

    def hf_shard(self, name, read_part, full, spec, tp, rank):
        per = full[0] // tp  # rows of the padded vocabulary; those past vocab_size are zeros
        start = rank * per
        real = max(0, min(per, spec.vocab_size - start))
        rows = read_part(0, 0, start, real) if real else None
        out = torch.zeros(per, *full[1:], dtype=rows.dtype if rows is not None else torch.float32)
        if rows is not None:
            out[:real] = rows
        return out

    def pad_for(self, name: str, full: torch.Tensor, spec: GPTConfig, rows: int) -> torch.Tensor:
        """The real rows of ``full`` padded with zeros to ``rows`` (a model's own padding for its TP size)."""
        if full.shape[0] < spec.vocab_size:
            raise CheckpointError(
                f"tensor {name} has {full.shape[0]} vocabulary rows; the model has vocab_size={spec.vocab_size}"
            )
        return torch.nn.functional.pad(full[: spec.vocab_size], (0, 0) * (full.dim() - 1) + (0, rows - spec.vocab_size))


REPLICATED = Sharding()
COLUMN = ColumnParallel()
ROW = RowParallel()
GATED = GatedColumnParallel()
GROUPED_QKV = GroupedQKVParallel()
VOCAB = VocabParallel()


def _overlaps(segments: list[tuple[int, int, int, int]], start: int, length: int) -> list[tuple[int, int, int]]:
    """Of ``(full_start, n, shard, local_start)`` segments, the pieces overlapping ``[start, start + length)``."""
    out = []
    for full_start, n, shard, local_start in segments:
        a, b = max(start, full_start), min(start + length, full_start + n)
        if a < b:
            out.append((shard, local_start + a - full_start, b - a))
    return out


# ------------------------------------------------------------------ the grouped QKV rows
@dataclasses.dataclass(frozen=True)
class GroupedQKV:
    """megatron-core's grouped QKV rows: per query group ``[q heads of the group ; k ; v]``, each ``head_dim``
    rows. The one place this row order is written."""

    heads: int
    groups: int
    head_dim: int

    @classmethod
    def of(cls, spec: Any) -> GroupedQKV:
        return cls(spec.num_attention_heads, spec.num_query_groups, spec.head_dim)

    @property
    def per_group(self) -> int:
        return self.heads // self.groups

    @property
    def rows(self) -> int:
        return self.groups * (self.per_group + 2) * self.head_dim

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.shape[0] != self.rows:
            raise CheckpointError(
                f"tensor {name} has {tensor.shape[0]} rows, but {self.heads} heads in {self.groups} query groups "
                f"of head_dim {self.head_dim} need {self.rows}"
            )

    def unfuse(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grouped rows -> (q, k, v), each heads-major (Hugging Face's q_proj, k_proj, v_proj)."""
        self._check(name, tensor)
        rest = tensor.shape[1:]
        grouped = tensor.reshape(self.groups, self.per_group + 2, self.head_dim, *rest)
        return (
            grouped[:, : self.per_group].reshape(-1, *rest),
            grouped[:, self.per_group].reshape(-1, *rest),
            grouped[:, self.per_group + 1].reshape(-1, *rest),
        )

    def unfuse_features(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same split on the last dimension: a grouped QKV projection's output ``[..., rows]`` -> q, k, v
        ``[..., heads * head_dim]`` (a layer's activations, where :meth:`unfuse` splits a weight's rows)."""
        lead = qkv.shape[:-1]
        grouped = qkv.view(*lead, self.groups, self.per_group + 2, self.head_dim)
        return (
            grouped[..., : self.per_group, :].reshape(*lead, -1),
            grouped[..., self.per_group, :].reshape(*lead, -1),
            grouped[..., self.per_group + 1, :].reshape(*lead, -1),
        )

    def fuse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(q, k, v), heads-major -> grouped rows (the inverse of :meth:`unfuse`)."""
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

    def replicated_kv_shard(self, name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s rows of the full grouped tensor, in grouped order, kv heads replicated when fewer
        groups than ranks (what a serving rank of the project's own models holds; Megatron cannot train it)."""
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
