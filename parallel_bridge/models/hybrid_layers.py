"""The layers HybridLlama is built of: megatron-core column/row-parallel linears on the context's TP group,
RMSNorm, grouped-QKV self-attention around TrainableAttention, the SwiGLU MLP, the decoder and the
vocab-parallel embedding. Parameter names are megatron-core GPTModel's."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel_bridge.adapters.vllm import serving_all_reduce
from parallel_bridge.attention import TrainableAttention, heads_per_rank
from parallel_bridge.context import ParallelContext

if TYPE_CHECKING:
    from parallel_bridge.models.hybrid_llama import HybridLlamaConfig


def apply_linear(layer: nn.Module, x: torch.Tensor, reduce: bool) -> torch.Tensor:
    """A Megatron column/row-parallel layer on [tokens, in]: Megatron's forward, or, when
    serving on CPU, vLLM's GEMM kernel plus (row-parallel) vLLM's all-reduce."""
    fast = getattr(layer, "serving_linear", None)
    if fast is None:
        return layer(x.unsqueeze(1))[0].squeeze(1)
    y = fast(x)
    if reduce and layer.serving_tp > 1:
        y = serving_all_reduce(y)
    return y


INIT = functools.partial(nn.init.normal_, std=0.02)


def column(ctx: ParallelContext, mcfg: Any, n_in: int, n_out: int) -> nn.Module:
    """A megatron-core column-parallel linear (no bias, output left sharded) on the context's TP group."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear(
        n_in, n_out, config=mcfg, init_method=INIT, bias=False, gather_output=False, tp_group=ctx.tp_group
    )


def row(ctx: ParallelContext, mcfg: Any, n_in: int, n_out: int) -> nn.Module:
    """A megatron-core row-parallel linear (no bias, input already sharded) on the context's TP group."""
    from megatron.core.tensor_parallel import RowParallelLinear

    return RowParallelLinear(
        n_in,
        n_out,
        config=mcfg,
        init_method=INIT,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=ctx.tp_group,
    )


class RMSNorm(nn.Module):
    """RMSNorm with a ``weight`` (replicated across TP ranks)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def norm(size: int, eps: float, dtype: torch.dtype, serving: bool) -> nn.Module:
    """RMSNorm: vLLM's (its kernel, the same ``weight``) inside an engine, this module's in training."""
    if serving:
        from vllm.model_executor.layers.layernorm import RMSNorm as VllmRMSNorm

        return VllmRMSNorm(size, eps=eps, dtype=dtype)
    return RMSNorm(size, eps, dtype)


class SelfAttention(nn.Module):
    """Grouped QKV projection (column-parallel), trainable attention, output projection (row-parallel)."""

    def __init__(
        self,
        cfg: HybridLlamaConfig,
        ctx: ParallelContext,
        mcfg: Any,
        index: int,
        vllm_config: Any,
        prefix: str,
    ) -> None:
        super().__init__()
        heads, kv = heads_per_rank(cfg.num_attention_heads, cfg.num_key_value_heads, ctx.tp)
        d = cfg.head_dim
        self.linear_qkv = column(ctx, mcfg, cfg.hidden_size, ctx.tp * (heads + 2 * kv) * d)
        self.core_attention = TrainableAttention(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            d,
            layer_index=index,
            ctx=ctx,
            rope_theta=cfg.rope_theta,
            max_positions=cfg.max_position_embeddings,
            vllm_config=vllm_config,
            prefix=f"{prefix}.core_attention",
        )
        self.linear_proj = row(ctx, mcfg, cfg.num_attention_heads * d, cfg.hidden_size)
        self.groups, self.per_group, self.head_dim = kv, heads // kv, d

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        qkv = apply_linear(self.linear_qkv, x, reduce=False)
        t = qkv.shape[0]
        grouped = qkv.view(t, self.groups, self.per_group + 2, self.head_dim)
        q = grouped[:, :, : self.per_group].reshape(t, -1)
        k = grouped[:, :, self.per_group].reshape(t, -1)
        v = grouped[:, :, self.per_group + 1].reshape(t, -1)
        out = self.core_attention(q, k, v, positions, cu_seqlens)
        return apply_linear(self.linear_proj, out, reduce=True)


class MLP(nn.Module):
    """SwiGLU: fc1 holds [gate ; up] per rank (column-parallel), fc2 row-parallel."""

    def __init__(self, cfg: HybridLlamaConfig, ctx: ParallelContext, mcfg: Any) -> None:
        super().__init__()
        self.linear_fc1 = column(ctx, mcfg, cfg.hidden_size, 2 * cfg.intermediate_size)
        self.linear_fc2 = row(ctx, mcfg, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = apply_linear(self.linear_fc1, x, reduce=False).chunk(2, dim=-1)
        return apply_linear(self.linear_fc2, F.silu(gate) * up, reduce=True)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: HybridLlamaConfig,
        ctx: ParallelContext,
        mcfg: Any,
        index: int,
        vllm_config: Any,
        prefix: str,
    ) -> None:
        super().__init__()
        dtype = mcfg.params_dtype
        serving = vllm_config is not None
        self.input_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps, dtype, serving)
        self.self_attention = SelfAttention(cfg, ctx, mcfg, index, vllm_config, f"{prefix}.self_attention")
        self.pre_mlp_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps, dtype, serving)
        self.mlp = MLP(cfg, ctx, mcfg)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), positions, cu_seqlens)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg, ctx, mcfg, vllm_config, prefix: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, ctx, mcfg, i, vllm_config, f"{prefix}.layers.{i}")
            for i in range(cfg.num_hidden_layers)
        )
        self.final_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps, mcfg.params_dtype, vllm_config is not None)


class Embedding(nn.Module):
    def __init__(self, cfg, ctx, mcfg, padded_vocab: int) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab,
            cfg.hidden_size,
            init_method=INIT,
            config=mcfg,
            tp_group=ctx.tp_group,
        )
