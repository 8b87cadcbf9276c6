"""The GPU lane (``make test-gpu``): the same behaviour on CUDA that the CPU suite pins on gloo.

ParallelContext over NCCL, megatron-core tensor-parallel layers on CUDA against the full-weight reference,
TrainableAttention's training path (flash-attn varlen when installed, else torch's varlen kernel) against a
float64 reference, and the checkpoint layout code on device tensors. No vLLM needed. Skipped, with the
reason, where there is no CUDA device.
"""

import pytest
import torch

from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.testing import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: make test-gpu)"),
]


def _nccl_all_reduce():

    ctx = context_from_torchrun(tp=torch.cuda.device_count(), timeout_s=120)
    x = torch.full((4,), float(ctx.rank + 1), device="cuda")
    torch.distributed.all_reduce(x, group=ctx.tp_group)
    return torch.distributed.get_backend(), x.cpu().tolist()


def test_parallel_context_over_nccl():
    world = torch.cuda.device_count()
    results = run_distributed(_nccl_all_reduce, world, init=False, timeout_s=300)
    total = float(world * (world + 1) // 2)
    assert all(backend == "nccl" and values == [total] * 4 for backend, values in results), results


def _megatron_layer_on_cuda():
    import _megatron_block as blk

    from parallel_bridge.adapters import megatron
    from parallel_bridge.spec import schema

    torch.backends.cuda.matmul.allow_tf32 = False
    ctx = context_from_torchrun(tp=torch.cuda.device_count(), timeout_s=120)
    full = blk.full_weights(1)
    layer = blk.MegatronLayer(ctx, megatron.model_parallel_config(ctx, perform_initialization=False)).cuda()
    with torch.no_grad():
        for name, p in layer.params().items():
            p.copy_(schema.shard("decoder.layers.0." + name, full["layers.0." + name], ctx.tp, ctx.tp_rank))
        x = torch.randn(16, 2, blk.HIDDEN, generator=torch.Generator().manual_seed(0))
        got = layer(x.cuda()).cpu()
    return got, blk.reference_block(x, full, range(1))


def test_megatron_tensor_parallel_layer_on_cuda():
    """fp32 with TF32 off: the sharded layer equals the full-weight reference within the parity rule's value
    bound (TP partial sums, CUDA's and the CPU's kernels summing in other orders)."""
    import _megatron_block as blk

    from parallel_bridge.numerics import parity
    pytest.importorskip("megatron.core")
    for got, want in run_distributed(_megatron_layer_on_cuda, torch.cuda.device_count(), init=False, timeout_s=300):
        assert (got - want).abs().max().item() <= parity.value_bound(want.abs().max().item(), blk.length(1, 16))


def test_trainable_attention_training_path_on_cuda():
    """bf16 packed varlen GQA with RoPE, forward and gradients, against the float64 reference of the CPU
    test. The kernels accumulate in fp32, so the error is bf16's rounding of inputs and outputs, not of sums:
    q, k, v, the probabilities and the output each rounded to 8 bits (u = 2^-8) give about 5u on values of
    typical magnitude 1 (the output is a convex combination of unit-variance values): 2e-2 absolute; the
    gradients round the same chain back once more, so 5e-2."""
    from test_attention import HEADS, KV, LENGTHS, D, reference

    from parallel_bridge.models.attention import TrainableAttention

    g = torch.Generator().manual_seed(0)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, n * D, generator=g) for n in (HEADS, KV, KV))
    probe = torch.randn(t, HEADS * D, generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    dev = [x.to("cuda", torch.bfloat16).requires_grad_(True) for x in (q, k, v)]
    out = TrainableAttention(HEADS, KV, D, layer_index=0)(*dev, positions.cuda(), cu.cuda())
    (out.float() * probe.cuda()).sum().backward()
    ref64 = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = reference(*ref64, positions, LENGTHS)
    (ref * probe.double()).sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=0)
    for got, want in zip(dev, ref64):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=5e-2, rtol=0)


def _expected_shard(name, full, tp, r):
    """What megatron-core holds on TP rank r, by index arithmetic on the full tensor (the oracle)."""
    if name.endswith("linear_fc2.weight"):  # row-parallel: input columns
        n = full.shape[1] // tp
        return full[:, r * n : (r + 1) * n]
    if name.endswith("linear_fc1.weight"):  # gated: this rank's gate rows, then its up rows
        half, n = full.shape[0] // 2, full.shape[0] // 2 // tp
        return torch.cat([full[r * n : (r + 1) * n], full[half + r * n : half + (r + 1) * n]])
    n = full.shape[0] // tp  # column-parallel (grouped QKV: whole groups; vocabulary rows)
    return full[r * n : (r + 1) * n]


def test_layout_code_on_device_tensors():
    from parallel_bridge.spec import schema
    from parallel_bridge.spec.sharding import GroupedQKV

    g = torch.Generator().manual_seed(1)
    names = ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight",
             "decoder.layers.0.mlp.linear_fc2.weight", "embedding.word_embeddings.weight")
    for name in names:
        full = torch.randn(48, 32, generator=g)
        for tp in (1, 2, 4):
            shards = [schema.shard(name, full.cuda(), tp, r) for r in range(tp)]
            assert all(s.is_cuda for s in shards)
            for r, s in enumerate(shards):
                assert torch.equal(s.cpu(), _expected_shard(name, full, tp, r)), (name, tp, r)
            assert torch.equal(schema.merge(name, shards).cpu(), full), (name, tp)
    qkv = torch.randn((8 + 2 * 2) * 16, 32, generator=g)
    rows = GroupedQKV(8, 2, 16).rank_rows(2, 1, order="qkv")
    on_device = torch.cat([qkv.cuda()[s : s + n] for s, n in rows])
    assert torch.equal(on_device.cpu(), torch.cat([qkv[s : s + n] for s, n in rows]))
