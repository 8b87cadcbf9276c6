"""Step time of a DeepSpeed ZeRO-1 engine built through the adapter vs by hand.

Two ranks (DP=2, gloo, DS_ACCELERATOR=cpu on CPU): each builds (a) an engine with
``parallel_bridge.adapters.deepspeed.initialize`` (mpu from a ParallelContext) and
(b) one with plain ``deepspeed.initialize`` (DeepSpeed's own groups), same model
and optimizer, and times their training steps interleaved. Target: (a)/(b) <= 1.02.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from parallel_bridge.parallel.launch import context_from_torchrun

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions")
)


def _bench(hidden: int, layers: int, batch: int, repeats: int) -> dict:
    import deepspeed
    import torch
    from _common import time_interleaved

    from parallel_bridge.adapters import deepspeed as pds

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun()
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
    }

    def model():
        torch.manual_seed(0)
        mods = []
        for _ in range(layers):
            mods += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
        return torch.nn.Sequential(*mods)

    m_a, m_b = model(), model()
    engine_a, *_ = pds.initialize(ctx, m_a, dict(config), optimizer=torch.optim.AdamW(m_a.parameters()))
    engine_b, *_ = deepspeed.initialize(
        model=m_b, config=dict(config), optimizer=torch.optim.AdamW(m_b.parameters())
    )
    x = torch.randn(batch, hidden)

    def step(engine):
        def run():
            engine.backward(engine(x).pow(2).mean())
            engine.step()

        return run

    times = time_interleaved({"adapter": step(engine_a), "deepspeed_by_hand": step(engine_b)}, repeats)
    return {"times": times, "dp": ctx.dp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    from _common import report

    from parallel_bridge.testing import run_distributed

    results = run_distributed(
        _bench, args.world, args.hidden, args.layers, args.batch, args.repeats, timeout_s=600
    )
    times = results[0]["times"]
    ratio = times["adapter"] / times["deepspeed_by_hand"]
    rows = [
        {"engine": k, "step_ms": v * 1e3, "ratio_vs_by_hand": v / times["deepspeed_by_hand"]}
        for k, v in times.items()
    ]
    print(f"adapter / by hand = {ratio:.3f} (target <= 1.02)")
    report(
        "deepspeed_step",
        rows,
        {
            "adapter_over_by_hand": ratio,
            "target": 1.02,
            "world": args.world,
            "zero_stage": 1,
            "shape": vars(args),
        },
    )


if __name__ == "__main__":
    main()
