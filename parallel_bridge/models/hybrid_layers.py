"""The layers HybridLlama is built of: megatron-core column/row-parallel linears on the context's TP group,
RMSNorm, grouped-QKV self-attention around TrainableAttention, the SwiGLU MLP, the decoder and the
vocab-parallel embedding. Parameter names are megatron-core GPTModel's; the kernels they run on are the
:mod:`~parallel_bridge.models.kernels` backend the model was built with."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel_bridge.models.attention import TrainableAttention
from parallel_bridge.models.kernels import Kernels
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec.sharding import GroupedQKV

if TYPE_CHECKING:
    from parallel_bridge.spec.model import GPTConfig


INIT = functools.partial(nn.init.normal_, std=0.02)


@dataclasses.dataclass(frozen=True)
class Build:
    """What every layer is built from: the model's sizes, the layout, megatron-core's parallel config,
    the kernels backend, and vLLM's config when serving (None in training)."""

    spec: GPTConfig
    ctx: ParallelContext
    mcfg: Any
    kernels: Kernels
    vllm_config: Any = None

    def column(self, n_in: int, n_out: int) -> nn.Module:
        """A megatron-core column-parallel linear (no bias, output left sharded) on the context's TP group."""
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return ColumnParallelLinear(
            n_in, n_out, config=self.mcfg, init_method=INIT, bias=False, gather_output=False, tp_group=self.ctx.tp_group
        )

    def row(self, n_in: int, n_out: int) -> nn.Module:
        """A megatron-core row-parallel linear (no bias, input already sharded) on the context's TP group."""
        from megatron.core.tensor_parallel import RowParallelLinear

        return RowParallelLinear(
            n_in, n_out, config=self.mcfg, init_method=INIT, bias=False, input_is_parallel=True,
            skip_bias_add=False, tp_group=self.ctx.tp_group,
        )

    def norm(self) -> nn.Module:
        """The backend's RMSNorm over the hidden size."""
        return self.kernels.norm(self.spec.hidden_size, self.spec.norm_epsilon, self.mcfg.params_dtype)


class SelfAttention(nn.Module):
    """Grouped QKV projection (column-parallel), trainable attention, output projection (row-parallel)."""

    def __init__(self, b: Build, index: int, prefix: str) -> None:
        super().__init__()
        spec, d = b.spec, b.spec.head_dim
        self.kernels = b.kernels
        attention = TrainableAttention(
            spec.num_attention_heads,
            spec.num_query_groups,
            d,
            layer_index=index,
            ctx=b.ctx,
            rope_theta=spec.rotary_base,
            max_positions=spec.max_position_embeddings,
            vllm_config=b.vllm_config,
            prefix=f"{prefix}.core_attention",
        )
        heads, kv = attention.num_heads, attention.num_kv_heads  # this rank's
        self.linear_qkv = b.column(spec.hidden_size, b.ctx.tp * (heads + 2 * kv) * d)
        self.core_attention = attention
        self.linear_proj = b.row(spec.num_attention_heads * d, spec.hidden_size)
        self.qkv = GroupedQKV(heads, kv, d)  # this rank's heads and groups

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = self.qkv.unfuse_features(self.kernels.linear(self.linear_qkv, x, reduce=False))
        out = self.core_attention(q, k, v, positions, cu_seqlens)
        return self.kernels.linear(self.linear_proj, out, reduce=True)


class MLP(nn.Module):
    """SwiGLU: fc1 holds [gate ; up] per rank (column-parallel), fc2 row-parallel."""

    def __init__(self, b: Build) -> None:
        super().__init__()
        self.kernels = b.kernels
        self.linear_fc1 = b.column(b.spec.hidden_size, 2 * b.spec.ffn_hidden_size)
        self.linear_fc2 = b.row(b.spec.ffn_hidden_size, b.spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.kernels.linear(self.linear_fc1, x, reduce=False).chunk(2, dim=-1)
        return self.kernels.linear(self.linear_fc2, F.silu(gate) * up, reduce=True)


class DecoderLayer(nn.Module):
    def __init__(self, b: Build, index: int, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = b.norm()
        self.self_attention = SelfAttention(b, index, f"{prefix}.self_attention")
        self.pre_mlp_layernorm = b.norm()
        self.mlp = MLP(b)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), positions, cu_seqlens)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, b: Build, prefix: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(b, i, f"{prefix}.layers.{i}") for i in range(b.spec.num_layers)
        )
        self.final_layernorm = b.norm()


class Embedding(nn.Module):
    def __init__(self, b: Build, padded_vocab: int) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, b.spec.hidden_size, init_method=INIT, config=b.mcfg, tp_group=b.ctx.tp_group
        )
