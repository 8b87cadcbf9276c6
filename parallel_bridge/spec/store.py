"""The TensorStore: what the checkpoint readers and the weight sync's round reader share, and the one rule for
the slices a vLLM serving rank keeps of it.

A store holds one model's tensors under megatron-core's global names and reads them whole or in slices:
:class:`~parallel_bridge.checkpoint.megatron_reader.MegatronCheckpoint` (both formats),
:class:`~parallel_bridge.sync.shards.RoundReader` (a weight round in shared memory) and :class:`ShapeStore`
(shapes only, to plan a rank's parts without reading). :func:`rank_parts` walks the schema and asks each
kind's sharding for the rank's slice, so every store is served the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from parallel_bridge.errors import UnknownTensorError
from parallel_bridge.spec import schema, sharding
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.tp_split import serving_split


@runtime_checkable
class TensorStore(Protocol):
    """One model's tensors under megatron-core names, read whole or by slice."""

    config: GPTConfig

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``."""
        ...

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The full tensor ``name``, or ``length`` entries from ``start`` along ``dim``."""
        ...

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        """Concatenated row ranges ``[(start, length), ...]`` of ``name``."""
        ...


class ShapeStore:
    """A store of meta tensors: what :func:`rank_parts` would read, shapes only."""

    def __init__(self, config: GPTConfig) -> None:
        self.config, self._shapes = config, schema.expected_shapes(config)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise UnknownTensorError(f"tensor {name} is not one a model of this config has")
        return self._shapes[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        shape = list(self.shape(name))
        if dim is not None:
            shape[dim] = shape[dim] - start if length is None else length
        return torch.empty(shape, device="meta")

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        return torch.cat([self.read(name, 0, s, n) for s, n in index])


VOCAB_PARAMS = frozenset(k.vllm for k in schema.LLAMA_CORE if k.sharding is sharding.VOCAB)
"""vLLM's vocabulary-parallel parameters: real rows first, vLLM's own padding after them."""


def rank_parts(
    store: TensorStore, tp: int, rank: int, vocab_range: tuple[int, int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors vLLM's own model of the store's family keeps on TP rank ``rank``, under vLLM's names,
    read slice by slice as each kind's sharding says: only what the rank keeps is read. ``vocab_range`` is
    the rank's [start, end) of real vocabulary rows (vLLM pads the vocabulary its own way)."""
    spec = store.config
    serving_split(spec, tp)
    if vocab_range is None:
        per = -(-spec.vocab_size // tp)
        vocab_range = (min(rank * per, spec.vocab_size), min((rank + 1) * per, spec.vocab_size))
    for name, kind, layer in schema.tensors(spec):
        yield kind.name("vllm", layer), kind.sharding.vllm_slice(store, name, spec, tp, rank, vocab_range)
