"""A Llama-style block from megatron-core layers, and its plain-PyTorch reference.

Used by the Megatron adapter tests: the sharded block (Column/RowParallelLinear
on the context's TP group) must match :func:`reference_block` on full weights.
Weights use Megatron's layouts (grouped QKV, gated fc1) so that
``parallel_bridge.spec.sharding`` moves them between TP sizes.
"""

import torch
import torch.nn.functional as F

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 64, 8, 4, 16, 128
NAMES = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


def full_weights(num_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
    shapes = {
        "input_layernorm.weight": (HIDDEN,),
        "self_attention.linear_qkv.weight": (qkv_rows, HIDDEN),
        "self_attention.linear_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "pre_mlp_layernorm.weight": (HIDDEN,),
        "mlp.linear_fc1.weight": (2 * FFN, HIDDEN),
        "mlp.linear_fc2.weight": (HIDDEN, FFN),
    }
    out = {}
    for i in range(num_layers):
        for name, shape in shapes.items():
            scale = 1.0 if len(shape) == 1 else shape[1] ** -0.5
            base = 1.0 if len(shape) == 1 else 0.0
            out[f"layers.{i}.{name}"] = base + scale * torch.randn(shape, generator=g)
    return out


def length(num_layers: int, seq: int, tokens: int = 0) -> int:
    """Terms summed along the block's path (the parity rule's ``K``): the forward's, or with ``tokens`` the
    gradients' (backward retraces the path, and weight gradients also sum over the batch's tokens)."""
    from parallel_bridge.numerics import parity
    forward = parity.reduction_length(hidden=HIDDEN, ffn=FFN, layers=num_layers, vocab=0, heads=HEADS,
                                      head_dim=HEAD_DIM, seq_len=seq) - HIDDEN  # no output layer
    return 2 * forward + tokens if tokens else forward


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attend(qkv: torch.Tensor, groups: int) -> torch.Tensor:
    """Causal GQA attention on Megatron's grouped qkv rows; [s, b, groups*(q+2)*d] -> [s, b, heads*d]."""
    s, b, _ = qkv.shape
    per = HEADS // GROUPS
    qkv = qkv.view(s, b, groups, per + 2, HEAD_DIM)
    q = qkv[:, :, :, :per].reshape(s, b, groups * per, HEAD_DIM)
    k = qkv[:, :, :, per].repeat_interleave(per, dim=2)
    v = qkv[:, :, :, per + 1].repeat_interleave(per, dim=2)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.permute(2, 0, 1, 3).reshape(s, b, groups * per * HEAD_DIM)


def reference_layer(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    h = rms_norm(x, w[prefix + "input_layernorm.weight"])
    h = attend(F.linear(h, w[prefix + "self_attention.linear_qkv.weight"]), GROUPS)
    x = x + F.linear(h, w[prefix + "self_attention.linear_proj.weight"])
    h = rms_norm(x, w[prefix + "pre_mlp_layernorm.weight"])
    gate, up = F.linear(h, w[prefix + "mlp.linear_fc1.weight"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w[prefix + "mlp.linear_fc2.weight"])


def reference_block(x: torch.Tensor, w: dict[str, torch.Tensor], layers: range) -> torch.Tensor:
    for i in layers:
        x = reference_layer(x, w, f"layers.{i}.")
    return x


class MegatronLayer(torch.nn.Module):
    """One decoder layer whose projections are megatron-core tensor-parallel linears."""

    def __init__(self, ctx, config):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        init = torch.nn.init.zeros_
        tp_group = ctx.tp_group
        self.groups_per_rank = GROUPS // ctx.tp
        qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
        self.input_layernorm = torch.nn.Parameter(torch.ones(HIDDEN))
        self.pre_mlp_layernorm = torch.nn.Parameter(torch.ones(HIDDEN))
        self.linear_qkv = ColumnParallelLinear(
            HIDDEN,
            qkv_rows,
            config=config,
            init_method=init,
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.linear_proj = RowParallelLinear(
            HEADS * HEAD_DIM,
            HIDDEN,
            config=config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.linear_fc1 = ColumnParallelLinear(
            HIDDEN,
            2 * FFN,
            config=config,
            init_method=init,
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.linear_fc2 = RowParallelLinear(
            FFN,
            HIDDEN,
            config=config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def params(self) -> dict[str, torch.nn.Parameter]:
        return dict(
            zip(
                NAMES,
                (
                    self.input_layernorm,
                    self.linear_qkv.weight,
                    self.linear_proj.weight,
                    self.pre_mlp_layernorm,
                    self.linear_fc1.weight,
                    self.linear_fc2.weight,
                ),
            )
        )

    def forward(self, x):
        h = rms_norm(x, self.input_layernorm)
        qkv, _ = self.linear_qkv(h)
        out, _ = self.linear_proj(attend(qkv, self.groups_per_rank))
        x = x + out
        h = rms_norm(x, self.pre_mlp_layernorm)
        fc1, _ = self.linear_fc1(h)
        gate, up = fc1.chunk(2, dim=-1)
        out, _ = self.linear_fc2(F.silu(gate) * up)
        return x + out
