"""Live weight sync for the trainer: :class:`WeightSync`.

    sync = WeightSync(ctx, model, llm)        # every trainer rank; llm: a vllm.LLM, a client, or a list of them
    for step in ...:
        train_step()
        report = sync.push()                   # every trainer rank; every engine serves the new weights

The round is :class:`~parallel_bridge.sync.protocol.RoundSender`'s; the backend (``parallel_bridge_shm`` on
one host, ``parallel_bridge_dist`` across hosts) says how the bytes travel.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from parallel_bridge.errors import SyncError
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.sync.clients import LLMClient
from parallel_bridge.sync.protocol import SyncReport
from parallel_bridge.sync.receiver import BACKEND, BACKENDS, register_weight_transfer
from parallel_bridge.sync.source import MegatronWeightSource


def _client(engine: Any) -> Any:
    return LLMClient(engine) if hasattr(engine, "llm_engine") else engine  # a vllm.LLM, or a client already


class WeightSync:
    """Push a megatron-core model's weights into running vLLM engines after each step.

    Create it on every trainer rank with the same arguments; ``llm`` is needed on trainer rank 0 only: a
    ``vllm.LLM`` started with ``weight_transfer_config=WeightTransferConfig(backend=...)``, a client with vLLM's
    weight-sync methods (:class:`~parallel_bridge.sync.clients.ServerClient` for ``vllm serve``), or a list of
    them (every engine gets every round; a round commits on all or on none). ``address`` (``parallel_bridge_dist``):
    HOST:PORT where the engines reach trainer rank 0. ``allow_nonfinite``: send NaN/Inf weights instead of
    refusing the round.
    """

    def __init__(
        self,
        ctx: ParallelContext,
        model: Any,
        llm: Any = None,
        *,
        backend: str = BACKEND,
        config: Any = None,
        vocab_size: int | None = None,
        root: str | os.PathLike | None = None,
        address: str | None = None,
        timeout_s: float = 300.0,
        allow_nonfinite: bool = False,
    ) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        if not dist.is_initialized() or dist.get_world_size() != ctx.world_size:
            have = dist.get_world_size() if dist.is_initialized() else "none"
            raise SyncError(
                f"the trainer's torch.distributed world ({have} ranks) does not match the context's "
                f"{ctx.world_size} (tp={ctx.tp} pp={ctx.pp} dp={ctx.dp}); build it with context_from_torchrun"
            )
        if ctx.rank == 0 and (llm is None or llm == []):
            raise SyncError("trainer rank 0 drives the engines: pass the vllm.LLM (or a weight-sync client, or a "
                            "list of them) there")
        if backend not in BACKENDS:
            raise SyncError(
                f"unknown weight-sync backend {backend!r}; known: {sorted(BACKENDS)} (vLLM's own GPU backends, "
                f"e.g. 'nccl', take a MegatronWeightSource directly: see the README)"
            )
        register_weight_transfer()
        engines = [_client(e) for e in (llm if isinstance(llm, (list, tuple)) else [llm] if llm is not None else [])]
        source = MegatronWeightSource(ctx, model, config=config, vocab_size=vocab_size)
        init_cls = _init_info_class(backend)
        extra = {"root": str(root or "")} if backend == BACKEND else {"address": address or ""}
        self._busy = False
        try:
            self.sender = WeightTransferTrainerFactory.trainer_init(
                init_cls(rank=ctx.rank, timeout_s=timeout_s, allow_nonfinite=allow_nonfinite, **extra),
                client=engines, source=source,
            )
        except ValueError as e:
            raise SyncError(str(e)) from e
        self.source = source

    @property
    def version(self) -> int:
        """The number of rounds committed (continuing from what the engines served when this sync attached)."""
        return self.sender.version

    def push(self) -> SyncReport:
        """Send the model's current weights (collective over the trainer ranks)."""
        if self._busy:
            raise SyncError("a push is already in progress on this rank; wait for it to return")
        self._busy = True
        try:
            return self.sender.send_weights()
        finally:
            self._busy = False

    def close(self) -> None:
        """Release the transport (collective)."""
        self.sender._barrier("close")
        self.sender.shutdown()

    def __enter__(self) -> WeightSync:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _init_info_class(backend: str) -> type:
    import importlib

    _, _, module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls).init_info_cls
