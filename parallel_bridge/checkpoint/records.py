"""Checked reads of checkpoint files: the CRC-32 check of a ``torch.save`` archive already in memory (a DCP
record DCP's own reader returns; every record of the archive against the checksum stored beside it:
``torch.load`` does not check them, so a flipped byte inside a tensor would load silently; archives read in
place are checked by :mod:`~parallel_bridge.checkpoint.archive`), and JSON or pickles whose errors name the
file (unpickled without running what they name)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import torch

from parallel_bridge.checkpoint.unpickle import pickle_module
from parallel_bridge.errors import CheckpointError

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_CHUNK = 16 << 20


def _check(f: BinaryIO, label: str) -> None:
    if f.read(4) != b"PK\x03\x04":
        f.seek(0)
        return  # not a zip archive (torch's legacy format stores no checksums); torch.load judges it
    try:
        infos = zipfile.ZipFile(f).infolist()
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{label} cannot be read ({e}); damaged or truncated?") from None
    for info in infos:
        f.seek(info.header_offset)
        head = f.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(head)[0] != b"PK\x03\x04":
            raise CheckpointError(f"{label}: record {info.filename} has no valid header; the file is damaged")
        if info.compress_type != zipfile.ZIP_STORED:
            continue  # torch.save stores records; zipfile checks a compressed one when it is read
        _, n, m = _LOCAL_HEADER.unpack(head)
        f.seek(info.header_offset + _LOCAL_HEADER.size + n + m)
        crc, left = 0, info.compress_size
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                break
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        if left or crc != info.CRC:
            raise CheckpointError(
                f"{label}: record {info.filename} fails its CRC-32 check (stored {info.CRC:08x}, "
                f"read {crc:08x}); the file is damaged, restore it from a good copy"
            )


def verify_bytes(data: bytes, label: str) -> None:
    """The same check for one record already in memory (a torch_dist item)."""
    _check(io.BytesIO(data), label)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a parse error names the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def torch_load(path: Path, mmap: bool = False, what: str = "") -> Any:
    """``torch.load`` of a Megatron file: tensors and plain values real, any other class a named stand-in
    (:mod:`~parallel_bridge.checkpoint.unpickle`: no megatron-core needed, nothing the file names runs); errors
    name the file."""
    return _unpickled(path, f"{what + ' ' if what else ''}{path}", "damaged or truncated?", mmap=mmap)


def torch_loads(data: bytes, label: str) -> Any:
    """The same for pickled bytes read from a checkpoint item; errors name ``label``."""
    return _unpickled(io.BytesIO(data), label, "damaged?")


def _unpickled(source: Any, label: str, hint: str, mmap: bool = False) -> Any:
    try:
        return torch.load(source, map_location="cpu", mmap=mmap, weights_only=False, pickle_module=pickle_module)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a damaged file
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{label} cannot be read ({type(e).__name__}: {first}); {hint}") from e
