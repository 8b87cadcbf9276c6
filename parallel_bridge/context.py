"""ParallelContext: one immutable value describing a job's parallel layout.

It holds the degrees (tp, pp, dp, cp, ep, expert-tp), this rank, the rank order,
and the process groups of every axis, created lazily or adopted from whoever owns
them (vLLM, Megatron, a DeviceMesh). Every adapter in ``parallel_bridge.adapters``
reads the layout from here, so Megatron, DeepSpeed and vLLM layers talk over the
same groups.

Group names follow megatron-core's ``ProcessGroupCollection`` fields:
``tp, pp, dp, cp, mp (tp x pp), tp_cp, dp_cp, tp_dp, tp_dp_cp, embd, pos_embd``
and, for expert layers, ``ep, expt_tp, expt_dp, tp_ep, tp_ep_pp``; ``world`` is
every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from parallel_bridge import layout

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

# name -> (which rank generator, axes it spans). "dense" numbers ranks with the
# degrees of the attention/dense layers; "expert" with those of the expert layers
# (tp -> etp, dp -> expert data parallel, no cp), as megatron-core does.
_GROUP_AXES: dict[str, tuple[str, str]] = {
    "tp": ("dense", "tp"),
    "pp": ("dense", "pp"),
    "dp": ("dense", "dp"),
    "cp": ("dense", "cp"),
    "mp": ("dense", "tp-pp"),
    "tp_cp": ("dense", "tp-cp"),
    "dp_cp": ("dense", "dp-cp"),
    "tp_dp": ("dense", "tp-dp"),
    "tp_dp_cp": ("dense", "tp-dp-cp"),
    "ep": ("expert", "ep"),
    "expt_tp": ("expert", "tp"),
    "expt_dp": ("expert", "dp"),
    "tp_ep": ("expert", "tp-ep"),
    "tp_ep_pp": ("expert", "tp-ep-pp"),
}
GROUP_NAMES: tuple[str, ...] = (*_GROUP_AXES, "embd", "pos_embd", "world")
"""Every group name :meth:`ParallelContext.group` accepts."""

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class _GroupCache:
    """Process groups of one context, shared by its copies; not part of its value."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.lock = threading.Lock()


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
    """Rank order, fastest axis first (see :mod:`parallel_bridge.layout`)."""
    backend: str | None = None
    """torch.distributed backend for groups this context creates (None: the default group's)."""
    timeout_s: float = 600.0
    """Timeout of collectives on groups this context creates: a dead rank raises, not hangs."""
    _cache: _GroupCache = dataclasses.field(
        default_factory=_GroupCache, compare=False, repr=False, hash=False
    )

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "ep", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        for name in ("tp", "pp", "dp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank {self.rank} is outside the world of {self.world_size} ranks "
                f"(tp={self.tp} x cp={self.cp} x dp={self.dp} x pp={self.pp})"
            )
        if self.backend is not None and (not isinstance(self.backend, str) or not self.backend):
            raise TypeError(f"backend must be a torch.distributed backend name like 'gloo' or 'nccl', got {self.backend!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
            raise TypeError(f"timeout_s must be a number of seconds, got {self.timeout_s!r} ({type(self.timeout_s).__name__})")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        object.__setattr__(self, "order", "-".join(layout.complete_order(self.order, self._sizes("dense"))))
        expert_block = self.etp * self.ep * self.pp
        if self.world_size % expert_block:
            raise ValueError(
                f"expert layout does not fit: etp={self.etp} x ep={self.ep} x pp={self.pp} = "
                f"{expert_block} does not divide the world size {self.world_size}"
            )
        layout.complete_order(self.order, self._sizes("expert"))
        if self.all_ranks("pp") != self._groups_of("expert", "pp"):
            raise ValueError(
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

    @property
    def tp_rank(self) -> int:
        """This rank's tensor-parallel coordinate."""
        return self._coords["tp"]

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self._coords["pp"]

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate."""
        return self._coords["dp"]

    @property
    def cp_rank(self) -> int:
        """This rank's context-parallel coordinate."""
        return self._coords["cp"]

    @property
    def ep_rank(self) -> int:
        """This rank's expert-parallel coordinate."""
        return self._coords["ep"]

    @property
    def etp_rank(self) -> int:
        """This rank's expert tensor-parallel coordinate."""
        return self._coords["etp"]

    @property
    def expert_dp_rank(self) -> int:
        """This rank's expert data-parallel coordinate."""
        return self._coords["expt_dp"]

    @property
    def is_first_pp_stage(self) -> bool:
        """True on the first pipeline stage (which holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        """True on the last pipeline stage (which holds the output layer)."""
        return self.pp_rank == self.pp - 1

    # The accessor names of the original ParallelContext design (vLLM RFC #28326).
    def get_tensor_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_parallel_world_size(self) -> int:
        return self.tp

    def get_pipeline_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_parallel_world_size(self) -> int:
        return self.pp

    def get_data_parallel_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

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
        raise KeyError(f"unknown group {name!r}; known groups are {list(GROUP_NAMES)}")

    def ranks(self, name: str) -> list[int]:
        """The global ranks of this rank's group ``name`` (empty for embd/pos_embd it is not in)."""
        for ranks in self.all_ranks(name):
            if self.rank in ranks:
                return ranks
        return []

    # -------------------------------------------------------- process groups
    def group(self, name: str) -> dist.ProcessGroup | None:
        """This rank's process group ``name``, adopted or created on first use.

        Creating a kind of group is collective: every rank of the world must ask
        for the same names in the same order, as with ``torch.distributed.new_group``.
        A name whose rank lists equal those of a group already bound (``mp`` and
        ``tp`` when pp=1, say) shares that group instead of creating a communicator.
        Returns None for ``embd``/``pos_embd`` on ranks outside those groups.
        """
        cache = self._cache
        with cache.lock:
            if name in cache.groups:
                return cache.groups[name]
            all_ranks = self.all_ranks(name)
            dist = _require_distributed(self, name)
            for other, pg in cache.groups.items():  # same ranks as a bound group: share it
                if self.all_ranks(other) == all_ranks:
                    cache.groups[name] = pg
                    return pg
            if name == "world":
                pg = dist.group.WORLD
            else:
                pg = None
                for ranks in all_ranks:
                    created = dist.new_group(
                        ranks, timeout=timedelta(seconds=self.timeout_s), backend=self.backend
                    )
                    if self.rank in ranks:
                        pg = created
            cache.groups[name] = pg
            return pg

    def init_groups(self, names: tuple[str, ...] | None = None) -> ParallelContext:
        """Create all (or the named) groups now, in a fixed order; collective. Returns self."""
        for name in names or GROUP_NAMES:
            self.group(name)
        return self

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """Tensor-parallel group (collective on first use)."""
        return self.group("tp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        """Pipeline-parallel group (collective on first use)."""
        return self.group("pp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """Data-parallel group (collective on first use)."""
        return self.group("dp")

    @property
    def cp_group(self) -> dist.ProcessGroup:
        """Context-parallel group (collective on first use)."""
        return self.group("cp")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        """Expert-parallel group (collective on first use)."""
        return self.group("ep")

    def with_groups(self, groups: dict[str, Any]) -> ParallelContext:
        """A copy of this context that uses ``groups`` (name -> ProcessGroup) made by someone else.

        Each group's ranks must equal this context's rank list for it; no new
        communicator is created for an adopted name.
        """
        import torch.distributed as dist

        fresh = dataclasses.replace(self, _cache=_GroupCache())
        fresh._cache.groups.update(self._cache.groups)
        for name, pg in groups.items():
            expected = self.ranks(name)
            if pg is None:
                if expected:
                    raise ValueError(f"group {name!r} is None but rank {self.rank} belongs to {expected}")
            else:
                actual = dist.get_process_group_ranks(pg)
                if list(actual) != expected:
                    raise ValueError(
                        f"group {name!r} holds ranks {list(actual)}, but this layout "
                        f"({self.describe()}) puts rank {self.rank} in {expected}"
                    )
            fresh._cache.groups[name] = pg
        return fresh

    @property
    def adopted_groups(self) -> tuple[str, ...]:
        """Names of groups already bound (adopted or created)."""
        return tuple(self._cache.groups)

    # ---------------------------------------------------------- constructors
    @classmethod
    def single_process(cls) -> ParallelContext:
        """World of one: every degree and coordinate 1/0; needs nothing initialized."""
        return cls()

    @classmethod
    def from_torchrun(
        cls,
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
        values = {}
        for var in _TORCHRUN_VARS:
            raw = env.get(var)
            if raw is None:
                raise RuntimeError(
                    f"environment variable {var} is not set: run under torchrun "
                    f"(torchrun --nproc-per-node N script.py) or set {', '.join(_TORCHRUN_VARS)}"
                )
            try:
                values[var] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None
        world, rank = values["WORLD_SIZE"], values["RANK"]
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
        model = tp * pp * cp
        if dp is None:
            if model < 1 or world % model:
                raise ValueError(f"tp={tp} x pp={pp} x cp={cp} = {model} does not divide WORLD_SIZE={world}")
            dp = world // model
        elif model * dp != world:
            raise ValueError(f"tp={tp} x pp={pp} x cp={cp} x dp={dp} = {model * dp} but WORLD_SIZE={world}")
        ctx = cls(
            tp=tp,
            pp=pp,
            dp=dp,
            cp=cp,
            ep=ep,
            etp=etp,
            rank=rank,
            order=order,
            backend=backend,
            timeout_s=timeout_s,
        )
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in env:
                    raise RuntimeError(f"environment variable {var} is not set: run under torchrun")
            default = "nccl" if torch.cuda.is_available() else "gloo"
            kwargs = {}
            if default == "nccl":
                torch.cuda.set_device(values["LOCAL_RANK"])
                kwargs["device_id"] = torch.device("cuda", values["LOCAL_RANK"])
            dist.init_process_group(
                backend=backend or default,
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
                **kwargs,
            )
            logger.info("initialized %s process group: rank %d of %d", backend or default, rank, world)
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is initialized with rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but RANK={rank} WORLD_SIZE={world}"
            )
        return ctx

    @classmethod
    def from_device_mesh(cls, mesh: DeviceMesh, **kwargs: Any) -> ParallelContext:
        """Build from a DeviceMesh whose dim names are axes (``tp``, ``dp``, ...), adopting its groups.

        The mesh must number ranks contiguously (``arange(world).reshape(shape)``),
        last dim fastest, as ``init_device_mesh`` does.
        """
        import torch

        names = mesh.mesh_dim_names
        if not names:
            raise ValueError("the DeviceMesh has no mesh_dim_names; name its dims from tp, cp, dp, pp")
        unknown = [n for n in names if n not in ("tp", "cp", "dp", "pp")]
        if unknown:
            raise ValueError(f"DeviceMesh dims {unknown} are not axes; use names from tp, cp, dp, pp")
        grid = mesh.mesh
        if not torch.equal(grid.flatten().cpu(), torch.arange(grid.numel())):
            raise ValueError(
                "the DeviceMesh does not number ranks contiguously; build it with init_device_mesh"
            )
        degrees = dict(zip(names, grid.shape))
        ctx = cls(
            **{k: int(v) for k, v in degrees.items()},
            rank=mesh.get_rank(),
            order="-".join(reversed(names)),
            **kwargs,
        )
        return ctx.with_groups({n: mesh.get_group(n) for n in names})

    def to_device_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """A DeviceMesh over the dense axes of size > 1 (slowest first); collective."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh

        tokens = [t for t in self.order.split("-") if t != "ep"]
        names = [t for t in reversed(tokens) if getattr(self, t) > 1] or ["dp"]
        shape = tuple(getattr(self, n) for n in names)
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        return init_device_mesh(device_type, shape, mesh_dim_names=tuple(names))

    @classmethod
    def from_megatron(cls, **kwargs: Any) -> ParallelContext:
        """Build from an initialized ``megatron.core.parallel_state``, adopting its groups."""
        from parallel_bridge.adapters.megatron import context_from_megatron

        return context_from_megatron(**kwargs)

    @classmethod
    def from_vllm(cls, **kwargs: Any) -> ParallelContext:
        """Build from vLLM's parallel state (defaults to world 1 when it is not initialized)."""
        from parallel_bridge.adapters.vllm import context_from_vllm

        return context_from_vllm(**kwargs)

    @classmethod
    def from_deepspeed(cls, **kwargs: Any) -> ParallelContext:
        """Build from the groups DeepSpeed set up itself (``deepspeed.utils.groups``), adopting them."""
        from parallel_bridge.adapters.deepspeed import context_from_deepspeed

        return context_from_deepspeed(**kwargs)

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
            raise ValueError(f"unknown ParallelContext fields {unknown}; known: {sorted(known)}")
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
