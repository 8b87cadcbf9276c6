"""Live weight sync: a sharded megatron-core trainer pushes its weights into a running vLLM engine.

``WeightSync(ctx, model, llm).push()`` after each optimizer step. Built on vLLM's
weight-transfer framework: the ``parallel_bridge_shm`` backend (registered by the
package's vLLM plugin) moves each serving rank exactly the rows and columns it
keeps through shared memory, verified by hashes, in rounds that commit on every
serving rank or on none. Needs vLLM (imported here).
"""

from parallel_bridge.errors import SyncError
from parallel_bridge.sync.clients import LLMClient, ServerClient
from parallel_bridge.sync.receiver import BACKEND
from parallel_bridge.sync.sender import SyncReport
from parallel_bridge.sync.source import MegatronWeightSource
from parallel_bridge.sync.trainer import WeightSync

__all__ = [
    "BACKEND",
    "LLMClient",
    "MegatronWeightSource",
    "ServerClient",
    "SyncError",
    "SyncReport",
    "WeightSync",
]
