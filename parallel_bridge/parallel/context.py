"""ParallelContext: one immutable value describing a job's parallel layout.

It holds the degrees (tp, pp, dp, cp, ep, expert-tp), this rank, the rank order,
and the process groups of every axis, created lazily or adopted from whoever owns
them (vLLM, Megatron, a DeviceMesh). Every adapter in ``parallel_bridge.adapters``
reads the layout from here, so Megatron, DeepSpeed and vLLM layers talk over the
same groups. Contexts are built where a job starts (:mod:`parallel_bridge.parallel.launch`:
torchrun, a DeviceMesh) or by the adapter of whoever owns the groups
(``context_from_megatron``, ``context_from_vllm``, ``context_from_deepspeed``).

Group names follow megatron-core's ``ProcessGroupCollection`` fields:
``tp, pp, dp, cp, mp (tp x pp), tp_cp, dp_cp, tp_dp, tp_dp_cp, embd, pos_embd``
and, for expert layers, ``ep, expt_tp, expt_dp, tp_ep, tp_ep_pp``; ``world`` is
every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

from parallel_bridge.errors import LayoutError, UnknownNameError, WrongTypeError
from parallel_bridge.parallel import groups as _groups
from parallel_bridge.parallel import layout

if TYPE_CHECKING:
    import torch.distributed as dist

logger = logging.getLogger(__name__)


class GroupName(StrEnum):
    """The groups a context has; the values are megatron-core's ``ProcessGroupCollection`` field names."""

    TP = "tp"
    PP = "pp"
    DP = "dp"
    CP = "cp"
    MP = "mp"
    TP_CP = "tp_cp"
    DP_CP = "dp_cp"
    TP_DP = "tp_dp"
    TP_DP_CP = "tp_dp_cp"
    EP = "ep"
    EXPT_TP = "expt_tp"
    EXPT_DP = "expt_dp"
    TP_EP = "tp_ep"
    TP_EP_PP = "tp_ep_pp"
    EMBD = "embd"
    POS_EMBD = "pos_embd"
    WORLD = "world"


# group -> (which rank generator, axes it spans). "dense" numbers ranks with the degrees of the
# attention/dense layers; "expert" with those of the expert layers (tp -> etp, dp -> expert data
# parallel, no cp), as megatron-core does. embd, pos_embd and world are derived from pp and the world.
_GROUP_AXES: dict[str, tuple[str, str]] = {
    GroupName.TP: ("dense", "tp"),
    GroupName.PP: ("dense", "pp"),
    GroupName.DP: ("dense", "dp"),
    GroupName.CP: ("dense", "cp"),
    GroupName.MP: ("dense", "tp-pp"),
    GroupName.TP_CP: ("dense", "tp-cp"),
    GroupName.DP_CP: ("dense", "dp-cp"),
    GroupName.TP_DP: ("dense", "tp-dp"),
    GroupName.TP_DP_CP: ("dense", "tp-dp-cp"),
    GroupName.EP: ("expert", "ep"),
    GroupName.EXPT_TP: ("expert", "tp"),
    GroupName.EXPT_DP: ("expert", "dp"),
    GroupName.TP_EP: ("expert", "tp-ep"),
    GroupName.TP_EP_PP: ("expert", "tp-ep-pp"),
}
GROUP_NAMES: tuple[str, ...] = tuple(g.value for g in GroupName)
"""Every group name :meth:`ParallelContext.group` accepts."""


def _coordinate(axis: str, doc: str) -> property:
    """A read-only property: this rank's coordinate on ``axis``."""
    return property(lambda self: self._coords[axis], doc=doc)


def _group(name: str, doc: str) -> property:
    """A read-only property: the process group ``name`` (collective on first use)."""
    return property(lambda self: self.group(name), doc=doc)


