"""TrainableAttention in training mode: forward and gradients vs a plain float64 reference.

Packed variable-length sequences with GQA and RoPE. Tolerance: fp32 against a
float64 reference of the same math: one implementation against exact, so half the
parity rule's value bound (``parallel_bridge.numerics.parity.value_bound``) over the terms summed
(scores over head_dim, softmax and weighted sum over <= 23 keys; gradients retrace
that path and sum over the queries of a kv head).
"""

import math

import pytest
import torch

from parallel_bridge.models.attention import TrainableAttention, rotary, varlen_causal_attention
from parallel_bridge.numerics import parity

LENGTHS = [5, 23, 1, 11]
HEADS, KV, D = 8, 2, 32


def reference(q, k, v, positions, lengths, theta=10000.0):
    """Naive causal attention per sequence, kv heads repeated, in float64."""
    out, start = [], 0
    t = q.shape[0]
    q = rotary(q.view(t, HEADS, D).double(), positions, D, theta)
    k = rotary(k.view(t, KV, D).double(), positions, D, theta)
    v = v.view(t, KV, D).double()
    for n in lengths:
        qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
        ks, vs = ks.repeat_interleave(HEADS // KV, 1), vs.repeat_interleave(HEADS // KV, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(D)
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        start += n
    return torch.cat(out).reshape(t, HEADS * D)


def test_forward_and_gradients_match_reference_varlen_gqa():
    g = torch.Generator().manual_seed(0)
    t = sum(LENGTHS)
    q = torch.randn(t, HEADS * D, generator=g, requires_grad=True)
    k = torch.randn(t, KV * D, generator=g, requires_grad=True)
    v = torch.randn(t, KV * D, generator=g, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    attn = TrainableAttention(HEADS, KV, D, layer_index=0)
    out = attn(q, k, v, positions, cu)
    probe = torch.randn(out.shape, generator=g)
    (out * probe).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = reference(q64, k64, v64, positions, LENGTHS)
    (ref * probe.double()).sum().backward()
    forward = D + 2 * max(LENGTHS)
    backward = 2 * forward + HEADS // KV * max(LENGTHS)
    for got, want, length in zip([out, *grads], (ref, q64.grad, k64.grad, v64.grad), [forward, *[backward] * 3]):
        bound = parity.value_bound(want.abs().max().item(), length) / 2
        assert (got.double() - want).abs().max().item() <= bound


def test_sequences_do_not_see_each_other():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(10, 2, 32, generator=g),
        torch.randn(10, 1, 32, generator=g),
        torch.randn(10, 1, 32, generator=g),
    )
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    packed = varlen_causal_attention(q, k, v, cu, 6, 32**-0.5)
    alone = varlen_causal_attention(q[4:], k[4:], v[4:], torch.tensor([0, 6], dtype=torch.int32), 6, 32**-0.5)
    torch.testing.assert_close(packed[4:], alone)


def test_rotary_is_relative():
    """Scores after RoPE depend on the position difference only (the property vLLM and HF share)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    s1 = (rotary(q, torch.tensor([7]), 64, 1e4) * rotary(k, torch.tensor([3]), 64, 1e4)).sum()
    s2 = (rotary(q, torch.tensor([104]), 64, 1e4) * rotary(k, torch.tensor([100]), 64, 1e4)).sum()
    # the same math at other angles: the 64-term dot rounds (the value rule), and so does each angle
    # position x frequency, by up to u x 104 radians at position 104 (frequency <= 1)
    scale = (q.norm() * k.norm()).item()
    assert abs(s1.item() - s2.item()) <= parity.value_bound(scale, 64) + 2 * 2**-24 * 104 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_and_its_gradient_equal_the_reference(dtype):
    """The training path's fused RoPE (hand-written backward) against the plain one, both autograd."""
    from parallel_bridge.models.attention import apply_rotary, rotary_table

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, 64, generator=g).to(dtype).requires_grad_(True)
    positions = torch.randint(0, 300, (40,), generator=g)
    probe = torch.randn(40, 4, 64, generator=g).to(dtype)
    table = rotary_table(512, 64, 1e4)
    fused = apply_rotary(x, positions, table)
    (fused * probe).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    plain = rotary(x, positions, 64, 1e4, table)
    (plain * probe).sum().backward()
    # elementwise math (x cos + rotate(x) sin, and its transpose for the gradient), no sums to speak of: each
    # implementation rounds a product, a sum and its result (bf16: to 8 bits), so each is within 2u relative of
    # exact (first order) and the two within 4u of each other, on the magnitude of the products
    u = parity.UNIT_ROUNDOFF[dtype]
    for got, want in ((fused, plain), (grad, x.grad)):
        bound = 4 * u * want.abs().max().item()
        print(f"\n[rotary {dtype}] max|diff| {(got - want).abs().max().item():.2e}, bound {bound:.2e}")
        assert (got - want).abs().max().item() <= bound
