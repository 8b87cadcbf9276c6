"""Live weight sync: a sharded megatron-core trainer pushes its weights into running vLLM engines.

``WeightSync(ctx, model, llm).push()`` after each optimizer step. Built on vLLM's
weight-transfer framework, with two backends registered by the package's vLLM plugin:
``parallel_bridge_shm`` (shared memory, trainer and engine on one host) and
``parallel_bridge_dist`` (torch.distributed point to point, across hosts). Each moves
every serving rank exactly the rows and columns it keeps, verified by hashes, in rounds
that commit on every serving rank of every engine or on none. Needs vLLM (imported here).
"""

from parallel_bridge.errors import SyncError
from parallel_bridge.sync.clients import LLMClient, ServerClient
from parallel_bridge.sync.protocol import SyncReport
from parallel_bridge.sync.receiver import BACKEND, BACKENDS
from parallel_bridge.sync.source import MegatronWeightSource
from parallel_bridge.sync.trainer import WeightSync

DIST_BACKEND = "parallel_bridge_dist"
"""The cross-host backend: ``WeightTransferConfig(backend=DIST_BACKEND)``, ``WeightSync(..., backend=DIST_BACKEND,
address="HOST:PORT")``."""

__all__ = [
    "BACKEND",
    "BACKENDS",
    "DIST_BACKEND",
    "LLMClient",
    "MegatronWeightSource",
    "ServerClient",
    "SyncError",
    "SyncReport",
    "WeightSync",
]
