"""TrainableAttention (training path) vs torch's best attention kernels, same shapes.

Causal attention, forward and forward+backward, as TFLOP/s (causal FLOPs:
2 * 2 * B * H * S^2 * D / 2 forward, 2.5x that backward). Cases: a uniform batch
(B sequences of S tokens, packed for TrainableAttention, padded [B, H, S, D] for
SDPA) and a variable-length batch (SDPA then runs per sequence, as there is no
padding-free alternative). GPU (bf16): B8 H16 S2048 D128, SDPA backends
cuDNN / flash / efficient; CPU (fp32): a smaller shape and SDPA's CPU kernel.
Target: >= 0.95 of the best torch kernel on the same shape. Includes RoPE in
TrainableAttention's time (it applies RoPE itself), which the raw kernels skip.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import report, time_interleaved  # noqa: E402

from parallel_bridge.models.attention import TrainableAttention, varlen_causal_attention  # noqa: E402


def flops(lengths: list[int], heads: int, d: int, backward: bool) -> float:
    fwd = sum(2 * 2 * heads * s * s * d / 2 for s in lengths)
    return fwd * (3.5 if backward else 1.0)


def bench_case(case, lengths, attn, dims, dev, dtype, sync, backends, repeats, cuda):
    b, h, kv, s, d = dims
    rows = []
    t = sum(lengths)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(t, h * d, device=dev, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(t, kv * d, device=dev, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(t, kv * d, device=dev, dtype=dtype, generator=g, requires_grad=True)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    qs = [x.detach().view(t, -1, d).split(lengths) for x in (q, k, v)]
    seqs = [
        tuple(part[i].transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(True) for part in qs)
        for i in range(len(lengths))
    ]
    padded = None
    if case == "uniform":
        padded = tuple(
            x.detach().view(b, s, -1, d).transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v)
        )

    def ours(backward):
        def run():
            out = attn(q, k, v, positions, cu)
            if backward:
                out.sum().backward()
            sync()

        return run

    def kernel_only(backward):
        """TrainableAttention's training kernel path without its RoPE."""
        q3, k3, v3 = q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d)

        def run():
            out = varlen_causal_attention(q3, k3, v3, cu, max(lengths), d**-0.5)
            if backward:
                out.sum().backward()
            sync()

        return run

    def sdpa(backward, backend=None):
        import contextlib

        def run():
            if backend is not None:
                from torch.nn.attention import sdpa_kernel

                ctx = sdpa_kernel(backend)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                if padded is not None:
                    outs = [F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=h != kv)]
                else:
                    outs = [F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=h != kv) for x in seqs]
                if backward:
                    sum(o.sum() for o in outs).backward()
            sync()

        return run

    def torch_varlen(backward):
        from torch.nn.attention.varlen import varlen_attn

        q3, k3, v3 = q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d)

        def run():
            out = varlen_attn(q3, k3, v3, cu, cu, max(lengths), max(lengths), window_size=(-1, 0))
            if backward:
                out.sum().backward()
            sync()

        return run

    for backward in (False, True):
        fns = {
            "trainable_attention": ours(backward),
            "trainable_attention_no_rope": kernel_only(backward),
        }
        if cuda:
            fns.update({name: sdpa(backward, be) for name, be in backends.items()})
            if case == "varlen":  # torch's own packed kernel: the reference for a packed batch
                fns["torch_varlen_attn"] = torch_varlen(backward)
        else:
            fns["sdpa"] = sdpa(backward)
        usable = {}
        for name, fn in fns.items():
            try:
                fn()
                usable[name] = fn
            except RuntimeError as e:
                print(f"skip {name} ({case}): {str(e).splitlines()[0][:80]}")
        times = time_interleaved(usable, repeats, warmup=2)
        best_ref = min(v for k, v in times.items() if not k.startswith("trainable_attention"))
        for name, sec in times.items():
            rows.append(
                {
                    "case": case,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "kernel": name,
                    "ms": sec * 1e3,
                    "tflops": flops(lengths, h, d, backward) / sec / 1e12,
                    "vs_best_torch": best_ref / sec,
                }
            )

    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:  # dense: B8 H16 S2048 D128; packed: 8 sequences of mixed length, GQA 32 q / 8 kv heads
        s, d = 2048, 128
        cases = {
            "uniform": ([s] * 8, (8, 16, 16, s, d)),
            "varlen": ([s // 4, s, s // 2, s + s // 4, s // 8, s - s // 8, s // 2, s // 4], (8, 32, 8, s, d)),
        }
    else:
        s, d = 512, 64
        cases = {"uniform": ([s] * 2, (2, 8, 8, s, d)), "varlen": ([s // 4, s + s // 2 + s // 4], (2, 8, 8, s, d))}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    backends = {}
    if cuda:
        from torch.nn.attention import SDPBackend

        backends = {
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        }
    rows = []
    for case, (lengths, dims) in cases.items():
        attn = TrainableAttention(dims[1], dims[2], d, layer_index=0, max_positions=max(lengths))
        rows += bench_case(case, lengths, attn, dims, dev, dtype, sync, backends, args.repeats, cuda)
    worst = min(r["vs_best_torch"] for r in rows if r["kernel"] == "trainable_attention")
    worst_kernel = min(r["vs_best_torch"] for r in rows if r["kernel"] == "trainable_attention_no_rope")
    print(
        f"trainable attention / best torch kernel, worst case: {worst:.3f} with RoPE, "
        f"{worst_kernel:.3f} without (target >= 0.95)"
    )
    report(
        "gpu-attention" if cuda else "attention",
        rows,
        {
            "worst_ratio": worst,
            "worst_ratio_without_rope": worst_kernel,
            "target": 0.95,
            "device": dev,
            "dtype": str(dtype),
            "shapes": {case: dict(zip("BHKSD", dims)) for case, (_, dims) in cases.items()},
        },
    )


if __name__ == "__main__":
    main()
