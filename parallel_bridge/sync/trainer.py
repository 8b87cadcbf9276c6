"""Live weight sync for the trainer: :class:`WeightSync`.

    sync = WeightSync(ctx, model, llm)        # every trainer rank; llm: vllm.LLM or an HTTP client
    for step in ...:
        train_step()
        report = sync.push()                   # every trainer rank; the engine serves the new weights

The round itself is :class:`~parallel_bridge.sync.sender.SharedMemorySender`'s (vLLM's trainer
weight-transfer engine of the ``parallel_bridge_shm`` backend).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from parallel_bridge.errors import SyncError
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.sync.clients import LLMClient
from parallel_bridge.sync.receiver import BACKEND, register_weight_transfer
from parallel_bridge.sync.sender import ShmTrainerInitInfo, SyncReport
from parallel_bridge.sync.source import MegatronWeightSource


class WeightSync:
    """Push a megatron-core model's weights into a running vLLM engine after each step.

    Create it on every trainer rank with the same arguments; ``llm`` is needed on
    trainer rank 0 only (a ``vllm.LLM`` started with ``weight_transfer_config=
    WeightTransferConfig(backend="parallel_bridge_shm")``, or any client with vLLM's
    weight-sync methods, e.g. ``HTTPVLLMWeightSyncClient`` for ``vllm serve``).
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
        timeout_s: float = 300.0,
    ) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        if not dist.is_initialized() or dist.get_world_size() != ctx.world_size:
            have = dist.get_world_size() if dist.is_initialized() else "none"
            raise SyncError(
                f"the trainer's torch.distributed world ({have} ranks) does not match the context's "
                f"{ctx.world_size} (tp={ctx.tp} pp={ctx.pp} dp={ctx.dp}); build it with context_from_torchrun"
            )
        if ctx.rank == 0 and llm is None:
            raise SyncError("trainer rank 0 drives the engine: pass the vllm.LLM (or a weight-sync client) there")
        register_weight_transfer()
        client = LLMClient(llm) if llm is not None and hasattr(llm, "llm_engine") else llm  # a vllm.LLM here
        source = MegatronWeightSource(ctx, model, config=config, vocab_size=vocab_size)
        if backend != BACKEND:
            raise SyncError(
                f"unknown weight-sync backend {backend!r}; known: [{BACKEND!r}] (vLLM's own GPU backends, "
                f"e.g. 'nccl', take a MegatronWeightSource directly: see the README)"
            )
        self._busy = False
        try:
            self.sender = WeightTransferTrainerFactory.trainer_init(
                ShmTrainerInitInfo(rank=ctx.rank, root=str(root or ""), timeout_s=timeout_s), client=client, source=source
            )
        except ValueError as e:
            raise SyncError(str(e)) from e
        self.source = source

    @property
    def version(self) -> int:
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
        """Remove the shared-memory files (collective)."""
        self.sender._barrier("close")
        self.sender.shutdown()

    def __enter__(self) -> WeightSync:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

