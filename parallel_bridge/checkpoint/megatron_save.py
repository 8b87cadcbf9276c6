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
from parallel_bridge.spec.model import CONFIG_FILE, GPTConfig, sliding_window_of


def gpt_config_of(
    config: Any,
    vocab_size: int,
    padded_vocab_size: int,
    max_position_embeddings: int,
    tie_embeddings: bool,
    rotary_base: float = 10000.0,
    rope_scaling_factor: float | None = None,
) -> GPTConfig:
    """The reader's GPTConfig for a megatron-core TransformerConfig and the model's vocabulary (and the
    GPTModel's rope scaling factor, which the config does not hold)."""
    return GPTConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size,
        max_position_embeddings=max_position_embeddings,
        rotary_base=rotary_base,
        norm_epsilon=config.layernorm_epsilon,
        tie_embeddings=tie_embeddings,
        add_bias_linear=config.add_bias_linear,
        add_qkv_bias=getattr(config, "add_qkv_bias", config.add_bias_linear),
        normalization=config.normalization,
        swiglu=config.gated_linear_unit,
        kv_channels=config.kv_channels,
        qk_layernorm=bool(config.qk_layernorm),
        rope_scaling_factor=rope_scaling_factor,
        sliding_window=sliding_window_of(config.window_size),
    )



def save_torch_dist(
    ctx: ParallelContext, model: Any, root: str | Path, iteration: int, gpt: GPTConfig
) -> Path:
    """Save ``model`` with ``megatron.core.dist_checkpointing``; collective over the context's ranks.

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
        (Path(root) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(gpt), indent=2))
        (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()
    return folder
