"""A round's trainer shards as one :class:`~parallel_bridge.spec.store.TensorStore`, whatever carries them.

Every read a serving rank makes (:func:`~parallel_bridge.spec.slices.rank_parts`) becomes *pieces*: one
trainer shard's ranges ``{dim: (start, length)}``, each hashed by the sender along the tensor's hash axis
(rows, or columns for row-parallel weights). :class:`PieceReader` does that decomposition once for every
transport; a transport says how a piece arrives (``_take``): copied out of shared memory
(:class:`~parallel_bridge.sync.shards.RoundReader`), or received from the trainer rank that owns it
(:class:`PlanRecorder` lists the pieces once from metadata, :class:`LandedReader` serves them once landed).
"""

from __future__ import annotations

from typing import Any

import torch

from parallel_bridge.errors import RoundError
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.schema import sharding_of

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def shard_hash(t: torch.Tensor, along: int) -> torch.Tensor:
    """Exact integer hash per row (``along=0``) or per column (``along=1``) of a tensor's bit pattern.

    Wrapping integer sums of the raw bits (32-bit accumulators for elements of up to
    4 bytes: vectorized, about a copy's cost), so summation order and thread count do
    not matter: a changed word changes its row's (column's) hash, a swapped row
    (column) moves one.
    """
    bits = t.view(_INT_OF_SIZE[t.element_size()])
    acc = torch.int64 if t.element_size() == 8 else torch.int32
    if bits.dim() == 1:
        return bits.to(torch.int64)
    return bits.sum(dim=1 - along, dtype=acc).to(torch.int64)


_BLOCK = 1 << 20
"""Bytes copied then hashed at a time, so the hash reads what the copy left in cache."""


