"""Folders a conversion writes: checked before anything is written, built in a hidden temporary folder beside
the target and renamed into place at the end, so a failure leaves no half-written output; an earlier output
of this tool is replaced only when asked."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from parallel_bridge.errors import OutputError

logger = logging.getLogger(__name__)

MARKER = ".parallel-bridge-export.json"
"""Written into every export: ``--force`` replaces only folders that carry it."""


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Raise before anything is written when ``out`` would touch an input or a folder this tool did not write."""
    target = out.resolve()
    for given in inputs:
        source = given.resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            where = "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            raise OutputError(f"output folder {out} {where} the input {given}; choose an output outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"output {out} exists and is not a folder; choose another output")
        if not overwrite:
            raise OutputError(f"output folder {out} exists; pass overwrite (--force) to replace it")
        if not (out / MARKER).exists():
            raise OutputError(
                f"output folder {out} exists and was not written by parallel-bridge convert (no {MARKER}); "
                f"--force replaces only an earlier export: remove it yourself or choose another output"
            )


def _remove_stale_partials(out: Path) -> None:
    """Temporary folders of earlier exports to ``out`` whose process is gone (killed mid-way)."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name[len(f".{out.name}.partial-") :].split("-")[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        logger.info("removing %s, left by an interrupted export", partial)
        shutil.rmtree(partial, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(out: Path, source: str) -> Iterator[Path]:
    """A temporary folder to fill; on success it becomes ``out`` (carrying :data:`MARKER`, and replacing an
    earlier output checked by :func:`check_output`), on failure it is removed."""
    tmp = begin_output(out)
    try:
        yield tmp
        finish_output(tmp, out, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def begin_output(out: Path) -> Path:
    """The temporary folder beside ``out`` a conversion fills (``.OUT.partial-PID-*``), the ones of killed
    earlier runs removed first. :func:`atomic_output` for one process; a distributed import's rank 0 calls this
    and :func:`finish_output` itself."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def finish_output(tmp: Path, out: Path, source: str) -> None:
    """Mark the filled ``tmp`` and rename it to ``out`` (an earlier output, checked before, replaced)."""
    (tmp / MARKER).write_text(json.dumps({"tool": "parallel-bridge convert", "source": source}))
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        out.rename(old)  # checked before: an earlier output of this tool
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
