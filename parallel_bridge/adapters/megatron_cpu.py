"""Megatron's tensor-parallel code on the CPU under gloo, opt-in and scoped: :func:`cpu_compat` patches the
few CUDA-only calls for a block and restores them; :func:`model_parallel_manual_seed` seeds Megatron's RNG
tracker with the context's ranks (on CPU or GPU)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from parallel_bridge.adapters.megatron_state import import_megatron, memory_buffer
from parallel_bridge.errors import ConfigError, IntegrationError, UnknownNameError
from parallel_bridge.parallel.context import ParallelContext


class CpuRNGStatesTracker:
    """Megatron's RNG-states tracker on the CPU generator (named states, ``fork``).

    Stands in for ``CudaRNGStatesTracker`` when there is no GPU, so dropout inside
    tensor-parallel regions and ``get_cuda_rng_tracker().fork()`` work.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ConfigError(f"seed {seed} already exists")
        if name in self.states_:
            raise ConfigError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise UnknownNameError(f"rng state {name} is not added; call model_parallel_manual_seed first")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


_ABSENT = object()


def _cpu_device() -> str:
    return "cpu"


def _no_sync(device: Any = None) -> None:
    """``torch.cuda.synchronize`` without CUDA: nothing to wait for (dist_checkpointing's writer calls it)."""


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron-core's ``get_sliding_window_causal_mask``, built on the CPU (True: masked out)."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    keep = torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])
    return ~keep


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Let megatron-core's tensor-parallel code run on CPU (opt-in, scoped).

    Creates Megatron's activation buffer if missing. Without a GPU, inside this
    block: ``torch.cuda.current_device()`` (used by the
    gather / reduce-scatter mappings and the sequence-parallel buffer) answers
    ``"cpu"``, ``torch.cuda.synchronize()`` (dist_checkpointing's file writer) does
    nothing, the default causal and sliding-window masks of the unfused softmax are made on the CPU, the MoE
    router's GEMM takes torch's path (megatron-core names Transformer Engine's, which it never imported),
    ``tensor.cuda()`` returns the tensor (megatron-core moves a pipeline's tied embedding copy to the GPU
    before all-reducing it between the first and last stage), and Megatron's CUDA RNG tracker is a
    :class:`CpuRNGStatesTracker`
    (seed it with :func:`model_parallel_manual_seed`). With a GPU it does nothing:
    Megatron's own behaviour applies.
    """
    import_megatron()
    if torch.cuda.is_available():
        with memory_buffer():
            yield
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    saved = (
        torch.cuda.synchronize,
        torch.cuda.current_device,
        mrandom._CUDA_RNG_STATE_TRACKER,
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        fused_softmax.get_default_causal_mask,
        fused_softmax.get_sliding_window_causal_mask,
        moe_utils.__dict__.get("te_general_gemm", _ABSENT),
        torch.Tensor.cuda,
    )
    torch.cuda.synchronize = _no_sync
    torch.Tensor.cuda = _stay_on_cpu  # type: ignore[method-assign]
    if not moe_utils.HAVE_TE:  # the router's GEMM names Transformer Engine's te_general_gemm, never imported
        moe_utils.te_general_gemm = None
    torch.cuda.current_device = _cpu_device
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_mask
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    try:
        with memory_buffer():
            yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved[0], saved[1]
        torch.Tensor.cuda = saved[7]  # type: ignore[method-assign]
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved[2], saved[3]
        fused_softmax.get_default_causal_mask, fused_softmax.get_sliding_window_causal_mask = saved[4], saved[5]
        if saved[6] is _ABSENT:
            moe_utils.__dict__.pop("te_general_gemm", None)
        else:
            moe_utils.te_general_gemm = saved[6]


def _stay_on_cpu(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return self


def model_parallel_manual_seed(ctx: ParallelContext, seed: int) -> None:
    """Megatron's ``model_parallel_cuda_manual_seed`` with the context's ranks, on CPU or GPU.

    The same seeds as Megatron: default ``seed``, tensor-parallel ``seed+2718+tp_rank``,
    expert ``seed+1024+100*ep_rank+etp_rank``. On CPU call it inside :func:`cpu_compat`.
    """
    import_megatron()
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(
            seed, tp_rank=ctx.tp_rank, ep_rank=ctx.ep_rank, etp_rank=ctx.etp_rank, force_reset_rng=True
        )
        return
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CpuRNGStatesTracker):
        raise IntegrationError(
            "on CPU, call model_parallel_manual_seed inside parallel_bridge.adapters.megatron.cpu_compat()"
        )
    torch.manual_seed(seed)
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ctx.tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ctx.ep_rank + ctx.etp_rank)
