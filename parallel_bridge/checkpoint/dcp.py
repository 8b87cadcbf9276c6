"""torch.distributed.checkpoint, read the way a serving rank needs: exact slices in one pass of DCP's own
reader (a planner built from ``create_read_items_for_chunk_list``), every record checked against the CRC-32s
``torch.save`` stored in it, errors naming the file."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint import records
from parallel_bridge.errors import CheckpointError


def read_slices(
    reader: Any, metadata: Any, requests: list[tuple[str, list[int], list[int]]]
) -> list[torch.Tensor]:
    """Read slices ``(key, offsets, sizes)`` of a DCP checkpoint in one pass of torch's own reader."""
    out = [
        torch.empty(sizes, dtype=metadata.state_dict_metadata[key].properties.dtype)
        for key, _, sizes in requests
    ]
    keys = sorted({key for key, _, _ in requests})
    _load({str(n): t for n, t in enumerate(out)}, reader, _slice_planner(metadata, requests, out),
          f"reading {keys[:3]} failed")
    return out


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


def _slice_planner(metadata: Any, requests: list[tuple[str, list[int], list[int]]], out: list[torch.Tensor]) -> Any:
    """A DCP load planner that reads exactly the requested chunks into ``out`` (one tensor per request, so one
    key can be read in several slices); built on DCP's own ``create_read_items_for_chunk_list``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    def items_of(n: int, key: str, offsets: list[int], sizes: list[int]) -> list[ReadItem]:
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        return [
            ReadItem(type=item.type, dest_index=MetadataIndex(fqn=str(n), offset=item.dest_index.offset,
                                                             index=item.dest_index.index),
                     dest_offsets=item.dest_offsets, storage_index=item.storage_index,
                     storage_offsets=item.storage_offsets, lengths=item.lengths)
            for item in create_read_items_for_chunk_list(key, metadata.state_dict_metadata[key], [chunk])
        ]

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            return LoadPlan([item for n, request in enumerate(requests) for item in items_of(n, *request)])

        def resolve_tensor(self, read_item):
            dest = out[int(read_item.dest_index.fqn)]
            for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, off, n)
            return dest

        def commit_tensor(self, read_item, tensor) -> None:
            pass

    return SlicePlanner()


def cached_reader(folder: Path) -> Any:
    """A FileSystemReader that parses ``.metadata`` once, not on every read."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        _metadata = None

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
