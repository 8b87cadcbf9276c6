"""One job of the multi-node test, run under torchrun: ``python -m torch.distributed.run ... _multinode_job.py OUT``.

Two layouts in one job: TP=2 x DP=2 (megatron-core TP layers inside a DeepSpeed ZeRO-1 engine, three AdamW
steps) and TP=2 x PP=2 (one megatron-core layer per stage, the activation sent from stage 0 to stage 1).
Each rank writes what it saw (its node, the nodes of its groups) and its numbers to ``OUT/rank{R}.pt``.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import _megatron_block as blk  # noqa: E402

from parallel_bridge.adapters import deepspeed as pds  # noqa: E402
from parallel_bridge.adapters import megatron  # noqa: E402
from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.spec import schema  # noqa: E402

LR = 1e-2


def _layer(ctx, full, index):
    extra = {"pipeline_dtype": torch.float32} if ctx.pp > 1 else {}
    layer = blk.MegatronLayer(ctx, megatron.model_parallel_config(ctx, perform_initialization=False, **extra))
    with torch.no_grad():
        for name, p in layer.params().items():
            p.copy_(schema.shard(f"decoder.layers.{index}." + name, full[f"layers.{index}." + name], ctx.tp, ctx.tp_rank))
    return layer


def zero1_step(ctx, full):
    """TP=2 x DP=2: the TP layer trained three AdamW steps by a ZeRO-1 engine; its shards afterwards."""
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
    }
    layer = _layer(ctx, full, 0)
    engine, *_ = pds.initialize(ctx, layer, config, optimizer=torch.optim.AdamW(layer.parameters(), lr=LR))
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, probe = torch.randn(8, 4, 64, generator=g), torch.randn(8, 4, 64, generator=g)
        sl = slice(ctx.dp_rank * 2, (ctx.dp_rank + 1) * 2)
        engine.backward((engine(x[:, sl]) * probe[:, sl]).sum() / 2)
        engine.step()
    return {n: p.detach().clone() for n, p in layer.params().items()}


@torch.no_grad()
def pipeline_forward(ctx, full):
    """TP=2 x PP=2: stage s runs layer s; stage 0 sends its activation to stage 1, which returns the output."""
    layer = _layer(ctx, full, ctx.pp_rank)
    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(7))
    stages = ctx.ranks("pp")
    if ctx.pp_rank == 0:
        dist.send(layer(x).contiguous(), stages[1])
        return None
    h = torch.empty_like(x)
    dist.recv(h, stages[0])
    return layer(h)


def main() -> None:
    import deepspeed

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    node = int(os.environ["GROUP_RANK"])
    full = blk.full_weights(2)
    record = {"node": node, "local_rank": int(os.environ["LOCAL_RANK"])}
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    with megatron.cpu_compat():
        for name, kwargs, run in (("tp2dp2", {}, zero1_step), ("tp2pp2", {"pp": 2}, pipeline_forward)):
            ctx = context_from_torchrun(tp=2, timeout_s=120, **kwargs)
            record[name] = {
                "rank": ctx.rank,
                "coords": (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank),
                "groups": {axis: [nodes[r] for r in ctx.ranks(axis)] for axis in ("tp", "dp", "pp")},
                "result": run(ctx, full),
            }
    torch.save(record, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
