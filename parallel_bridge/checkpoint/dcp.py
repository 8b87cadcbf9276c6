"""torch.distributed.checkpoint, read the way a serving rank needs: exact slices, the read items from DCP's own
``create_read_items_for_chunk_list``, each record read in place into the destinations in one pass with its
CRC-32 checked (:mod:`~parallel_bridge.checkpoint.archive`); a record written with DCP's stream extensions or
not as a ``torch.save`` archive goes through DCP's own reader (a planner from the same read items), checked
the same way. Errors name the file and the record."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint import records
from parallel_bridge.checkpoint.archive import Archive, StoredTensor
from parallel_bridge.errors import CheckpointError


def read_slices(
    reader: Any, metadata: Any, requests: list[tuple[str, list[int], list[int]]],
    into: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Read slices ``(key, offsets, sizes)`` of a DCP checkpoint, each record read once for all of them, into
    ``into`` (tensors of the requests' sizes: views of one output, say) or new tensors."""
    out = into if into is not None else [
        torch.empty(sizes, dtype=metadata.state_dict_metadata[key].properties.dtype)
        for key, _, sizes in requests
    ]
    items = [item for n, request in enumerate(requests) for item in _items_of(metadata, n, *request)]
    by_record: dict[Any, list[Any]] = {}
    for item in items:
        by_record.setdefault(item.storage_index, []).append(item)
    stored = {index: reader.stored(index) for index in by_record}
    if all(t is not None for t in stored.values()):
        order = sorted(by_record, key=lambda i: (metadata.storage_data[i].relative_path,
                                                 metadata.storage_data[i].offset))
        for index in order:
            tensor: StoredTensor = stored[index]
            boxes = [(list(i.storage_offsets), list(i.lengths), _dest(out, i)) for i in by_record[index]]
            tensor.record.archive.read_boxes(tensor, boxes)
        return out
    keys = sorted({key for key, _, _ in requests})
    _load({str(n): t for n, t in enumerate(out)}, reader, _slice_planner(items, out),
          f"reading {keys[:3]} failed")
    return out


def _dest(out: list[torch.Tensor], read_item: Any) -> torch.Tensor:
    dest = out[int(read_item.dest_index.fqn)]
    for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
        dest = dest.narrow(dim, off, n)
    return dest


def _load(state: dict[str, Any], reader: Any, planner: Any, failed: str, prefix: str = "") -> None:
    """torch.distributed.checkpoint's ``load`` in this process; the reader's own CheckpointError comes out as
    it is (after ``prefix``), any other failure as one naming the folder and what ``failed``."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            load(state, storage_reader=reader, planner=planner, no_dist=True)
        except CheckpointException as e:  # a BaseException wrapping the reader's own error
            inner = next(iter(e.failures.values()))[0]
            if isinstance(inner, CheckpointError):
                raise (CheckpointError(f"{prefix}{inner}") if prefix else inner) from None
            raise CheckpointError(
                f"{reader.path}: {failed} ({type(inner).__name__}: {inner}); damaged file?"
            ) from inner


def _items_of(metadata: Any, n: int, key: str, offsets: list[int], sizes: list[int]) -> list[Any]:
    """DCP's read items for the slice ``(key, offsets, sizes)``, its destination named ``str(n)``."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import ReadItem
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
    return [
        ReadItem(type=item.type, dest_index=MetadataIndex(fqn=str(n), offset=item.dest_index.offset,
                                                         index=item.dest_index.index),
                 dest_offsets=item.dest_offsets, storage_index=item.storage_index,
                 storage_offsets=item.storage_offsets, lengths=item.lengths)
        for item in create_read_items_for_chunk_list(key, metadata.state_dict_metadata[key], [chunk])
    ]


