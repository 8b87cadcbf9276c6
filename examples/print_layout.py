"""Print this rank's place in a layout and all-reduce over each group.

torchrun --nproc-per-node 4 examples/print_layout.py --tp 2 --pp 2
"""

import argparse

import torch
import torch.distributed as dist

from parallel_bridge.parallel.launch import context_from_torchrun

parser = argparse.ArgumentParser()
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
args = parser.parse_args()

ctx = context_from_torchrun(tp=args.tp, pp=args.pp)
for name in ("tp", "pp", "dp"):
    total = torch.tensor([float(ctx.rank)])
    dist.all_reduce(total, group=ctx.group(name))
    print(f"{ctx.describe()}  {name} group {ctx.ranks(name)} sums ranks to {total.item():.0f}")
dist.destroy_process_group()
