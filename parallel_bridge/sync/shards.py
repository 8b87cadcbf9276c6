"""A weight round in shared memory: each trainer rank's Megatron shards, read back slice by slice.

Each publishing trainer rank (TP rank t, PP stage p; data-parallel replicas do
not publish) writes one file ``shard_tp{t}_pp{p}.bin`` (and, for an MoE model, each expert-data-parallel rank 0
one ``experts_etp{t}_ep{e}_pp{p}.bin`` of its experts under global expert names) under the session folder
(``/dev/shm`` by default) holding its local tensors under global megatron-core
names, followed by a hash per row (or per column, for row-parallel tensors), and
an index ``shard_tp{t}_pp{p}.json`` naming the round's version. The file is
mapped once and rewritten in place every round.

:class:`RoundReader` presents those shards as a
:class:`~parallel_bridge.spec.store.TensorStore` (``config``, ``shape``, ``read``, ``read_rows``), so the per-rank slicing written for checkpoint serving
(:func:`parallel_bridge.spec.slices.rank_parts`) picks each serving
rank's rows and columns. Every piece copied out is hashed again and compared with
the sender's hash of the same rows or columns: what a serving rank keeps equals
what was sent, or the read raises naming the tensor and trainer rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.errors import RoundError
from parallel_bridge.parallel.layout import round_up
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.schema import sharding_of

_ALIGN = 64
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


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


@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """One tensor a trainer rank publishes: global megatron-core name, shape and dtype of its shard."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _stem(tp_rank: int, pp_rank: int, ep_rank: int | None = None) -> str:
    """A shard file's name: a trainer rank's dense tensors, or (``ep_rank`` given) its experts, whose TP rank is
    the expert-TP rank."""
    return f"shard_tp{tp_rank}_pp{pp_rank}" if ep_rank is None else f"experts_etp{tp_rank}_ep{ep_rank}_pp{pp_rank}"


def _who(stem: str) -> str:
    """The trainer rank a shard file is from, for messages: ``tp=1, pp=0`` or ``etp=0, ep=1, pp=0``."""
    body = stem.split("_", 1)[1]
    return ", ".join(f"{''.join(c for c in part if c.isalpha())}={''.join(c for c in part if c.isdigit())}"
                     for part in body.split("_"))


class ShardWriter:
    """One trainer rank's shard file, mapped once and rewritten in place each round."""

    def __init__(
        self, root: str | Path, tp_rank: int, pp_rank: int, tensors: list[LocalTensor], ep_rank: int | None = None
    ) -> None:
        """``ep_rank``: this file holds the rank's experts (global expert names; ``tp_rank`` its expert-TP rank)."""
        self.root, self.tp_rank, self.pp_rank, self.ep_rank = Path(root), tp_rank, pp_rank, ep_rank
        self.stem = _stem(tp_rank, pp_rank, ep_rank)
        self.tensors = {t.name: t for t in tensors}
        self.entries: dict[str, dict[str, Any]] = {}
        offset = 0
        for t in tensors:
            axis = sharding_of(t.name).hash_axis
            hashes = t.shape[axis] if len(t.shape) > axis else 1
            self.entries[t.name] = {
                "dtype": str(t.dtype).replace("torch.", ""),
                "shape": list(t.shape),
                "offset": offset,
                "hash_offset": offset + _aligned(t.nbytes),
                "hashes": hashes,
            }
            offset += _aligned(t.nbytes) + _aligned(8 * hashes)
        self.size = max(offset, _ALIGN)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_path = self.root / f"{self.stem}.bin"
        with open(self.data_path, "wb") as f:
            f.truncate(self.size)
        self._buf = torch.from_file(str(self.data_path), shared=True, size=self.size, dtype=torch.uint8)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Copy one local tensor and its hashes into the file; returns the bytes written."""
        want, e = self.tensors[name], self.entries[name]
        if tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise RoundError(
                f"tensor {name}: the trainer holds {tuple(tensor.shape)} {tensor.dtype} but the round "
                f"was laid out for {want.shape} {want.dtype}"
            )
        dst = self._view(e["offset"], want.shape, want.dtype)
        h = copy_and_hash(dst, tensor.detach(), sharding_of(name).hash_axis)
        self._view(e["hash_offset"], (e["hashes"],), torch.int64).copy_(h.reshape(-1))
        self._written.add(name)
        return want.nbytes

    def commit(self, version: int, meta: dict[str, Any]) -> None:
        """Publish the index of this round (atomically: written beside, then renamed)."""
        for name in self._written:  # a tensor not rewritten this round keeps its old stamp: readers refuse it
            self.entries[name]["version"] = version
        self._written.clear()
        index = {"version": version, "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "ep_rank": self.ep_rank,
                 "size": self.size}
        index.update(meta, tensors=self.entries)
        path = self.root / f"{self.stem}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)

    def _view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        return self._buf[offset : offset + n].view(dtype).view(shape)


class BufferPool:
    """Receive buffers reused round after round (the reads repeat in the same order), so a round
    touches memory that is already mapped. ``release`` drops a buffer that now backs live weights."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._used: dict[tuple, int] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        bufs, i = self._free.setdefault(key, []), self._used.get(key, 0)
        if i == len(bufs):
            bufs.append(torch.empty(shape, dtype=dtype))
        self._used[key] = i + 1
        return bufs[i]

    def new_round(self) -> None:
        self._used.clear()

    def release(self, tensor: torch.Tensor) -> None:
        bufs = self._free.get((tuple(tensor.shape), tensor.dtype), [])
        for i, b in enumerate(bufs):
            if b.data_ptr() == tensor.data_ptr():
                bufs[i] = torch.empty_like(b)


