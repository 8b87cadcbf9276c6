"""The ``parallel_bridge_shm`` weight-transfer backend, serving side: :class:`SharedMemoryReceiver`.

The trainer's shards arrive through shared memory on the engine's own host: a round's pieces are copied
out of the mapped shard files (:class:`~parallel_bridge.sync.shards.RoundReader`), each verified against
the sender's hash as it is copied. Everything else (checks, reports, commit) is the round protocol's
(:class:`~parallel_bridge.sync.receiving.RoundReceiver`). The trainer side is
:class:`~parallel_bridge.sync.sender.SharedMemorySender`. :func:`register_weight_transfer` registers every
backend of the package with vLLM (the plugin calls it in each vLLM process).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from parallel_bridge.sync.receiving import RoundInitInfo, RoundReceiver
from parallel_bridge.sync.shards import RoundReader

logger = logging.getLogger(__name__)

BACKEND = "parallel_bridge_shm"
"""The name to select this backend: ``WeightTransferConfig(backend=BACKEND)``."""

BACKENDS = {
    BACKEND: ("parallel_bridge.sync.receiver", "SharedMemoryReceiver", "parallel_bridge.sync.sender",
              "SharedMemorySender"),
    "parallel_bridge_dist": ("parallel_bridge.sync.dist_receiver", "DistReceiver", "parallel_bridge.sync.dist_sender",
                             "DistSender"),
}
"""Every weight-transfer backend of the package: name -> (receiver module, class, sender module, class)."""


@dataclasses.dataclass
class ShmInitInfo(RoundInitInfo):
    root: str = ""
    """The session's shared-memory folder."""


class SharedMemoryReceiver(RoundReceiver):
    """Reads this rank's rows and columns of the trainer's shards from shared memory."""

    backend = BACKEND
    init_info_cls = ShmInitInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._maps: dict[str, torch.Tensor] = {}

    def _arrive(self, round_id: int) -> RoundReader:
        info = self.info
        return RoundReader(
            info.root, round_id, info.source_tp, info.source_pp, self._maps, self._pool,
            experts=tuple(info.experts) if info.experts else None,
        )

    def shutdown(self) -> None:
        super().shutdown()
        self._maps.clear()


def register_weight_transfer() -> None:
    """Register the package's backends with vLLM's engine and trainer factories (idempotent, lazy)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for name, (rmod, rcls, smod, scls) in BACKENDS.items():
        for factory, module, cls in ((WeightTransferEngineFactory, rmod, rcls), (WeightTransferTrainerFactory, smod, scls)):
            try:
                factory.register_engine(name, module, cls)
            except ValueError as e:
                if "already registered" not in str(e):
                    raise

