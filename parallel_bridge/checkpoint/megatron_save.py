"""Save a megatron-core GPTModel the way Megatron-LM lays checkpoints out, with megatron-core's own code.

``dist_checkpointing.save`` (the ``torch_dist`` format) writes ``root/iter_XXXXXXX``;
rank 0 adds ``latest_checkpointed_iteration.txt`` and, since megatron-core alone
stores no model arguments, ``megatron_gpt_config.json`` for the readers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec.model import CONFIG_FILE, GPTConfig


def save_torch_dist(
    ctx: ParallelContext, model: Any, root: str | Path, iteration: int, spec: GPTConfig
) -> Path:
    """Save ``model`` (of ``spec``) with ``megatron.core.dist_checkpointing``; collective over the context's ranks.

    Run inside ``bind_parallel_state`` (and ``cpu_compat`` on CPU): megatron-core's
    sharded state dict reads the parallel state.
    """
    from megatron.core import dist_checkpointing

    folder = Path(root) / f"iter_{iteration:07d}"
    if ctx.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(folder))
    if ctx.rank == 0:
        (Path(root) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2))
        (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()
    return folder