def _slice_planner(items: list[Any], out: list[torch.Tensor]) -> Any:
    """A DCP load planner that reads exactly ``items`` into ``out`` (one tensor per request, so one key can be
    read in several slices)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            return _dest(out, read_item)

        def commit_tensor(self, read_item, tensor) -> None:
            pass

    return SlicePlanner()


class _InPlaceChunks:
    """The chunks of one DCP checkpoint as they lie in their files (:class:`StoredTensor`), each checked against
    the metadata once; each ``.distcp`` file opened once, closed with this object."""

    def __init__(self, folder: Path, metadata: Any) -> None:
        self.folder, self.metadata = folder, metadata
        self._stored: dict[Any, StoredTensor | None] = {}
        self._files: dict[str, Any] = {}

    def __del__(self) -> None:
        for f in self._files.values():
            f.close()

    def get(self, index: Any) -> StoredTensor | None:
        """The chunk at storage ``index`` (None: a record only DCP's reader reads: stream extensions, raw bytes)."""
        if index not in self._stored:
            self._stored[index] = self._find(index)
        return self._stored[index]

    def _find(self, index: Any) -> StoredTensor | None:
        sinfo = self.metadata.storage_data[index]
        if getattr(sinfo, "transform_descriptors", None):
            return None
        path = self.folder / sinfo.relative_path
        if sinfo.relative_path not in self._files:
            self._files[sinfo.relative_path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in __del__
        f = self._files[sinfo.relative_path]
        f.seek(sinfo.offset)
        if f.read(4) != b"PK\x03\x04":
            return None  # DCP's raw serialization: its reader's
        label = f"shard file {path} (record of {index.fqn} at byte {sinfo.offset})"
        tensor = Archive(path, sinfo.offset, sinfo.length, label, file=f).objects()
        md = self.metadata.state_dict_metadata[index.fqn]
        chunk = next((c for c in md.chunks if tuple(c.offsets) == tuple(index.offset)), None)
        dtype = md.properties.dtype
        if not isinstance(tensor, StoredTensor) or chunk is None or tuple(tensor.shape) != tuple(chunk.sizes) \
                or tensor.dtype != dtype:
            raise CheckpointError(
                f"{label} holds {getattr(tensor, 'shape', type(tensor).__name__)} "
                f"{getattr(tensor, 'dtype', '')}; the metadata says a {dtype} chunk of "
                f"{tuple(chunk.sizes) if chunk is not None else '?'}"
            )
        return tensor


def cached_reader(folder: Path) -> Any:
    """A FileSystemReader that parses ``.metadata`` once, not on every read, and finds chunks in place."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        _metadata = None
        _chunks: _InPlaceChunks | None = None

        def stored(self, index: Any) -> StoredTensor | None:
            """The chunk at storage ``index`` as it lies in its file (None: a record only DCP's reader reads)."""
            if self._chunks is None:
                self._chunks = _InPlaceChunks(folder, self.read_metadata())
            return self._chunks.get(index)

        def _slice_file(self, file, sinfo):
            """The record's bytes, checked against the CRC-32s torch.save stored in it."""
            data = super()._slice_file(file, sinfo).read(sinfo.length)
            label = f"shard file {folder / sinfo.relative_path} (record at byte {sinfo.offset})"
            if len(data) != sinfo.length:
                raise CheckpointError(f"{label}: {len(data)} of {sinfo.length} bytes could be read; truncated")
            if data[:4] == b"PK\x03\x04":
                records.verify_bytes(data, label)
            return io.BytesIO(data)

        def read_metadata(self, *args, **kwargs):
            if self._metadata is None:
                self._metadata = super().read_metadata(*args, **kwargs)
            return self._metadata

    return Reader(str(folder))


def read_object(reader: Any, key: str) -> bytes:
    """The stored bytes of one non-tensor item of a DCP checkpoint (a megatron-core ``ShardedObject`` such as
    0.17+'s ``common_state``), checked like every record; unpickling is the caller's."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    got: dict[str, bytes] = {}

    class BytesPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            got[read_item.dest_index.fqn] = value.read()

    _load({key: io.BytesIO()}, reader, BytesPlanner(), f"the item {key} cannot be read", prefix=f"the {key} item: ")
    return got[key]
