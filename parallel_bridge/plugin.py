"""vLLM plugin (``vllm.general_plugins`` entry point): registrations in every vLLM process.

vLLM runs :func:`register` in the API server, the engine core, each TP worker
and each Ray worker. It registers the package's own models and the ``megatron``
load and config formats and the ``parallel_bridge_shm`` weight-transfer backend, then imports the
modules named in ``PARALLEL_BRIDGE_MODELS`` (comma-separated; ``register_model``
adds its caller's module there) and the ``parallel_bridge.models`` entry points of
installed packages, whose import-time ``register_model`` calls then run here too.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points

from parallel_bridge.errors import MissingDependencyError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "parallel_bridge.models"


def register() -> None:
    """Register parallel_bridge's models and the user's in this process (idempotent)."""
    import vllm

    from parallel_bridge.adapters.vllm import check_vllm_version
    from parallel_bridge.models.hybrid_llama import ARCHITECTURE, build_for_vllm
    from parallel_bridge.serving.megatron_format import register_vllm_formats
    from parallel_bridge.serving.registry import MODULES_ENV, register_model
    from parallel_bridge.sync.receiver import register_weight_transfer

    check_vllm_version(vllm.__version__)
    register_model(ARCHITECTURE, build_for_vllm)
    register_vllm_formats()
    register_weight_transfer()
    for module in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise MissingDependencyError(
                f"{MODULES_ENV} names module {module!r}, which this vLLM process cannot import ({e}); "
                "make it importable here (PYTHONPATH) or remove it"
            ) from e
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