def _alias(attribute: str) -> Callable[[Any], int]:
    """A method returning ``attribute`` (the accessor names other code bases call)."""
    return lambda self: getattr(self, attribute)


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """The parallel layout of a job and this rank's place in it.

    The world size is ``tp * cp * dp * pp``; expert parallelism re-partitions the
    same ranks as ``etp * ep * expert_dp * pp`` (Megatron's rule), so ``ep`` does
    not multiply the world size.
    """

    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    dp: int = 1
    """Data-parallel degree (replicas of the dense layers)."""
    cp: int = 1
    """Context-parallel degree (sequence split across ranks in attention)."""
    ep: int = 1
    """Expert-parallel degree (experts split across ranks)."""
    etp: int | None = None
    """Expert tensor-parallel degree; ``None`` means the same as ``tp``."""
    rank: int = 0
    """This process's global rank."""
    order: str = layout.MEGATRON_ORDER
    """Rank order, fastest axis first (see :mod:`parallel_bridge.parallel.layout`)."""
    backend: str | None = None
    """torch.distributed backend for groups this context creates (None: the default group's)."""
    timeout_s: float = 600.0
    """Timeout of collectives on groups this context creates: a dead rank raises, not hangs."""
    _cache: _groups.GroupCache = dataclasses.field(
        default_factory=_groups.GroupCache, compare=False, repr=False, hash=False
    )

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "ep", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise WrongTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        for name in ("tp", "pp", "dp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise LayoutError(
                f"rank {self.rank} is outside the world of {self.world_size} ranks "
                f"(tp={self.tp} x cp={self.cp} x dp={self.dp} x pp={self.pp})"
            )
        if self.backend is not None and (not isinstance(self.backend, str) or not self.backend):
            raise WrongTypeError(f"backend must be a torch.distributed backend name like 'gloo' or 'nccl', got {self.backend!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
            raise WrongTypeError(f"timeout_s must be a number of seconds, got {self.timeout_s!r} ({type(self.timeout_s).__name__})")
        if not self.timeout_s > 0:
            raise LayoutError(f"timeout_s must be positive, got {self.timeout_s}")
        object.__setattr__(self, "order", "-".join(layout.complete_order(self.order, self._sizes("dense"))))
        expert_block = self.etp * self.ep * self.pp
        if self.world_size % expert_block:
            raise LayoutError(
                f"expert layout does not fit: etp={self.etp} x ep={self.ep} x pp={self.pp} = "
                f"{expert_block} does not divide the world size {self.world_size}"
            )
        layout.complete_order(self.order, self._sizes("expert"))
        if self.all_ranks("pp") != self._groups_of("expert", "pp"):
            raise LayoutError(
                f"order {self.order!r} puts pipeline stages on different ranks for the expert "
                f"layers (etp={self.etp}, ep={self.ep}) than for the dense ones; put 'pp' last"
            )

    # ---------------------------------------------------------------- sizes
    @property
    def world_size(self) -> int:
        """Number of ranks: tp * cp * dp * pp."""
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_dp(self) -> int:
        """Data-parallel degree of the expert layers: world / (etp * ep * pp)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    def _sizes(self, kind: str) -> dict[str, int]:
        if kind == "dense":
            return {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp}
        return {"tp": self.etp, "cp": 1, "ep": self.ep, "dp": self.expert_dp, "pp": self.pp}

    # ---------------------------------------------------------- coordinates
    @cached_property
    def _coords(self) -> dict[str, int]:
        dense = layout.coordinates(self.rank, self._sizes("dense"), self.order)
        expert = layout.coordinates(self.rank, self._sizes("expert"), self.order)
        return {
            "tp": dense["tp"],
            "cp": dense["cp"],
            "dp": dense["dp"],
            "pp": dense["pp"],
            "ep": expert["ep"],
            "etp": expert["tp"],
            "expt_dp": expert["dp"],
        }

    tp_rank = _coordinate("tp", "This rank's tensor-parallel coordinate.")
    pp_rank = _coordinate("pp", "This rank's pipeline stage.")
    dp_rank = _coordinate("dp", "This rank's data-parallel coordinate.")
    cp_rank = _coordinate("cp", "This rank's context-parallel coordinate.")
    ep_rank = _coordinate("ep", "This rank's expert-parallel coordinate.")
    etp_rank = _coordinate("etp", "This rank's expert tensor-parallel coordinate.")
    expert_dp_rank = _coordinate("expt_dp", "This rank's expert data-parallel coordinate.")

    is_first_pp_stage = property(lambda self: self.pp_rank == 0, doc="True on the first stage (embedding).")
    is_last_pp_stage = property(lambda self: self.pp_rank == self.pp - 1, doc="True on the last stage (output).")

    # The accessor names of the original ParallelContext design (vLLM RFC #28326), kept for its users.
    get_tensor_parallel_rank = _alias("tp_rank")
    get_tensor_parallel_world_size = _alias("tp")
    get_pipeline_parallel_rank = _alias("pp_rank")
    get_pipeline_parallel_world_size = _alias("pp")
    get_data_parallel_size = _alias("dp")
    get_data_parallel_rank = _alias("dp_rank")

    # ------------------------------------------------------------ rank lists
    def _groups_of(self, kind: str, axes: str) -> list[list[int]]:
        return layout.rank_groups(self._sizes(kind), self.order, axes)

    def all_ranks(self, name: str) -> list[list[int]]:
        """Every group of kind ``name`` as lists of global ranks (no torch.distributed needed)."""
        if name in _GROUP_AXES:
            kind, axes = _GROUP_AXES[name]
            return self._groups_of(kind, axes)
        if name == "embd":
            return [sorted({g[0], g[-1]}) for g in self.all_ranks("pp")]
        if name == "pos_embd":
            return [[g[0]] for g in self.all_ranks("pp")]
        if name == "world":
            return [list(range(self.world_size))]
        raise UnknownNameError(f"unknown group {name!r}; known groups are {list(GROUP_NAMES)}")

    def ranks(self, name: str) -> list[int]:
        """The global ranks of this rank's group ``name`` (empty for embd/pos_embd it is not in)."""
        for ranks in self.all_ranks(name):
            if self.rank in ranks:
                return ranks
        return []

    # -------------------------------------------------------- process groups
    def group(self, name: str) -> dist.ProcessGroup | None:
        """This rank's process group ``name``, adopted or created on first use (collective: every rank
        asks for the same names in the same order); see :func:`parallel_bridge.parallel.groups.bound_group`.
        Returns None for ``embd``/``pos_embd`` on ranks outside those groups."""
        return _groups.bound_group(self, self._cache, name)

    def comm(self, name: str) -> _groups.ParallelGroup:
        """This rank's group ``name`` as an object carrying its ranks and collectives
        (:class:`~parallel_bridge.parallel.groups.ParallelGroup`); the process group is bound on first communication."""
        comm = self._cache.comms.get(name)
        if comm is None:
            ranks = self.ranks(name)
            if not ranks:
                raise LayoutError(f"rank {self.rank} is in no {name!r} group ({self.describe()})")
            comm = self._cache.comms[name] = _groups.ParallelGroup(
                name, tuple(ranks), self.rank, functools.partial(self.group, name)
            )
        return comm

    tp_group = _group("tp", "Tensor-parallel process group (collective on first use).")
    pp_group = _group("pp", "Pipeline-parallel process group (collective on first use).")
    dp_group = _group("dp", "Data-parallel process group (collective on first use).")
    cp_group = _group("cp", "Context-parallel process group (collective on first use).")
    ep_group = _group("ep", "Expert-parallel process group (collective on first use).")

    def with_groups(self, groups: dict[str, Any]) -> ParallelContext:
        """A copy of this context that uses ``groups`` (name -> ProcessGroup) made by someone else; each
        group's ranks must equal this context's rank list for it."""
        fresh = dataclasses.replace(self, _cache=_groups.GroupCache())
        _groups.adopt(fresh, fresh._cache, self._cache, groups)
        return fresh

    @property
    def adopted_groups(self) -> tuple[str, ...]:
        """Names of groups already bound (adopted or created)."""
        return tuple(self._cache.groups)

    @classmethod
    def single_process(cls) -> ParallelContext:
        """World of one: every degree and coordinate 1/0; needs nothing initialized."""
        return cls()

    # --------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """The layout as plain data (no process groups)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelContext:
        """Rebuild from :meth:`to_dict`; groups are created again on first use."""
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayoutError(f"unknown ParallelContext fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ParallelContext:
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        """One line: degrees, order and coordinates."""
        return (
            f"rank {self.rank}/{self.world_size} tp={self.tp} pp={self.pp} dp={self.dp} cp={self.cp} "
            f"ep={self.ep} etp={self.etp} order={self.order} "
            f"(tp_rank={self.tp_rank} pp_rank={self.pp_rank} dp_rank={self.dp_rank} "
            f"cp_rank={self.cp_rank} ep_rank={self.ep_rank})"
        )


def context_matching(
    degrees: dict[str, int], rank: int, ranks: dict[str, list[int]], axes: list[str], timeout_s: float
) -> ParallelContext | None:
    """The context of ``degrees`` on ``rank`` whose rank lists equal ``ranks`` (group name -> this rank's
    group, as another library made it), trying every order of ``axes``; None when no order matches. How an
    adapter recovers the rank order of groups it did not create."""
    import itertools

    for perm in itertools.permutations(axes):
        try:
            ctx = ParallelContext(**degrees, rank=rank, order="-".join(perm), timeout_s=timeout_s)
        except LayoutError:
            continue
        if all(ctx.ranks(n) == r for n, r in ranks.items()):
            return ctx
    return None
