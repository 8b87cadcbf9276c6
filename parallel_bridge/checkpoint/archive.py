"""``torch.save`` archives read in place: where each record lies in the file, the tensors the archive's pickle
names (record, offset, shape, dtype) without reading their bytes, and reads of a tensor's boxes straight into
their destinations, each record's CRC-32 checked in the same pass.

This is how a serving rank loads at the speed of the disk: a torch_dist record (one ``torch.save`` archive per
chunk inside a ``.distcp`` file, at the offset DCP's metadata gives) or a legacy rank file is read block by
block with ``readinto`` into the destination tensor (or, for bytes the rank does not keep, a scratch block), and
each block goes through CRC-32 while it is still in the cache. ``torch.load`` instead reads, checks, unpickles
and copies: four passes. The CRC covers a whole record, so the first read of a record reads all of it; later
reads of a verified record read only the rows they need. The CRC is ISA-L's where ``isal`` is installed
(``parallel-bridge[fast]``, in the CPU stack; ~24 GB/s here), else zlib's (~4 GB/s).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import math
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from parallel_bridge.checkpoint import unpickle
from parallel_bridge.errors import CheckpointError

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - the CPU stack installs isal
    from zlib import crc32

BLOCK = 8 << 20
"""Bytes read per ``readinto``: small enough that the CRC pass finds them in the cache."""

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


@dataclasses.dataclass(frozen=True)
class Record:
    """One stored record of an archive: ``size`` bytes at absolute file offset ``offset``, and their CRC-32."""

    archive: Archive
    name: str
    offset: int
    size: int
    crc: int


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor as its archive's pickle describes it: ``shape`` ``dtype`` elements, contiguous, from element
    ``start`` of ``record``. Nothing is read until :meth:`read` or :meth:`Archive.read_boxes`."""

    record: Record
    start: int
    shape: torch.Size
    dtype: torch.dtype

    def read(self) -> torch.Tensor:
        """The whole tensor, read from the file in one checked pass."""
        out = torch.empty(self.shape, dtype=self.dtype)
        self.record.archive.read_boxes(self, [([0] * len(self.shape), list(self.shape), out)])
        return out


class _Window(io.RawIOBase):
    """``length`` bytes of a file from ``base``, as a file of their own (so zipfile reads one record's archive
    inside a ``.distcp`` file, seeking to its directory, without copying it)."""

    def __init__(self, f: BinaryIO, base: int, length: int) -> None:
        self._f, self._base, self._length, self._pos = f, base, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._length + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._length - self._pos if n is None or n < 0 else min(n, self._length - self._pos)
        self._f.seek(self._base + self._pos)
        data = self._f.read(max(n, 0))
        self._pos += len(data)
        return data


