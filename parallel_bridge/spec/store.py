"""The TensorStore: what the checkpoint readers and the weight sync's round reader share.

A store holds one model's tensors under megatron-core's global names and reads them whole or in slices:
:class:`~parallel_bridge.checkpoint.megatron_reader.MegatronCheckpoint` (both formats),
:class:`~parallel_bridge.sync.shards.RoundReader` (a weight round in shared memory) and :class:`~parallel_bridge.spec.slices.ShapeStore`
(shapes only; :mod:`~parallel_bridge.spec.slices`). :func:`~parallel_bridge.spec.slices.rank_parts` walks
the schema and asks each kind's sharding for a serving rank's slice of a store, so every store is served the
same way.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorStore(Protocol):
    """One model's tensors under megatron-core names, read whole or by slice."""

    config: Any
    """The model's :class:`~parallel_bridge.spec.model.GPTConfig`."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``."""
        ...

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The full tensor ``name``, or ``length`` entries from ``start`` along ``dim``."""
        ...

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        """Concatenated row ranges ``[(start, length), ...]`` of ``name``."""
        ...