def _aligned(n: int) -> int:
    return round_up(n, _ALIGN)


class RoundReader:
    """The shards of one round as one checkpoint: ``config``, ``read``, ``read_rows``.

    ``received_bytes`` counts what was copied out (and verified), so a caller can
    prove it read only its slices.
    """

    def __init__(
        self,
        root: str | Path,
        version: int,
        source_tp: int,
        source_pp: int,
        maps: dict[str, torch.Tensor] | None = None,
        pool: BufferPool | None = None,
        *,
        experts: tuple[int, int] | None = None,
    ) -> None:
        """``experts``: (EP, expert TP) of the trainer when it publishes experts (their own files)."""
        self.root, self.version = Path(root), version
        self.source_tp, self.source_pp = source_tp, source_pp
        self._maps = {} if maps is None else maps  # shard files stay mapped across rounds: no page faults
        self._pool = pool or BufferPool()
        self.received_bytes = 0
        self.verified = 0
        self._index: dict[str, dict[str, Any]] = {}
        self._bufs: dict[str, torch.Tensor] = {}
        self._where: dict[str, list[str]] = {}  # global name -> the files holding its shards, in shard order
        files = [[_stem(t, p) for t in range(source_tp)] for p in range(source_pp)]
        if experts is not None:
            files += [[_stem(t, p, e) for t in range(experts[1])] for p in range(source_pp) for e in range(experts[0])]
        for stems in files:
            for stem in stems:
                for name in self._open(stem)["tensors"]:
                    self._where.setdefault(name, stems)
        first = self._index[_stem(0, 0)]
        self.config = GPTConfig(**first["config"])

    def _open(self, stem: str) -> dict[str, Any]:
        path = self.root / f"{stem}.json"
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RoundError(f"trainer rank ({_who(stem)}) published no readable index {path} ({e})") from e
        if index.get("version") != self.version:
            raise RoundError(
                f"trainer rank ({_who(stem)}) published version {index.get('version')}, not {self.version}"
            )
        if (index.get("source_tp"), index.get("source_pp")) != (self.source_tp, self.source_pp):
            raise RoundError(
                f"trainer rank ({_who(stem)}) published a tp={index.get('source_tp')} pp="
                f"{index.get('source_pp')} layout, but the engine was initialized for tp={self.source_tp} "
                f"pp={self.source_pp}"
            )
        data = self.root / f"{stem}.bin"
        if not data.exists() or data.stat().st_size < index["size"]:
            raise RoundError(f"trainer rank ({_who(stem)}): shard file {data} is missing or short")
        self._index[stem] = index
        mapped = self._maps.get(str(data))
        if mapped is None or mapped.numel() != index["size"]:
            mapped = torch.from_file(str(data), shared=True, size=index["size"], dtype=torch.uint8)
            self._maps[str(data)] = mapped
        self._bufs[stem] = mapped
        return index

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def _shard(self, name: str, t: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        stem = self._where[name][t]
        e = self._index[stem]["tensors"].get(name)
        if e is None:
            raise RoundError(f"tensor {name} is missing from trainer rank ({_who(stem)})'s shard")
        if e.get("version") != self.version:
            raise RoundError(
                f"tensor {name} was not written in round {self.version} by trainer rank ({_who(stem)}) "
                f"(last written in round {e.get('version')})"
            )
        buf, dtype, shape = self._bufs[stem], _dtype(e["dtype"]), tuple(e["shape"])
        n = math.prod(shape) * dtype.itemsize
        data = buf[e["offset"] : e["offset"] + n].view(dtype).view(shape)
        hashes = buf[e["hash_offset"] : e["hash_offset"] + 8 * e["hashes"]].view(torch.int64)
        return data, hashes, e

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``: its trainer shards' shape, as its sharding assembles them."""
        if name not in self._where:
            raise RoundError(f"tensor {name} was published by no trainer rank")
        return sharding_of(name).full_shape(self._shard(name, 0)[0].shape, len(self._where[name]))

    def read(
        self,
        name: str,
        dim: int | None = None,
        start: int = 0,
        length: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
        first = self._shard(name, 0)[0]
        out = self._pool.take(tuple(out_shape), first.dtype) if out is None else out
        if sd is None:  # replicated, or one source shard
            self._take(name, 0, {dim: (start, length)}, out)
        elif dim == sd:
            at = 0
            for t, local, n in sharding.pieces(first.shape[sd], shards, start, length):
                self._take(name, t, {dim: (local, n)}, out.narrow(dim, at, n))
                at += n
        else:  # a range of the other dimension: every shard contributes its part of the split one
            at = 0
            for t, local, n in sharding.pieces(first.shape[sd], shards, 0, full[sd]):
                self._take(name, t, {dim: (start, length), sd: (local, n)}, out.narrow(sd, at, n))
                at += n
        return out

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        """Concatenated row ranges ``[(start, length), ...]`` of ``name``, read straight into one tensor."""
        full = self.shape(name)
        out = self._pool.take((sum(n for _, n in index), *full[1:]), self._shard(name, 0)[0].dtype)
        at = 0
        for s, n in index:
            self.read(name, 0, s, n, out=out.narrow(0, at, n))
            at += n
        return out

    def _take(self, name: str, t: int, ranges: dict[int, tuple[int, int]], out: torch.Tensor) -> None:
        """Copy ``ranges`` ({dim: (start, length)}) of trainer rank t's shard into ``out``, verified.

        The sender hashed whole rows (columns, for row-parallel weights): a piece made of
        whole ones is hashed as copied; any other piece is checked through the whole
        rows (columns) it lies in, which reads more.
        """
        data, hashes, _ = self._shard(name, t)
        axis = sharding_of(name).hash_axis if data.dim() > 1 else 0
        a_start, a_n = ranges.get(axis, (0, data.shape[axis]))
        block = data.narrow(axis, a_start, a_n)
        rest = [(d, s, n) for d, (s, n) in ranges.items() if d != axis and (s, n) != (0, data.shape[d])]
        want = hashes[a_start : a_start + a_n]
        if not rest:
            self._verify(name, t, out, copy_and_hash(out, block, axis), want, a_start)
            return
        whole = torch.empty_like(block)
        self._verify(name, t, whole, copy_and_hash(whole, block, axis), want, a_start)
        for d, s, n in rest:
            whole = whole.narrow(d, s, n)
        out.copy_(whole)

    def _verify(
        self, name: str, t: int, received: torch.Tensor, got: torch.Tensor, want: torch.Tensor, start: int
    ) -> None:
        if not torch.equal(got, want):
            bad = int((got != want).nonzero()[0, 0]) + start
            what = "column" if received.dim() > 1 and sharding_of(name).hash_axis == 1 else "row"
            raise RoundError(
                f"tensor {name}: checksum mismatch in {what} {bad} of trainer rank ({_who(self._where[name][t])})'s "
                f"shard: the bytes received differ from the bytes sent"
            )
        self.received_bytes += received.numel() * received.element_size()
        self.verified += 1

