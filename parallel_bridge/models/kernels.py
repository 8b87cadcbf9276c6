"""The kernels a hybrid model runs on, chosen once when it is built and passed to its layers.

- :class:`TrainingKernels`: megatron-core's column/row-parallel forward (autograd, its all-reduce on
  the context's TP group) and a plain RMSNorm.
- :class:`ServingKernels` (inside vLLM): vLLM's GEMM dispatch (oneDNN with a prepacked weight on the
  CPU, the platform's GEMM on a GPU), vLLM's TP all-reduce and vLLM's RMSNorm, over the same weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from parallel_bridge.parallel.context import ParallelContext


class RMSNorm(nn.Module):
    """RMSNorm with a ``weight`` (replicated across TP ranks)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Kernels(Protocol):
    """What a hybrid layer asks of its backend."""

    def linear(self, layer: nn.Module, x: torch.Tensor, reduce: bool) -> torch.Tensor:
        """A megatron-core column/row-parallel ``layer`` on ``x`` [tokens, in]; ``reduce``: sum the
        row-parallel partial outputs over TP."""
        ...

    def vocab_logits(self, layer: nn.Module | None, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits (``layer`` is None for tied embeddings)."""
        ...

    def norm(self, size: int, eps: float, dtype: torch.dtype) -> nn.Module:
        """An RMSNorm module with a ``weight`` parameter."""
        ...

    def weight_loaded(self, layer: nn.Module) -> None:
        """Called after ``layer``'s weight changed (a kernel may hold a packed copy)."""
        ...


class TrainingKernels:
    """megatron-core's layers as they are: autograd, communication on the context's TP group."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    def linear(self, layer: nn.Module, x: torch.Tensor, reduce: bool) -> torch.Tensor:
        return layer(x.unsqueeze(1))[0].squeeze(1)

    def vocab_logits(self, layer: nn.Module | None, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp > 1:  # identity forward, all-reduce of the gradient
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.ctx.tp_group)
        return F.linear(hidden, weight)

    def norm(self, size: int, eps: float, dtype: torch.dtype) -> nn.Module:
        return RMSNorm(size, eps, dtype)

    def weight_loaded(self, layer: nn.Module) -> None:
        return None


class ServingKernels:
    """vLLM's kernels inside an engine: its GEMM dispatch, its TP all-reduce, its RMSNorm (no autograd)."""

    def __init__(self, ctx: ParallelContext) -> None:
        from vllm.model_executor.layers.utils import dispatch_unquantized_gemm
        from vllm.platforms import current_platform

        self.tp = ctx.tp
        self.on_cpu = current_platform.is_cpu()
        self.gemm = dispatch_unquantized_gemm()

    def linear(self, layer: nn.Module, x: torch.Tensor, reduce: bool) -> torch.Tensor:
        if self.on_cpu and not hasattr(layer, "cpu_linear"):
            self.weight_loaded(layer)
        y = self.gemm(layer, x, layer.weight, None)
        if reduce and self.tp > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(y)
        return y

    def vocab_logits(self, layer: nn.Module | None, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight) if layer is None else self.linear(layer, hidden, reduce=False)

    def norm(self, size: int, eps: float, dtype: torch.dtype) -> nn.Module:
        from vllm.model_executor.layers.layernorm import RMSNorm as VllmRMSNorm

        return VllmRMSNorm(size, eps=eps, dtype=dtype)

    def weight_loaded(self, layer: nn.Module) -> None:
        """On the CPU, let vLLM pick and prepack its GEMM for the new weight (``layer.cpu_linear``)."""
        if self.on_cpu:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


def kernels_for(ctx: ParallelContext, serving: bool) -> Kernels:
    """The backend of a model built for serving inside vLLM, or for training."""
    return ServingKernels(ctx) if serving else TrainingKernels(ctx)
