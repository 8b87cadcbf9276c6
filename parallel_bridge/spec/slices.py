"""The one rule for the slices a vLLM serving rank keeps of a model: :func:`rank_parts` over any
:class:`~parallel_bridge.spec.store.TensorStore`, each kind's sharding choosing the rows and columns; and
:class:`ShapeStore`, a store of shapes only, to plan a rank's parts without reading anything."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from parallel_bridge.errors import UnknownTensorError
from parallel_bridge.parallel.layout import ceil_div
from parallel_bridge.spec import schema, sharding
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.store import TensorStore
from parallel_bridge.spec.tp_split import experts_per_rank, serving_split


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
    store: TensorStore, tp: int, rank: int, vocab_range: tuple[int, int] | None = None,
    ep: tuple[int, int] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors vLLM's own model of the store's family keeps on TP rank ``rank``, under vLLM's names,
    read slice by slice as each kind's sharding says: only what the rank keeps is read. ``vocab_range`` is
    the rank's [start, end) of real vocabulary rows (vLLM pads the vocabulary its own way). A layer's experts
    come stacked (``experts.w13_weight [experts, ...]``), each expert sliced as its kind's sharding says; with
    ``ep`` = (EP size, EP rank) (vLLM's expert parallelism) the rank keeps its contiguous block of whole experts."""
    spec = store.config
    serving_split(spec, tp)
    if vocab_range is None:
        per = ceil_div(spec.vocab_size, tp)
        vocab_range = (min(rank * per, spec.vocab_size), min((rank + 1) * per, spec.vocab_size))
    for name, kind, layer in schema.tensors(spec):
        if not kind.per_expert:
            yield kind.name("vllm", layer), kind.sharding.vllm_slice(store, name, spec, tp, rank, vocab_range)
        elif name == kind.name("megatron", layer, 0):  # vLLM stacks the layer's experts in one parameter
            experts, etp, erank = _experts_of(spec, tp, rank, ep)
            parts = [kind.sharding.vllm_slice(store, kind.name("megatron", layer, e), spec, etp, erank, vocab_range)
                     for e in experts]
            yield kind.name("vllm", layer), torch.stack(parts)


def _experts_of(spec: GPTConfig, tp: int, rank: int, ep: tuple[int, int] | None) -> tuple[range, int, int]:
    """(the experts a serving rank keeps, the TP degree and rank they are split at)."""
    if ep is None:
        return range(spec.num_moe_experts), tp, rank
    per = experts_per_rank(spec.num_moe_experts, ep[0])
    return range(ep[1] * per, (ep[1] + 1) * per), 1, 0
