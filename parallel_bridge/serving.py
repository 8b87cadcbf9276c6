"""vLLM engines started from this process: in the same process for TP=1, with this process's model
registrations reaching vLLM's other processes, shut down on exit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from parallel_bridge.registry import exported_to_vllm_processes


@contextlib.contextmanager
def environment_defaults(values: dict[str, str]) -> Iterator[None]:
    """A scope in which each variable of ``values`` the user has not set holds that value (vLLM reads its
    settings from the environment when an engine starts); those variables are removed on exit."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def in_process_engine(tp: int) -> contextlib.AbstractContextManager[None]:
    """A scope in which a TP=1 ``vllm.LLM`` runs in this process (vLLM's ``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
    no spawned engine core, ~3 s to start instead of ~22 s on the CPU. Only for a process that has not
    initialized torch.distributed itself (vLLM would take that world as its own)."""
    if tp != 1:
        return contextlib.nullcontext()
    return environment_defaults({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


@contextlib.contextmanager
def llm_engine(**kwargs: Any) -> Iterator[Any]:
    """A ``vllm.LLM`` for a ``with`` block: the models this process registered are registered in the
    processes vLLM starts (:func:`~parallel_bridge.registry.exported_to_vllm_processes`), and its engine
    core (and TP workers) are shut down on exit, so the next engine in the same process starts clean."""
    import gc

    from vllm import LLM

    with exported_to_vllm_processes():
        llm = LLM(**kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
