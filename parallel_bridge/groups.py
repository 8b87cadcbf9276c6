"""Process groups of a :class:`~parallel_bridge.context.ParallelContext`: created on first use or adopted
from whoever made them (vLLM, Megatron, a DeviceMesh), cached beside the context's value."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.distributed as dist

    from parallel_bridge.context import ParallelContext


class GroupCache:
    """Process groups of one context, shared by its copies; not part of its value."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.lock = threading.Lock()


def bound_group(ctx: ParallelContext, cache: GroupCache, name: str) -> dist.ProcessGroup | None:
    """``ctx``'s group ``name`` from ``cache``, created (collectively) on first use.

    A name whose rank lists equal those of a group already bound (``mp`` and ``tp``
    when pp=1, say) shares that group instead of creating a communicator.
    """
    with cache.lock:
        if name in cache.groups:
            return cache.groups[name]
        all_ranks = ctx.all_ranks(name)
        dist = _require_distributed(ctx, name)
        for other, pg in cache.groups.items():  # same ranks as a bound group: share it
            if ctx.all_ranks(other) == all_ranks:
                cache.groups[name] = pg
                return pg
        if name == "world":
            pg = dist.group.WORLD
        else:
            pg = None
            for ranks in all_ranks:
                created = dist.new_group(ranks, timeout=timedelta(seconds=ctx.timeout_s), backend=ctx.backend)
                if ctx.rank in ranks:
                    pg = created
        cache.groups[name] = pg
        return pg


def adopt(ctx: ParallelContext, cache: GroupCache, inherited: GroupCache, adopted: dict[str, Any]) -> None:
    """Fill ``cache`` with ``inherited``'s groups and ``adopted`` (name -> ProcessGroup), checking that each
    adopted group holds exactly the ranks ``ctx`` puts this rank with; no communicator is created."""
    import torch.distributed as dist

    cache.groups.update(inherited.groups)
    for name, pg in adopted.items():
        expected = ctx.ranks(name)
        if pg is None:
            if expected:
                raise ValueError(f"group {name!r} is None but rank {ctx.rank} belongs to {expected}")
        else:
            actual = dist.get_process_group_ranks(pg)
            if list(actual) != expected:
                raise ValueError(
                    f"group {name!r} holds ranks {list(actual)}, but this layout "
                    f"({ctx.describe()}) puts rank {ctx.rank} in {expected}"
                )
        cache.groups[name] = pg


def _require_distributed(ctx: ParallelContext, name: str):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"cannot make process group {name!r}: torch.distributed is not initialized "
            f"({ctx.describe()}); build the context with ParallelContext.from_torchrun() "
            f"or call torch.distributed.init_process_group first"
        )
    if dist.get_world_size() != ctx.world_size:
        raise RuntimeError(
            f"cannot make process group {name!r}: the context describes {ctx.world_size} ranks "
            f"but torch.distributed has {dist.get_world_size()}"
        )
    return dist
