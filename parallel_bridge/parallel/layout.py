"""Rank layouts as data: which global ranks form each process group.

Pure functions over integers, no torch.distributed: the same arithmetic that
Megatron's ``RankGenerator`` and vLLM's ``initialize_model_parallel`` perform, so
a layout can be checked at any world size without starting a process.

An *order* lists the parallel axes from the fastest-varying (adjacent ranks) to
the slowest, e.g. Megatron's default ``"tp-cp-ep-dp-pp"``: ranks 0 and 1 differ
in their tensor-parallel coordinate, and the pipeline stage changes last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum

from parallel_bridge.errors import LayoutError


class Axis(StrEnum):
    """A parallel axis; its value is the name orders and DeviceMesh dims use."""

    TP = "tp"
    CP = "cp"
    EP = "ep"
    DP = "dp"
    PP = "pp"


AXES: tuple[str, ...] = tuple(a.value for a in Axis)
"""The axis names an order may use, in megatron-core's default order."""

MEGATRON_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default ``order`` argument of ``initialize_model_parallel``."""

VLLM_ORDER = "tp-cp-pp-dp"
"""vLLM's world layout ``DP x PP x PCP x TP`` (TP fastest), written as an order."""


def parse_order(order: str) -> tuple[str, ...]:
    """Split an order string into axis names, checking each name once and known."""
    if not isinstance(order, str) or not order.strip():
        raise LayoutError(f"order must be a non-empty string like {MEGATRON_ORDER!r}, got {order!r}")
    tokens = tuple(order.strip().lower().split("-"))
    unknown = [t for t in tokens if t not in AXES]
    if unknown:
        raise LayoutError(
            f"order {order!r} names unknown axes {unknown}; use '-'-separated names from {list(AXES)}"
        )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise LayoutError(f"order {order!r} names {repeated} more than once")
    return tokens


def complete_order(order: str, sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The order with unnamed size-1 axes appended, as Megatron's RankGenerator does.

    An axis of size > 1 that the order leaves out is an error: its place in the
    rank numbering would be undefined.
    """
    tokens = parse_order(order)
    for axis in sizes:
        if axis not in AXES:
            raise LayoutError(f"unknown axis {axis!r}; known axes are {list(AXES)}")
    missing = [a for a in AXES if a not in tokens and sizes.get(a, 1) != 1]
    if missing:
        raise LayoutError(
            f"order {order!r} leaves out {missing}, whose sizes are "
            f"{[sizes[a] for a in missing]}; add them to the order"
        )
    return tokens + tuple(a for a in AXES if a not in tokens)


def _unravel(index: int, dims: Sequence[int]) -> list[int]:
    coords = []
    for d in dims:
        coords.append(index % d)
        index //= d
    return coords


def _strides(dims: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for d in dims:
        strides.append(acc)
        acc *= d
    return strides


def rank_groups(sizes: Mapping[str, int], order: str, axes: str | Sequence[str]) -> list[list[int]]:
    """All groups spanning ``axes`` (e.g. ``"tp"`` or ``"dp-cp"``), in Megatron's enumeration.

    Groups are numbered by the coordinates of the other axes (first in the order
    varying fastest); inside a group ranks are numbered the same way over
    ``axes``. World size is the product of ``sizes``.
    """
    tokens = complete_order(order, sizes)
    wanted = parse_order(axes) if isinstance(axes, str) else tuple(axes)
    for a in wanted:
        if a not in AXES:
            raise LayoutError(f"unknown axis {a!r}; known axes are {list(AXES)}")
    dims = [int(sizes.get(t, 1)) for t in tokens]
    strides = _strides(dims)
    inside = [i for i, t in enumerate(tokens) if t in wanted]
    outside = [i for i, t in enumerate(tokens) if t not in wanted]
    in_dims = [dims[i] for i in inside]
    out_dims = [dims[i] for i in outside]
    groups = []
    for g in range(math.prod(out_dims)):
        base = sum(c * strides[i] for c, i in zip(_unravel(g, out_dims), outside))
        groups.append(
            [
                base + sum(c * strides[i] for c, i in zip(_unravel(r, in_dims), inside))
                for r in range(math.prod(in_dims))
            ]
        )
    return groups


def coordinates(rank: int, sizes: Mapping[str, int], order: str) -> dict[str, int]:
    """This rank's coordinate on every axis of the order."""
    tokens = complete_order(order, sizes)
    dims = [int(sizes.get(t, 1)) for t in tokens]
    world = math.prod(dims)
    if not 0 <= rank < world:
        raise LayoutError(f"rank {rank} is outside the world of {world} ranks")
    return dict(zip(tokens, _unravel(rank, dims)))


def ceil_div(n: int, d: int) -> int:
    """``n / d`` rounded up (rows per rank of ``n`` rows over ``d`` ranks)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (padded vocabularies, aligned offsets)."""
    return ceil_div(n, multiple) * multiple
