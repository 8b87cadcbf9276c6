"""parallel_bridge: one model definition across Megatron-core / DeepSpeed training and vLLM serving.

``import parallel_bridge`` needs torch alone; each integration lives in
``parallel_bridge.adapters`` and imports its library when first used.
"""

from parallel_bridge.parallel.context import GROUP_NAMES, GroupName, ParallelContext
from parallel_bridge.parallel.groups import ParallelGroup
from parallel_bridge.parallel.launch import context_from_device_mesh, context_from_torchrun, device_mesh_of
from parallel_bridge.parallel.layout import MEGATRON_ORDER, VLLM_ORDER, Axis
from parallel_bridge.serving.registry import register_model
from parallel_bridge.spec.model import GPTConfig

__all__ = [
    "GPTConfig",
    "GROUP_NAMES",
    "MEGATRON_ORDER",
    "VLLM_ORDER",
    "Axis",
    "GroupName",
    "ParallelContext",
    "ParallelGroup",
    "__version__",
    "context_from_device_mesh",
    "context_from_torchrun",
    "device_mesh_of",
    "register_model",
]
__version__ = "0.1.0"
