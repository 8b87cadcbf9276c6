"""Run a function on N local processes, as torchrun would, with a deadline.

``run_distributed(fn, world_size)`` spawns one process per rank with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), initializes
gloo, calls ``fn(*args)`` and returns the per-rank results. A rank that raises is
reported with its own traceback and the others are stopped; a rank that hangs or
dies is reported by number once the deadline passes, instead of hanging the caller.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from parallel_bridge.errors import ConfigError
from parallel_bridge.parallel.launch import free_port

__all__ = ["DistributedTestError", "free_port", "run_distributed", "torchrun_env"]

_GRACE_S = 3.0


class DistributedTestError(RuntimeError):
    """A rank failed, hung or died; the message holds its traceback or exit code."""


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives one rank on a single node."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _to_bytes(value: Any) -> bytes:
    """Results travel as bytes: tensors sent as shared memory vanish when their rank exits."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    results: Any,
    args: tuple,
    env: dict[str, str],
    init: bool,
    timeout_s: float,
    threads: int,
) -> None:
    os.setpgrp()  # this rank and whatever it starts (checkpoint writers, managers) die together
    os.environ.update(torchrun_env(rank, world_size, port))
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if init:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        value = fn(*args)
        results.put((rank, "ok", _to_bytes(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown after a reported success
        pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    init: bool = True,
    threads: int = 1,
) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return their results by rank.

    ``fn`` and ``args`` must be picklable (a module-level function). With
    ``init=True`` the default gloo group exists when ``fn`` starts; with False,
    ``fn`` gets only torchrun's environment. Raises :class:`DistributedTestError`
    naming the first failing rank (with its traceback), or the ranks still
    running at ``timeout_s``.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, results, args, dict(env or {}), init, timeout_s, threads),
            daemon=False,  # ranks may start processes of their own (dist_checkpointing writers)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        outcome, failure = _collect(procs, results, world_size, time.monotonic() + timeout_s)
        if failure is not None:
            rank, tb = failure
            raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{tb}")
        missing = [r for r in range(world_size) if r not in outcome]
        if missing:
            raise DistributedTestError(
                f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s "
                f"(hung in a collective, or waiting for a rank that failed)"
            )
        return [outcome[r][1] for r in range(world_size)]
    finally:
        for p in procs:
            _kill_group(p)
        for p in procs:
            p.join(timeout=5)


def _collect(procs: list[Any], results: Any, world_size: int, deadline: float):
    """Ranks' reports until all are in, the deadline, or the grace period after the first failure:
    (rank -> (status, value), the first failure as (rank, traceback) or None)."""
    outcome: dict[int, tuple[str, Any]] = {}
    failure: tuple[int, str] | None = None
    failure_time = 0.0
    while len(outcome) < world_size:
        now = time.monotonic()
        if (failure is not None and now > failure_time + _GRACE_S) or now > deadline:
            break
        try:
            rank, status, value = results.get(timeout=0.2)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outcome and not p.is_alive()]
            if not dead or failure is not None:
                continue
            time.sleep(0.5)  # its message may still be in flight
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                raise DistributedTestError(
                    f"rank {dead[0]} of {world_size} died with exit code {procs[dead[0]].exitcode} "
                    f"before reporting (killed, or crashed in native code)"
                ) from None
        outcome[rank] = (status, _from_bytes(value) if status == "ok" else value)
        if status == "error" and failure is None:
            failure, failure_time = (rank, value), time.monotonic()
    return outcome, failure


def _kill_group(proc: Any) -> None:
    """Kill a rank and every process it started (its process group)."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