class Archive:
    """One ``torch.save`` archive: the whole file (a legacy rank file) or ``length`` bytes from ``base`` (a DCP
    record). Opening reads only its zip directory; the label names it in every error."""

    def __init__(self, path: Path, base: int = 0, length: int | None = None, label: str | None = None,
                 file: BinaryIO | None = None) -> None:
        self.path, self.label = path, label or f"shard file {path}"
        self.verified: set[str] = set()
        # an unbuffered handle: its own (closed when the archive goes), or one the records of a .distcp file share
        self._owned = file is None
        self._file = file if file is not None else open(path, "rb", buffering=0)  # noqa: SIM115
        size = self._file.seek(0, 2)
        length = size - base if length is None else length
        if base + length > size:
            raise CheckpointError(f"{self.label} is truncated: the file has {size} bytes, the record needs "
                                  f"{base + length}")
        self._window = _Window(self._file, base, length)
        try:
            infos = zipfile.ZipFile(self._window).infolist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{self.label} cannot be read ({e}); damaged or truncated?") from None
        self.records = {i.filename: self._record(i, base, length) for i in infos}
        pickles = [n for n in self.records if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.label} is not a torch.save archive (no single */data.pkl record)")
        self.prefix = pickles[0][: -len("data.pkl")]

    def __del__(self) -> None:
        if getattr(self, "_owned", False):
            self._file.close()

    def _record(self, info: zipfile.ZipInfo, base: int, length: int) -> Record:
        self._window.seek(info.header_offset)
        head = self._window.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(head)[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self.label}: record {info.filename} has no valid header; the file is damaged")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.label}: record {info.filename} is compressed; torch.save stores records")
        _, n, m = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + n + m
        if start + info.file_size > length:
            raise CheckpointError(
                f"{self.label} is truncated: record {info.filename} needs bytes up to {base + start + info.file_size}"
                f", the file ends at {base + length}"
            )
        return Record(self, info.filename, base + start, info.file_size, info.CRC)

    def objects(self) -> Any:
        """What the archive's pickle holds, every tensor a :class:`StoredTensor` (nothing else read)."""
        small = {r.name: self._read_checked(r) for r in self.records.values()  # the pickle, version, byte order
                 if not r.name.startswith(self.prefix + "data/")}
        if small.get(self.prefix + "byteorder", b"little") != b"little":
            raise CheckpointError(f"{self.label} was written on a big-endian machine; read it with torch.load")
        data = small[self.prefix + "data.pkl"]
        try:
            return _PlaceholderUnpickler(io.BytesIO(data), self).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to unpickle is a damaged file
            raise CheckpointError(f"{self.label} cannot be read ({type(e).__name__}: {e}); damaged?") from None

    def _read_checked(self, record: Record) -> bytes:
        self._file.seek(record.offset)
        data = self._file.read(record.size)
        if len(data) != record.size or crc32(data) != record.crc:
            self._crc_error(record, crc32(data))
        self.verified.add(record.name)
        return data

    def _crc_error(self, record: Record, got: int) -> None:
        raise CheckpointError(
            f"{self.label}: record {record.name} fails its CRC-32 check (stored {record.crc:08x}, read {got:08x});"
            f" the file is damaged, restore it from a good copy"
        )

    def storage(self, key: str) -> Record:
        name = f"{self.prefix}data/{key}"
        if name not in self.records:
            raise CheckpointError(f"{self.label}: the pickle names storage {key} but the archive has no {name}")
        return self.records[name]

    def read_boxes(self, tensor: StoredTensor, boxes: list[tuple[list[int], list[int], torch.Tensor]]) -> None:
        """Copy each box ``(offsets, lengths, dest)`` of ``tensor`` into ``dest`` in one pass over the rows the
        boxes span (the whole record, CRC-checked, the first time the record is read)."""
        record, item = tensor.record, tensor.dtype.itemsize
        shape = list(tensor.shape) or [1]
        row = math.prod(shape[1:]) * item
        check = record.name not in self.verified
        first, last = (0, shape[0]) if check else (min(b[0][0] for b in boxes) if tensor.shape else 0,
                                                    max(b[0][0] + b[1][0] for b in boxes) if tensor.shape else 1)
        lead = tensor.start * item  # bytes of the record before the tensor: read for the CRC only
        crc = crc32(self._read_span(record.offset, lead)) if check and lead else 0
        per = max(1, BLOCK // max(row, 1))
        scratch: torch.Tensor | None = None
        for r0 in range(first, last, per):
            r1 = min(last, r0 + per)
            direct = _direct_target(boxes, tensor.shape, r0, r1)
            if direct is None:
                if scratch is None:
                    scratch = torch.empty(per * row, dtype=torch.uint8)
                target = scratch[: (r1 - r0) * row]
            else:
                target = direct
            view = _bytes_of(target)
            self._read_into(view, record.offset + lead + r0 * row, record)
            if check:
                crc = crc32(view, crc)
            if direct is None:
                block = target.view(tensor.dtype).view([r1 - r0, *shape[1:]])
                _copy_boxes(block, r0, r1, boxes, bool(tensor.shape))
        if check:
            tail = record.size - lead - shape[0] * row
            if tail:
                crc = crc32(self._read_span(record.offset + lead + shape[0] * row, tail), crc)
            if crc != record.crc:
                self._crc_error(record, crc)
            self.verified.add(record.name)

    def _read_span(self, offset: int, n: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(n)

    def _read_into(self, view: memoryview, offset: int, record: Record) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.label}: record {record.name} ends early (truncated at byte "
                                      f"{offset + done})")
            done += got


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype: no numpy needed)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _direct_target(boxes: list, shape: torch.Size, r0: int, r1: int) -> torch.Tensor | None:
    """Where rows [r0, r1) can be read straight into: the one box's contiguous destination when it takes
    whole rows and holds all of them."""
    if len(boxes) != 1 or not shape:
        return None
    offsets, lengths, dest = boxes[0]
    if list(lengths[1:]) != list(shape[1:]) or not dest.is_contiguous():
        return None
    if r0 < offsets[0] or r1 > offsets[0] + lengths[0]:
        return None
    return dest.narrow(0, r0 - offsets[0], r1 - r0).view(torch.uint8).view(-1)


