"""The Hugging Face -> Megatron import under torchrun, one process per Megatron rank, streaming.

``torchrun --nproc-per-node K -m parallel_bridge convert HF_DIR OUT --to megatron --tp N --pp M`` with K = N x M:
every rank checks the same things :func:`~parallel_bridge.checkpoint.hf_import.plan_import` checks, builds
megatron-core's GPTModel for its (TP, PP) place, fills its shard from exactly the safetensors slices it holds
(``safe_open`` slices, each kind's sharding saying which: :meth:`Sharding.hf_shard`), and megatron-core's own
``dist_checkpointing.save`` writes all shards together as global sharded tensors, so the result loads at any
layout like a single-process import's. Rank 0 owns the temporary folder beside ``OUT`` and renames it into
place once every rank has saved; a rank that dies leaves the others failing at the save's collective within the
timeout, and the next run removes the folder it left. MoE models import at EP=1, each expert split like a
dense MLP over expert-TP (= TP). Memory per rank: its shard, the largest slice it reads,
and megatron-core's save buffers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint.hf_import import Plan, plan_import
from parallel_bridge.checkpoint.megatron_files import global_param_name
from parallel_bridge.checkpoint.outputs import begin_output, check_output, finish_output
from parallel_bridge.checkpoint.progress import byte_progress
from parallel_bridge.errors import CheckpointError
from parallel_bridge.spec import schema
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.tp_split import experts_per_rank

logger = logging.getLogger(__name__)


def under_torchrun() -> bool:
    """Whether this process is one of several torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def import_hf_sharded(
    folder: str | Path, out: str | Path, *, tp: int, pp: int = 1, iteration: int = 1, overwrite: bool = False,
    progress: bool = False, timeout_s: float = 600.0,
) -> Path:
    """Collective over torchrun's world of ``tp`` x ``pp`` ranks: write the Hugging Face model in ``folder`` as a
    Megatron ``torch_dist`` checkpoint ``out``, each rank reading and saving only its shard; returns ``out``."""
    import torch.distributed as dist

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist
    from parallel_bridge.parallel.launch import context_from_torchrun

    folder, out = Path(folder), Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise CheckpointError(
            f"torchrun started {world} processes but --tp {tp} x --pp {pp} is {tp * pp}: a distributed import runs "
            f"one process per Megatron rank; start it with --nproc-per-node {tp * pp}"
        )
    check_output(out, [folder], overwrite)
    cfg, plan = plan_import(folder, tp, pp)
    ctx = context_from_torchrun(tp=tp, pp=pp, timeout_s=timeout_s)
    try:
        with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
            shared = [str(begin_output(out)) if ctx.rank == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            tmp = Path(shared[0])
            try:
                _, model = megatron.gpt_model(ctx, cfg, perform_initialization=False, pipeline_dtype=torch.float32)
                _fill(ctx, model, cfg, plan, progress and ctx.rank == 0)
                save_torch_dist(ctx, model, tmp, iteration, cfg)  # collective; ends with a barrier
                if ctx.rank == 0:
                    finish_output(tmp, out, str(folder))
                dist.barrier()
            except BaseException:
                if ctx.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logger.info("imported %s -> %s on %d ranks (torch_dist, for tp=%d pp=%d)", folder, out, world, tp, pp)
    return out


def _fill(ctx: Any, model: Any, cfg: GPTConfig, plan: Plan, progress: bool) -> None:
    """Each parameter of this rank's model from the safetensors slices its shard holds."""
    from safetensors import safe_open

    offset = schema.layer_offset(cfg.num_layers, ctx.pp, ctx.pp_rank)
    per_rank = experts_per_rank(cfg.num_moe_experts, ctx.ep)
    params = dict(model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in params.values())
    with torch.no_grad(), contextlib.ExitStack() as files, byte_progress(total, "import", progress) as bar:
        handles: dict[Path, Any] = {}

        def reader(parts: list[tuple[str, Path]]):
            def read_part(i: int, dim: int | None, start: int, length: int) -> torch.Tensor:
                part, path = parts[i]
                if path not in handles:
                    handles[path] = files.enter_context(safe_open(str(path), framework="pt"))
                if dim is None:
                    return handles[path].get_tensor(part)
                piece = handles[path].get_slice(part)
                return piece[start : start + length] if dim == 0 else piece[:, start : start + length]
            return read_part

        for local, param in params.items():
            name = global_param_name(local, offset, ctx.ep_rank, per_rank)
            if cfg.tie_embeddings and name == "output_layer.weight":
                name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
            if name not in plan:
                raise CheckpointError(f"parameter {local} (global name {name}) of rank {ctx.rank} has no Hugging "
                                      f"Face tensor to come from")
            (kind, _, expert), parts = plan[name]
            split, split_rank = (ctx.etp, ctx.etp_rank) if expert is not None else (ctx.tp, ctx.tp_rank)
            shard = kind.sharding.hf_shard(name, reader(parts), kind.shape(cfg), cfg, split, split_rank)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor {name}: rank {ctx.rank}'s shard from Hugging Face has shape "
                                      f"{tuple(shard.shape)}, its parameter {tuple(param.shape)}")
            param.copy_(shard)
            bar.update(param.numel() * param.element_size())
