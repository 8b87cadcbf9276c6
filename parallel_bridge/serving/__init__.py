"""Serving in vLLM: engines started from this process, model registration in vLLM's processes, and the
``megatron`` load and config formats."""

from parallel_bridge.serving.engines import (
    describe_engine,
    environment_defaults,
    in_process_engine,
    llm_engine,
    shutdown,
)

__all__ = ["describe_engine", "environment_defaults", "in_process_engine", "llm_engine", "shutdown"]