def _copy_boxes(block: torch.Tensor, r0: int, r1: int, boxes: list, has_rows: bool) -> None:
    """Copy the part of each box that lies in rows [r0, r1) (``block``) into its destination."""
    for offsets, lengths, dest in boxes:
        if not has_rows:
            dest.copy_(block.view(dest.shape))
            continue
        lo, hi = max(r0, offsets[0]), min(r1, offsets[0] + lengths[0])
        if lo >= hi:
            continue
        src = block.narrow(0, lo - r0, hi - lo)
        for dim in range(1, len(offsets)):
            src = src.narrow(dim, offsets[dim], lengths[dim])
        dest.narrow(0, lo - offsets[0], hi - lo).copy_(src)


class _PlaceholderUnpickler(unpickle.Unpickler):
    """The archive's pickle with every tensor a :class:`StoredTensor` (its storage a record, never read)."""

    def __init__(self, file: BinaryIO, archive: Archive) -> None:
        super().__init__(file)
        self._archive = archive

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._archive.label}: unknown persistent id {pid!r:.60}")
        _, storage_type, key, _, numel = pid
        dtype = storage_type if isinstance(storage_type, torch.dtype) else _storage_dtypes().get(storage_type)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self._archive.label}: storage {key} has type {storage_type!r}, not a tensor's")
        record = self._archive.storage(str(key))
        if numel * dtype.itemsize > record.size:
            raise CheckpointError(f"{self._archive.label}: storage {key} of {numel} {dtype} elements is larger "
                                  f"than its record ({record.size} bytes)")
        return (record, dtype)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *_: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, _type, args, _state: func(*args)
        if module == "torch" and name in _storage_dtypes():
            return name  # the storage type's name, looked up by persistent_load
        return super().find_class(module, name)

    def _tensor(self, storage: tuple[Record, torch.dtype], offset: int, size: Any, stride: Any, *_: Any) -> Any:
        record, dtype = storage
        shape = torch.Size(size)
        if any(n != 1 and s != c for n, s, c in zip(shape, stride, _contiguous(shape))):
            raise CheckpointError(f"{self._archive.label}: tensor in {record.name} has strides {tuple(stride)}, "
                                  f"not contiguous {_contiguous(shape)}; read it with torch.load")
        if (offset + math.prod(shape)) * dtype.itemsize > record.size:
            raise CheckpointError(f"{self._archive.label}: a tensor of shape {tuple(shape)} at element {offset} "
                                  f"overruns record {record.name} ({record.size} bytes)")
        return StoredTensor(record, offset, shape, dtype)


@functools.cache
def _storage_dtypes() -> dict[str, torch.dtype]:
    """``torch.FloatStorage`` and its kind, as torch.save names them in a pickle, by name -> dtype (read off the
    classes once, TypedStorage's deprecation warning silenced: nothing here uses a TypedStorage)."""
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in dir(torch):
            cls = getattr(torch, name, None)
            if name.endswith("Storage") and isinstance(cls, type) and isinstance(getattr(cls, "dtype", None), torch.dtype):
                out[name] = cls.dtype
    return out


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))
