"""Building a :class:`~parallel_bridge.parallel.context.ParallelContext` where a job starts: torchrun's environment
(initializing the default process group), or a DeviceMesh; and a DeviceMesh from a context."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from parallel_bridge.errors import DistributedError, LayoutError
from parallel_bridge.parallel import layout
from parallel_bridge.parallel.context import ParallelContext

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago (a torchrun rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def context_from_torchrun(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    dp: int | None = None,
    order: str = layout.MEGATRON_ORDER,
    backend: str | None = None,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
) -> ParallelContext:
    """Build from torchrun's RANK/WORLD_SIZE/LOCAL_RANK; dp defaults to what is left.

    Initializes the default process group if it is not yet (gloo on CPU,
    nccl when CUDA is available) with ``timeout_s``.
    """
    env = dict(os.environ if env is None else env)
    values = _torchrun_values(env)
    world, rank = values["WORLD_SIZE"], values["RANK"]
    model = tp * pp * cp
    if dp is None:
        if model < 1 or world % model:
            raise LayoutError(f"tp={tp} x pp={pp} x cp={cp} = {model} does not divide WORLD_SIZE={world}")
        dp = world // model
    elif model * dp != world:
        raise LayoutError(f"tp={tp} x pp={pp} x cp={cp} x dp={dp} = {model * dp} but WORLD_SIZE={world}")
    ctx = ParallelContext(
        tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, etp=etp, rank=rank, order=order, backend=backend, timeout_s=timeout_s
    )
    _init_default_group(env, values, backend, timeout_s)
    return ctx


def _torchrun_values(env: dict[str, str]) -> dict[str, int]:
    """RANK, WORLD_SIZE and LOCAL_RANK as integers, each checked."""
    values = {}
    for var in _TORCHRUN_VARS:
        raw = env.get(var)
        if raw is None:
            raise DistributedError(
                f"environment variable {var} is not set: run under torchrun "
                f"(torchrun --nproc-per-node N script.py) or set {', '.join(_TORCHRUN_VARS)}"
            )
        try:
            values[var] = int(raw)
        except ValueError:
            raise LayoutError(f"environment variable {var}={raw!r} is not an integer") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise LayoutError(f"RANK={values['RANK']} and WORLD_SIZE={values['WORLD_SIZE']} are inconsistent")
    return values


def _init_default_group(env: dict[str, str], values: dict[str, int], backend: str | None, timeout_s: float) -> None:
    """The default process group of torchrun's world (gloo on CPU, nccl with CUDA), unless it exists; an
    existing one must be that world."""
    import torch
    import torch.distributed as dist

    world, rank = values["WORLD_SIZE"], values["RANK"]
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise DistributedError(
                f"torch.distributed is initialized with rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but RANK={rank} WORLD_SIZE={world}"
            )
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in env:
            raise DistributedError(f"environment variable {var} is not set: run under torchrun")
    default = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if default == "nccl":
        torch.cuda.set_device(values["LOCAL_RANK"])
        kwargs["device_id"] = torch.device("cuda", values["LOCAL_RANK"])
    dist.init_process_group(
        backend=backend or default, init_method="env://", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s), **kwargs,
    )
    logger.info("initialized %s process group: rank %d of %d", backend or default, rank, world)


@contextlib.contextmanager
def single_process_world(backend: str = "gloo", timeout_s: float = 600.0) -> Iterator[ParallelContext]:
    """A torch.distributed world of this process alone, for code that needs one (megatron-core's save), torn
    down on exit; when a world already exists it must be of one rank and is left as it is."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise DistributedError(f"a single-process step runs inside a world of {dist.get_world_size()} ranks")
        yield ParallelContext(timeout_s=timeout_s)
        return
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield ParallelContext(backend=backend, timeout_s=timeout_s)
    finally:
        dist.destroy_process_group()


def context_from_device_mesh(mesh: DeviceMesh, **kwargs: Any) -> ParallelContext:
    """Build from a DeviceMesh whose dim names are axes (``tp``, ``dp``, ...), adopting its groups.

    The mesh must number ranks contiguously (``arange(world).reshape(shape)``),
    last dim fastest, as ``init_device_mesh`` does.
    """
    import torch

    names = mesh.mesh_dim_names
    if not names:
        raise LayoutError("the DeviceMesh has no mesh_dim_names; name its dims from tp, cp, dp, pp")
    unknown = [n for n in names if n not in ("tp", "cp", "dp", "pp")]
    if unknown:
        raise LayoutError(f"DeviceMesh dims {unknown} are not axes; use names from tp, cp, dp, pp")
    grid = mesh.mesh
    if not torch.equal(grid.flatten().cpu(), torch.arange(grid.numel())):
        raise LayoutError(
            "the DeviceMesh does not number ranks contiguously; build it with init_device_mesh"
        )
    degrees = dict(zip(names, grid.shape))
    ctx = ParallelContext(
        **{k: int(v) for k, v in degrees.items()},
        rank=mesh.get_rank(),
        order="-".join(reversed(names)),
        **kwargs,
    )
    return ctx.with_groups({n: mesh.get_group(n) for n in names})


def device_mesh_of(ctx: ParallelContext, device_type: str | None = None) -> DeviceMesh:
    """A DeviceMesh over the dense axes of size > 1 (slowest first); collective."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    tokens = [t for t in ctx.order.split("-") if t != "ep"]
    names = [t for t in reversed(tokens) if getattr(ctx, t) > 1] or ["dp"]
    shape = tuple(getattr(ctx, n) for n in names)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, shape, mesh_dim_names=tuple(names))
