"""TrainableAttention: one causal GQA attention module for training and for vLLM serving.

Built in a training job it runs with autograd on packed variable-length
sequences (``cu_seqlens``): flash-attn's varlen kernel when installed and on GPU,
else torch's ``varlen_attn`` on GPU, else ``scaled_dot_product_attention`` per
sequence. Built inside a vLLM engine (``vllm_config`` given) it owns a vLLM
``Attention`` layer and serves through the paged KV cache. Both modes apply the
same rotary embedding (Llama's rotate-half convention) from token positions, and
the module has no weights of its own: the projections around it are what train.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel_bridge.errors import LayoutError
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec.tp_split import heads_per_rank

logger = logging.getLogger(__name__)


def rotary_table(length: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of every position below ``length``: [length, 2, head_dim / 2] (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.stack([freqs.cos(), freqs.sin()], dim=1)


def rotary(
    x: torch.Tensor, positions: torch.Tensor, head_dim: int, theta: float, table: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face Llama / vLLM neox style) on ``x`` of shape [tokens, heads, head_dim].

    The plain reference (any dtype, float64 too); ``table`` (from :func:`rotary_table`) is used when it
    covers the positions. Training uses the fused :func:`apply_rotary`, pinned to this in the tests.
    """
    if table is None or table.device != x.device or int(positions.max()) >= table.shape[0]:
        table = rotary_table(int(positions.max()) + 1, head_dim, theta, x.device)
    cs = table[positions]
    cos, sin = cs[:, 0, None, :], cs[:, 1, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x1 cos - x2 sin ; x2 cos + x1 sin] written straight into the output's halves (no temporaries)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward: the gradient is the inverse rotation (sin negated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, -sin), None, None


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fused rotate-half RoPE on ``x`` [tokens, heads, head_dim] from a :func:`rotary_table` that covers
    every position (no host synchronisation: the table is indexed on the device). fp32 math."""
    cs = table[positions]
    cos, sin = cs[:, 0, None, :], cs[:, 1, None, :]
    if x.dtype == torch.float32:
        return _Rotary.apply(x, cos, sin)
    return _Rotary.apply(x.float(), cos, sin).to(x.dtype)


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Causal attention over packed sequences; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. Differentiable."""
    if q.is_cuda:
        flash = _flash_attn_varlen()
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if flash is not None:
            return flash(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None:
            return varlen_attn(
                q,
                k,
                v,
                cu,
                cu,
                max_seqlen,
                max_seqlen,
                scale=scale,
                window_size=(-1, 0),
                enable_gqa=q.shape[1] != k.shape[1],
            )
    bounds = cu_seqlens.tolist()
    lengths = {e - s for s, e in zip(bounds[:-1], bounds[1:])}
    gqa = q.shape[1] != k.shape[1]
    if len(lengths) == 1:  # equal lengths: one batched call on [B, H, S, D] views
        n = lengths.pop()
        qb, kb, vb = (t.view(-1, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(q.shape)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [1, H, S, D] views: SDPA's fused CPU kernel takes 4-D inputs (3-D ones fall back to the math path)
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def cpu_supported_head_sizes() -> list[int] | None:
    """Head sizes vLLM's CPU attention backend supports, or None when it is not installed."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


class TrainableAttention(nn.Module):
    """Causal GQA attention with RoPE; trains with autograd, serves with vLLM's paged KV cache.

    ``num_heads``/``num_kv_heads`` are model totals; each TP rank of ``ctx``
    handles its share. ``layer_index`` names the vLLM layer (``{prefix}``
    must hold exactly that one integer, as vLLM requires).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        layer_index: int,
        ctx: ParallelContext | None = None,
        rope_theta: float = 10000.0,
        max_positions: int = 4096,
        vllm_config: Any = None,
        prefix: str | None = None,
    ) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        self.num_heads, self.num_kv_heads = heads_per_rank(num_heads, num_kv_heads, ctx.tp)
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.rope_theta = rope_theta
        self.max_positions = max_positions
        self.layer_index = layer_index
        self._rope: torch.Tensor | None = None  # cos/sin of every position, built once per device
        self.vllm_attn = self.vllm_rope = None
        if vllm_config is not None:
            from vllm.model_executor.layers.rotary_embedding import get_rope

            self.vllm_attn = self._make_vllm_attention(vllm_config, prefix or f"layers.{layer_index}.attn")
            # vLLM's own rotary (same rotate-half math, its kernel; cached per shape by vLLM)
            self.vllm_rope = get_rope(
                head_dim,
                max_position=max_positions,
                is_neox_style=True,
                rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
            )

    def _make_vllm_attention(self, vllm_config: Any, prefix: str):
        from vllm.model_executor.layers.attention import Attention
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            supported = cpu_supported_head_sizes()
            if supported is not None and self.head_dim not in supported:
                raise LayoutError(
                    f"head_dim={self.head_dim} is not supported by vLLM's CPU attention backend; "
                    f"supported head sizes are {supported}"
                )
        digits = [int(t) for t in prefix.replace(".", " ").split() if t.isdigit()]
        if digits != [self.layer_index]:
            raise LayoutError(
                f"vLLM attention prefix {prefix!r} must contain exactly the layer index {self.layer_index}"
            )
        return Attention(
            self.num_heads,
            self.head_dim,
            self.scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=prefix,
        )

    @property
    def serving(self) -> bool:
        """True when built inside vLLM (paged KV cache); False in a training job."""
        return self.vllm_attn is not None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, heads*D], k/v [T, kv_heads*D] (this rank's heads, tokens packed) -> [T, heads*D].

        ``cu_seqlens`` (training) marks where each packed sequence starts; None
        means one sequence. Serving ignores it: vLLM's metadata knows the batch.
        """
        t = q.shape[0]
        if self.vllm_attn is not None:
            q, k = self.vllm_rope(positions, q, k)
            return self.vllm_attn(q, k, v.contiguous())
        if self._rope is None or self._rope.device != q.device:
            self._rope = rotary_table(self.max_positions, self.head_dim, self.rope_theta, q.device)
        q = apply_rotary(q.view(t, self.num_heads, self.head_dim), positions, self._rope)
        k = apply_rotary(k.view(t, self.num_kv_heads, self.head_dim), positions, self._rope)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, t], dtype=torch.int32)
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return varlen_causal_attention(q, k, v, cu_seqlens, max_len, self.scale).reshape(t, -1)
