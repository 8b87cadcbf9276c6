"""Models registered at import time for the vLLM bridge tests: one per kind of target.

vLLM's engine core and TP workers import this module again (through the
package's vLLM plugin and PARALLEL_BRIDGE_MODELS), which re-runs these
registrations there.
"""

import json
import os
from pathlib import Path

from parallel_bridge import register_model
from parallel_bridge.models.hybrid_llama import HybridLlama
from parallel_bridge.spec.model import GPTConfig

PROBE_DIR_ENV = "PB_TEST_PROBE_DIR"


def _config(vllm_config):
    return GPTConfig.from_hf(vllm_config.model_config.hf_config)


class ProbeHybrid(HybridLlama):
    """A model class built as cls(vllm_config, parallel_context); records the context it saw."""

    def __init__(self, vllm_config, parallel_context):
        super().__init__(
            _config(vllm_config),
            parallel_context,
            vllm_config=vllm_config,
            params_dtype=vllm_config.model_config.dtype,
        )
        folder = os.environ.get(PROBE_DIR_ENV)
        if folder:
            seen = {
                "tp_rank": parallel_context.get_tensor_parallel_rank(),
                "tp_size": parallel_context.get_tensor_parallel_world_size(),
                "pid": os.getpid(),
            }
            Path(folder, f"rank{parallel_context.tp_rank}.json").write_text(json.dumps(seen))


def hybrid_factory(vllm_config, parallel_context):
    """A plain factory function, named by a 'module:attr' string."""
    return HybridLlama(
        _config(vllm_config),
        parallel_context,
        vllm_config=vllm_config,
        params_dtype=vllm_config.model_config.dtype,
    )


register_model("PBTestClass", ProbeHybrid)
register_model(
    "PBTestLambda",
    lambda vc, ctx: HybridLlama(_config(vc), ctx, vllm_config=vc, params_dtype=vc.model_config.dtype),
)
register_model("PBTestString", "_bridge_models:hybrid_factory")
