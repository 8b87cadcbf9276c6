"""Process groups of a :class:`~parallel_bridge.parallel.context.ParallelContext`: created on first use or adopted
from whoever made them (vLLM, Megatron, a DeviceMesh), cached beside the context's value."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from parallel_bridge.errors import DistributedError, LayoutError


class RankLayout(Protocol):
    """What the groups read of a :class:`~parallel_bridge.parallel.context.ParallelContext` (so this module
    needs no import of it: the context imports its groups, not the other way round)."""

    rank: int
    world_size: int
    backend: str | None
    timeout_s: float

    def ranks(self, name: str) -> list[int]: ...

    def all_ranks(self, name: str) -> list[list[int]]: ...

    def describe(self) -> str: ...


class GroupCache:
    """Process groups of one context, shared by its copies; not part of its value."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.comms: dict[str, ParallelGroup] = {}
        """The group objects handed out by ``comm``: their rank lists are computed once."""
        self.lock = threading.Lock()


def bound_group(ctx: RankLayout, cache: GroupCache, name: str) -> dist.ProcessGroup | None:
    """``ctx``'s group ``name`` from ``cache``, created (collectively) on first use.

    A name whose rank lists equal those of a group already bound (``mp`` and ``tp``
    when pp=1, say) shares that group instead of creating a communicator.
    """
    with cache.lock:
        if name in cache.groups:
            return cache.groups[name]
        all_ranks = ctx.all_ranks(name)
        _require_distributed(ctx, name)
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


def adopt(ctx: RankLayout, cache: GroupCache, inherited: GroupCache, adopted: dict[str, Any]) -> None:
    """Fill ``cache`` with ``inherited``'s groups and ``adopted`` (name -> ProcessGroup), checking that each
    adopted group holds exactly the ranks ``ctx`` puts this rank with; no communicator is created."""
    cache.groups.update(inherited.groups)
    for name, pg in adopted.items():
        expected = ctx.ranks(name)
        if pg is None:
            if expected:
                raise LayoutError(f"group {name!r} is None but rank {ctx.rank} belongs to {expected}")
        else:
            actual = dist.get_process_group_ranks(pg)
            if list(actual) != expected:
                raise LayoutError(
                    f"group {name!r} holds ranks {list(actual)}, but this layout "
                    f"({ctx.describe()}) puts rank {ctx.rank} in {expected}"
                )
        cache.groups[name] = pg


def _require_distributed(ctx: RankLayout, name: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            f"cannot make process group {name!r}: torch.distributed is not initialized "
            f"({ctx.describe()}); build the context with context_from_torchrun() "
            f"or call torch.distributed.init_process_group first"
        )
    if dist.get_world_size() != ctx.world_size:
        raise DistributedError(
            f"cannot make process group {name!r}: the context describes {ctx.world_size} ranks "
            f"but torch.distributed has {dist.get_world_size()}"
        )


@dataclasses.dataclass(frozen=True)
class ParallelGroup:
    """One group of a context as this rank sees it: its ranks, this rank's place, and the collectives the
    project uses. Every collective returns at once, without communicating, when the group has one rank.
    The torch process group is bound on first communication (collective: see :func:`bound_group`)."""

    name: str
    ranks: tuple[int, ...]
    rank: int
    """This process's global rank."""
    _bind: Callable[[], dist.ProcessGroup | None] = dataclasses.field(repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank_in_group(self) -> int:
        """This rank's index in :attr:`ranks`."""
        return self.ranks.index(self.rank)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.size - 1

    @property
    def prev_rank(self) -> int:
        """Global rank before this one in the group (pipeline: the previous stage)."""
        if self.is_first:
            raise LayoutError(f"rank {self.rank} is first in its {self.name} group {list(self.ranks)}")
        return self.ranks[self.rank_in_group - 1]

    @property
    def next_rank(self) -> int:
        """Global rank after this one in the group (pipeline: the next stage)."""
        if self.is_last:
            raise LayoutError(f"rank {self.rank} is last in its {self.name} group {list(self.ranks)}")
        return self.ranks[self.rank_in_group + 1]

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The torch process group (bound on first use)."""
        return self._bind()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place; returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in group order (no autograd)."""
        if self.size == 1:
            return tensor
        return torch.cat(self.all_gather_list(tensor), dim=dim)

    def all_gather_list(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` as a list in group order (no autograd)."""
        if self.size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.process_group)
        return parts

    def send_next(self, tensor: torch.Tensor) -> None:
        """Send to the next rank of the group (the next pipeline stage)."""
        self._send(tensor, self.next_rank)

    def send_prev(self, tensor: torch.Tensor) -> None:
        """Send to the previous rank of the group (gradients back to the previous stage)."""
        self._send(tensor, self.prev_rank)

    def recv_prev(self, out: torch.Tensor) -> torch.Tensor:
        """Receive into ``out`` from the previous rank of the group; returns ``out``."""
        return self._recv(out, self.prev_rank)

    def recv_next(self, out: torch.Tensor) -> torch.Tensor:
        """Receive into ``out`` from the next rank of the group; returns ``out``."""
        return self._recv(out, self.next_rank)

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        dist.send(tensor.contiguous(), dst=peer, group=self.process_group)

    def _recv(self, out: torch.Tensor, peer: int) -> torch.Tensor:
        dist.recv(out, src=peer, group=self.process_group)
        return out
