"""The tensors a checkpoint stores against what its model configuration implies: each one present at its
shape, none that no kind declares, every expert there, and expert tensors under a dense configuration named an
MoE checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parallel_bridge.errors import CheckpointError, UnknownTensorError
from parallel_bridge.spec import schema
from parallel_bridge.spec.model import GPTConfig


def check_tensors(path: Path, cfg: GPTConfig, shapes: Mapping[str, tuple[int, ...]], sources: Sequence[Any]) -> None:
    """Raise naming the first tensor of ``shapes`` (name -> stored shape) that does not fit ``cfg``, read from
    ``sources`` (:class:`~parallel_bridge.checkpoint.config_sources.Source`)."""
    if not cfg.num_moe_experts:
        _refuse_moe(path, shapes, sources)
    else:
        _missing_experts(path, cfg, shapes)
    expected = schema.expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{path}: tensor {name} is missing (the config has {cfg.num_layers} layers)")
        if shapes[name] != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {shapes[name]} but the config implies {shape}")
    extra = sorted(n for n in shapes if n not in expected and not n.endswith("_extra_state"))
    if extra:
        raise UnknownTensorError(
            f"{path}: tensors {extra[:4]} have no place in a {cfg.family.model_type} GPT of this config (MoE, "
            f"MLA, biases the config does not declare, or another architecture?); no tensor kind declares them"
        )


def _missing_experts(path: Path, cfg: GPTConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Fewer experts stored than the config declares (an expert-parallel rank's files missing, or a config of
    another model): say how many of which, before any expert is read."""
    moe, stored = schema.moe_tensors(shapes)
    if not moe:
        raise CheckpointError(
            f"{path}: the configuration declares num_moe_experts={cfg.num_moe_experts}, but the checkpoint stores no "
            f"router or expert tensors: a dense model's checkpoint, or the configuration of another model"
        )
    if stored and stored != cfg.num_moe_experts:
        raise CheckpointError(
            f"{path} stores {stored} experts per layer but its configuration declares num_moe_experts="
            f"{cfg.num_moe_experts}: an expert-parallel rank's files are missing, or the configuration is another "
            f"model's; every expert must be present, so it is refused"
        )


def _refuse_moe(path: Path, shapes: Mapping[str, Any], sources: Sequence[Any]) -> None:
    """Expert or router tensors under a dense configuration: name the MoE checkpoint, not a missing FFN."""
    moe, experts = schema.moe_tensors(shapes)
    if not moe:
        return
    count = f"{experts} experts" if experts else "router or stacked expert tensors"
    via = ", ".join(src.describe() for src in sources) or "the overrides"
    raise UnknownTensorError(
        f"{path} is an MoE checkpoint ({count}: tensors such as {moe[0]}) but its configuration ({via}) "
        f"declares no num_moe_experts; give the MoE fields (num_moe_experts, moe_router_topk, ...) as "
        f"overrides or in the config file: reading it as a dense model would drop every expert, so it is refused"
    )
