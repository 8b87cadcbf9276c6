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
from parallel_bridge.sync.pieces import (
    PieceReader,
    copy_and_hash,
    hash_axis,
    shard_stems,
    stem,
    who,
)

_ALIGN = 64
@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """One tensor a trainer rank publishes: global megatron-core name, shape and dtype of its shard."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardWriter:
    """One trainer rank's shard file, mapped once and rewritten in place each round."""

    def __init__(
        self, root: str | Path, tp_rank: int, pp_rank: int, tensors: list[LocalTensor], ep_rank: int | None = None
    ) -> None:
        """``ep_rank``: this file holds the rank's experts (global expert names; ``tp_rank`` its expert-TP rank)."""
        self.root, self.tp_rank, self.pp_rank, self.ep_rank = Path(root), tp_rank, pp_rank, ep_rank
        self.stem = stem(tp_rank, pp_rank, ep_rank)
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

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._used: dict[tuple, int] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        bufs, i = self._free.setdefault(key, []), self._used.get(key, 0)
        if i == len(bufs):
            bufs.append(torch.empty(shape, dtype=dtype, device=self.device))
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


class RoundReader(PieceReader):
    """The shards of one round in shared memory as one checkpoint: ``config``, ``read``, ``read_rows``.

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
        self._index: dict[str, dict[str, Any]] = {}
        self._bufs: dict[str, torch.Tensor] = {}
        files = shard_stems(source_tp, source_pp, experts)
        for stems in files:
            for s in stems:
                self._open(s)
        entries = {s: index["tensors"] for s, index in self._index.items()}
        super().__init__(GPTConfig(**self._index[stem(0, 0)]["config"]), entries, files, pool or BufferPool())

    def _open(self, s: str) -> dict[str, Any]:
        path = self.root / f"{s}.json"
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RoundError(f"trainer rank ({who(s)}) published no readable index {path} ({e})") from e
        if index.get("version") != self.version:
            raise RoundError(
                f"trainer rank ({who(s)}) published version {index.get('version')}, not {self.version}"
            )
        if (index.get("source_tp"), index.get("source_pp")) != (self.source_tp, self.source_pp):
            raise RoundError(
                f"trainer rank ({who(s)}) published a tp={index.get('source_tp')} pp="
                f"{index.get('source_pp')} layout, but the engine was initialized for tp={self.source_tp} "
                f"pp={self.source_pp}"
            )
        data = self.root / f"{s}.bin"
        if not data.exists() or data.stat().st_size < index["size"]:
            raise RoundError(f"trainer rank ({who(s)}): shard file {data} is missing or short")
        self._index[s] = index
        mapped = self._maps.get(str(data))
        if mapped is None or mapped.numel() != index["size"]:
            mapped = torch.from_file(str(data), shared=True, size=index["size"], dtype=torch.uint8)
            self._maps[str(data)] = mapped
        self._bufs[s] = mapped
        return index

    def _entry(self, name: str, t: int) -> dict[str, Any]:
        e = super()._entry(name, t)
        if e.get("version") != self.version:
            raise RoundError(
                f"tensor {name} was not written in round {self.version} by trainer rank ({who(self._where[name][t])}) "
                f"(last written in round {e.get('version')})"
            )
        return e

    def _shard(self, name: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = self._entry(name, t)
        buf, (shape, dtype) = self._bufs[self._where[name][t]], self._local(name, t)
        n = math.prod(shape) * dtype.itemsize
        data = buf[e["offset"] : e["offset"] + n].view(dtype).view(shape)
        hashes = buf[e["hash_offset"] : e["hash_offset"] + 8 * e["hashes"]].view(torch.int64)
        return data, hashes

    def _take(self, name: str, t: int, ranges: dict[int, tuple[int, int]], out: torch.Tensor) -> None:
        """Copy ``ranges`` ({dim: (start, length)}) of trainer rank t's shard into ``out``, verified.

        The sender hashed whole rows (columns, for row-parallel weights): a piece made of
        whole ones is hashed as copied; any other piece is checked through the whole
        rows (columns) it lies in, which reads more.
        """
        data, hashes = self._shard(name, t)
        axis = hash_axis(name, data.dim())
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