def copy_and_hash(dst: torch.Tensor, src: torch.Tensor, along: int) -> torch.Tensor:
    """``dst.copy_(src)`` and ``shard_hash(dst, along)`` in one pass over memory, block by block of rows."""
    if dst.dim() == 1 or dst.numel() * dst.element_size() <= _BLOCK:
        dst.copy_(src)
        return shard_hash(dst, along)
    rows = max(1, _BLOCK // (dst.shape[1] * dst.element_size()))
    parts = []
    for r in range(0, dst.shape[0], rows):
        block = dst[r : r + rows]
        block.copy_(src[r : r + rows])
        parts.append(shard_hash(block, along))
    if along == 0:
        return torch.cat(parts)
    acc = torch.int64 if dst.element_size() == 8 else torch.int32
    total = torch.zeros(dst.shape[1], dtype=acc)
    for part in parts:
        total += part.to(acc)  # wrapping, like the one-pass sum
    return total.to(torch.int64)


PieceKey = tuple[str, int, tuple[tuple[int, int, int], ...]]
"""(tensor, trainer shard index, ((dim, start, length), ...)): one piece of one trainer shard."""


def stem(tp_rank: int, pp_rank: int, ep_rank: int | None = None) -> str:
    """A trainer shard's name: a trainer rank's dense tensors, or (``ep_rank`` given) its experts, whose TP rank
    is the expert-TP rank."""
    return f"shard_tp{tp_rank}_pp{pp_rank}" if ep_rank is None else f"experts_etp{tp_rank}_ep{ep_rank}_pp{pp_rank}"


def who(name: str) -> str:
    """The trainer rank a shard is from, for messages: ``tp=1, pp=0`` or ``etp=0, ep=1, pp=0``."""
    body = name.split("_", 1)[1]
    return ", ".join(f"{''.join(c for c in part if c.isalpha())}={''.join(c for c in part if c.isdigit())}"
                     for part in body.split("_"))


def shard_stems(source_tp: int, source_pp: int, experts: tuple[int, int] | None) -> list[list[str]]:
    """Every shard of a round, grouped as one tensor's shards (in shard order): dense, then each EP rank's."""
    files = [[stem(t, p) for t in range(source_tp)] for p in range(source_pp)]
    if experts is not None:
        files += [[stem(t, p, e) for t in range(experts[1])] for p in range(source_pp) for e in range(experts[0])]
    return files


def piece_key(name: str, t: int, ranges: dict[int, tuple[int, int]]) -> PieceKey:
    return name, t, tuple((d, s, n) for d, (s, n) in sorted(ranges.items()))


def narrow(data: torch.Tensor, key: PieceKey) -> torch.Tensor:
    """The piece ``key`` names, of its trainer shard ``data``."""
    for d, s, n in key[2]:
        data = data.narrow(d, s, n)
    return data


def hash_axis(name: str, dims: int) -> int:
    return sharding_of(name).hash_axis if dims > 1 else 0


class PieceReader:
    """The shards of one round as one checkpoint (``config``, ``shape``, ``read``, ``read_rows``), from each
    shard's tensor entries (``{"shape", "dtype"}``); ``received_bytes`` and ``verified`` count what arrived."""

    def __init__(self, config: GPTConfig, entries: dict[str, dict[str, Any]], files: list[list[str]], pool: Any) -> None:
        self.config, self._entries, self._pool = config, entries, pool
        self.received_bytes = 0
        self.verified = 0
        self._where: dict[str, list[str]] = {}  # global name -> the shards holding it, in shard order
        for stems in files:
            for s in stems:
                for name in entries[s]:
                    self._where.setdefault(name, stems)

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def _entry(self, name: str, t: int) -> dict[str, Any]:
        s = self._where[name][t]
        e = self._entries[s].get(name)
        if e is None:
            raise RoundError(f"tensor {name} is missing from trainer rank ({who(s)})'s shard")
        return e

    def _local(self, name: str, t: int) -> tuple[tuple[int, ...], torch.dtype]:
        e = self._entry(name, t)
        return tuple(e["shape"]), getattr(torch, str(e["dtype"]).replace("torch.", ""))

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``: its trainer shards' shape, as its sharding assembles them."""
        if name not in self._where:
            raise RoundError(f"tensor {name} was published by no trainer rank")
        return sharding_of(name).full_shape(self._local(name, 0)[0], len(self._where[name]))

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor ``name``, or ``length`` entries from ``start`` along ``dim``; verified."""
        full = self.shape(name)
        sharding, shards = sharding_of(name), len(self._where[name])
        sd = sharding.dim if shards > 1 else None
        if dim is None:
            dim, start, length = (sd or 0), 0, full[sd or 0]
        length = full[dim] - start if length is None else length
        if start < 0 or length < 0 or start + length > full[dim]:
            raise RoundError(f"tensor {name}: [{start}, {start + length}) is outside dim {dim} of {full}")
        out_shape = list(full)
        out_shape[dim] = length
        local, dtype = self._local(name, 0)
        out = self._pool.take(tuple(out_shape), dtype) if out is None else out
        if sd is None:  # replicated, or one source shard
            self._take(name, 0, {dim: (start, length)}, out)
        elif dim == sd:
            at = 0
            for t, off, n in sharding.pieces(local[sd], shards, start, length):
                self._take(name, t, {dim: (off, n)}, out.narrow(dim, at, n))
                at += n
        else:  # a range of the other dimension: every shard contributes its part of the split one
            at = 0
            for t, off, n in sharding.pieces(local[sd], shards, 0, full[sd]):
                self._take(name, t, {dim: (start, length), sd: (off, n)}, out.narrow(sd, at, n))
                at += n
        return out

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        """Concatenated row ranges ``[(start, length), ...]`` of ``name``, read straight into one tensor."""
        full = self.shape(name)
        out = self._pool.take((sum(n for _, n in index), *full[1:]), self._local(name, 0)[1])
        at = 0
        for s, n in index:
            self.read(name, 0, s, n, out=out.narrow(0, at, n))
            at += n
        return out

    def _take(self, name: str, t: int, ranges: dict[int, tuple[int, int]], out: torch.Tensor) -> None:
        raise NotImplementedError

    def _verify(self, name: str, t: int, received: torch.Tensor, got: torch.Tensor, want: torch.Tensor,
                start: int) -> None:
        if not torch.equal(got, want):
            bad = int((got != want).nonzero()[0, 0]) + start
            what = "column" if received.dim() > 1 and sharding_of(name).hash_axis == 1 else "row"
            raise RoundError(
                f"tensor {name}: checksum mismatch in {what} {bad} of trainer rank ({who(self._where[name][t])})'s "
                f"shard: the bytes received differ from the bytes sent"
            )
        self.received_bytes += received.numel() * received.element_size()
        self.verified += 1


class MetaPool:
    """Buffers of no storage, for listing pieces."""

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")


class PlanRecorder(PieceReader):
    """Lists the pieces a serving rank's reads need, in order, from shard metadata alone (no bytes)."""

    def __init__(self, config: GPTConfig, entries: dict[str, dict[str, Any]], files: list[list[str]]) -> None:
        super().__init__(config, entries, files, MetaPool())
        self.pieces: list[PieceKey] = []

    def _take(self, name, t, ranges, out):
        self.pieces.append(piece_key(name, t, ranges))

    def shard_of(self, key: PieceKey) -> str:
        return self._where[key[0]][key[1]]

    def piece_shape(self, key: PieceKey) -> tuple[int, ...]:
        shape = list(self._local(key[0], key[1])[0])
        for d, _, n in key[2]:
            shape[d] = n
        return tuple(shape)


class LandedReader(PieceReader):
    """Serves a round's reads from pieces that have arrived (``landed``: key -> (piece, sender's hashes)),
    each verified against its hashes as it is copied out."""

    def __init__(self, config, entries, files, pool, landed: dict[PieceKey, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(config, entries, files, pool)
        self._landed = landed

    def _take(self, name, t, ranges, out):
        key = piece_key(name, t, ranges)
        piece, want = self._landed[key]
        axis = hash_axis(name, piece.dim())
        self._verify(name, t, out, copy_and_hash(out, piece, axis), want, 0)

