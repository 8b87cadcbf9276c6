"""Cost of building Megatron layers through the adapter, at TP=1.

Times forward+backward of the same ColumnParallelLinear -> RowParallelLinear MLP
(a) built through parallel_bridge (config and groups from a ParallelContext),
(b) built by hand the Megatron way (initialize_model_parallel, ModelParallelConfig,
    groups from parallel_state globals), and
(c) as two nn.Linear,
in one process, interleaved. Target: (a)/(b) <= 1.02 and (a)/(c) <= 1.02.
Runs on CUDA when available (bf16), else CPU (fp32).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from _common import report, time_interleaved

from parallel_bridge.parallel.launch import context_from_torchrun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--ffn", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden = args.hidden or (4096 if cuda else 512)
    ffn = args.ffn or (14336 if cuda else 2048)
    tokens = args.tokens or (8192 if cuda else 1024)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    from megatron.core import parallel_state as mps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from parallel_bridge.adapters import megatron

    ctx = context_from_torchrun()
    init = torch.nn.init.xavier_normal_

    def mlp(config, tp_group):
        col = ColumnParallelLinear(
            hidden, ffn, config=config, init_method=init, bias=False, gather_output=False, tp_group=tp_group
        ).to(device)
        row = RowParallelLinear(
            ffn,
            hidden,
            config=config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        ).to(device)
        return lambda x: row(torch.relu(col(x)[0]))[0]

    mps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    with megatron.cpu_compat():
        adapter = mlp(megatron.model_parallel_config(ctx, params_dtype=dtype), ctx.tp_group)
        by_hand = mlp(
            ModelParallelConfig(
                use_cpu_initialization=not cuda, params_dtype=dtype, gradient_accumulation_fusion=False
            ),
            mps.get_tensor_model_parallel_group(),
        )
        lin1 = torch.nn.Linear(hidden, ffn, bias=False, device=device, dtype=dtype)
        lin2 = torch.nn.Linear(ffn, hidden, bias=False, device=device, dtype=dtype)

        def plain(x):
            return lin2(torch.relu(lin1(x)))

        x = torch.randn(tokens, 1, hidden, device=device, dtype=dtype, requires_grad=True)

        def step(fn):
            def run():
                fn(x).sum().backward()
                if cuda:
                    torch.cuda.synchronize()

            return run

        times = time_interleaved(
            {"adapter": step(adapter), "megatron_by_hand": step(by_hand), "nn_linear": step(plain)},
            repeats=args.repeats,
        )
    flops = 3 * 2 * 2 * tokens * hidden * ffn
    rows = [
        {"variant": k, "ms": v * 1e3, "tflops": flops / v / 1e12, "ratio_vs_adapter": times["adapter"] / v}
        for k, v in times.items()
    ]
    summary = {
        "adapter_over_megatron_by_hand": times["adapter"] / times["megatron_by_hand"],
        "adapter_over_nn_linear": times["adapter"] / times["nn_linear"],
        "target": 1.02,
        "shape": {"tokens": tokens, "hidden": hidden, "ffn": ffn, "dtype": str(dtype), "device": device},
    }
    print(
        f"adapter / megatron by hand = {summary['adapter_over_megatron_by_hand']:.3f}, "
        f"adapter / nn.Linear = {summary['adapter_over_nn_linear']:.3f} (target <= 1.02)"
    )
    report("gpu-megatron_overhead" if cuda else "megatron_overhead", rows, summary)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
