"""megatron-core's MoE routing, recorded or replayed for one forward (routing replay, R3).

megatron-core 0.16 builds a ``RouterReplay`` into every router of a model configured with
``moe_enable_routing_replay=True``; its top-k then either records the indices it chose (``RECORD``) or takes
given ones (``REPLAY_FORWARD``: the scores of the given experts are gathered and normalized as the router's
own would be, so gradients still reach the router). Its static controls act on every router ever built in the
process; these scopes act on one model's routers only and leave them as they found them (no action, no
indices). Routes cross the boundary as ``[batch, seq, layers, k]`` expert ids; megatron-core's tokens are
``[seq, batch]``-major, which the scopes translate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from parallel_bridge.errors import BridgeError


class ReplayError(BridgeError):
    """A model cannot record or replay routes as asked; the message says why and what to do."""


def routers(model: Any) -> list[Any]:
    """The model's MoE routers in layer order, each with its ``RouterReplay`` (refused by name without one)."""
    found = [m for m in model.modules() if hasattr(m, "router_replay") and hasattr(m, "topk")]
    if not found:
        raise ReplayError("the model has no MoE router: routing replay needs an MoE policy")
    if any(r.router_replay is None for r in found):
        raise ReplayError("the model's routers have no RouterReplay: build it with moe_enable_routing_replay=True")
    if getattr(found[0].config, "sequence_parallel", False):
        raise ReplayError("routing replay with sequence parallelism: each TP rank routes its own sequence shard, "
                          "which these scopes do not split; train without sequence_parallel")
    return found


@contextlib.contextmanager
def recorded_routes(model: Any, batch: int) -> Iterator[list[torch.Tensor]]:
    """A scope whose forward records the model's own top-k: on exit the list holds ``[batch, seq, layers, k]``
    expert ids (sorted per token)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    box: list[torch.Tensor] = []
    found = routers(model)
    for r in found:
        r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield box
        recorded = [r.router_replay.get_recorded_indices() for r in found]
        if any(x is None for x in recorded):
            raise ReplayError("a router recorded nothing: run the model's forward inside the scope")
        box.append(torch.stack([_batch_major(x, batch) for x in recorded], dim=2).sort(dim=-1).values)
    finally:
        _reset(found)


@contextlib.contextmanager
def replayed_routes(model: Any, routes: torch.Tensor) -> Iterator[None]:
    """A scope whose forward (and backward, no recomputation) routes each token to the experts given,
    ``routes`` ``[batch, seq, layers, k]``, instead of the router's own top-k."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    found = routers(model)
    batch, seq, layers, k = routes.shape
    if layers != len(found) or k != found[0].topk:
        raise ReplayError(f"routes for {layers} layers of top-{k}; the model has {len(found)} MoE layers of "
                          f"top-{found[0].topk}")
    experts = found[0].config.num_moe_experts
    if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= experts):
        raise ReplayError(f"routes name experts {int(routes.min())}..{int(routes.max())}; the model has {experts}")
    for layer, r in enumerate(found):
        r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        r.router_replay.set_target_indices(routes[:, :, layer].transpose(0, 1).reshape(seq * batch, k).long())
    try:
        yield
    finally:
        _reset(found)


def _batch_major(indices: torch.Tensor, batch: int) -> torch.Tensor:
    """megatron-core's ``[seq * batch, k]`` (seq-major) as ``[batch, seq, k]``."""
    return indices.reshape(-1, batch, indices.shape[-1]).transpose(0, 1)


def _reset(found: list[Any]) -> None:
    for r in found:
        r.router_replay.clear_indices()
        r.router_replay.clear_router_replay_action()


def disagreement(own: torch.Tensor, given: torch.Tensor, real: torch.Tensor) -> tuple[int, int]:
    """(routes that differ, routes compared): (token, layer) pairs among ``real`` ``[batch, seq]`` positions
    whose expert sets differ between ``own`` and ``given`` (both ``[batch, seq, layers, k]``, sorted)."""
    differ = (own.sort(dim=-1).values != given.sort(dim=-1).values).any(dim=-1)  # [batch, seq, layers]
    return int(differ[real].sum()), int(real.sum()) * own.shape[2]
