"""vLLM engines started from this process: in the same process for TP=1, with this process's model
registrations reaching vLLM's other processes, shut down on exit."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from parallel_bridge.serving.registry import exported_to_vllm_processes

logger = logging.getLogger(__name__)


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


def cpu_thread_binding(tp: int) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` CPU workers: each its own block of this machine's
    cores (``0-3|4-7``), or one core each when there are fewer cores than two per worker (vLLM's default
    auto-binding fails on small machines)."""
    cores = os.cpu_count() or 1
    per = max(1, cores // tp)
    return "|".join(f"{r * per}-{r * per + per - 1}" if per > 1 else str(r % cores) for r in range(tp))


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
    processes vLLM starts (:func:`~parallel_bridge.serving.registry.exported_to_vllm_processes`), an engine asked
    for float32 is checked to compute in float32 in every worker (through a vLLM ``worker_extension_cls``
    unless the caller gives its own)
    (:func:`~parallel_bridge.adapters.vllm_numerics.check_fp32`), and its engine core (and TP workers) are
    shut down on exit, so the next engine in the same process starts clean."""
    from vllm import LLM

    from parallel_bridge.adapters import vllm_numerics, vllm_routing

    kwargs.setdefault("worker_extension_cls", vllm_numerics.EXTENSION)
    with exported_to_vllm_processes():
        llm = LLM(**kwargs)
    try:
        if kwargs["worker_extension_cls"] in (vllm_numerics.EXTENSION, vllm_routing.EXTENSION):  # both check
            checked_fp32(llm, kwargs.get("dtype"))
        else:
            logger.warning("worker_extension_cls=%s: the engine's float32 check is skipped", kwargs["worker_extension_cls"])
        yield llm
    finally:
        shutdown(llm)


def checked_fp32(llm: Any, dtype: Any) -> None:
    """For an engine built with ``dtype`` float32: refuse one whose workers compute otherwise, and log what
    they compute with."""
    from parallel_bridge.adapters import vllm_numerics

    if str(dtype).removeprefix("torch.") in ("float32", "float"):
        logger.info("vLLM engine: %s", vllm_numerics.describe(vllm_numerics.check_fp32(llm)))


def shutdown(llm: Any) -> None:
    """Stop an engine's core and workers now (vLLM otherwise waits for the garbage collector)."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def describe_engine(llm: Any) -> str:
    """One line naming what a running engine computes with (worker 0): attention backend, GEMM, dtypes,
    kernel library."""
    from parallel_bridge.adapters import vllm_numerics

    return "vLLM engine: " + vllm_numerics.describe(vllm_numerics.engine_numerics(llm)[0])
