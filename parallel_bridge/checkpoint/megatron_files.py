"""Where a Megatron checkpoint keeps things: the iteration folder ``latest_checkpointed_iteration.txt``
names, legacy rank-folder names (``mp_rank_TT[_PPP]``), and the local-spec name of a Transformer Engine
tensor name."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from parallel_bridge.errors import CheckpointError
from parallel_bridge.spec import moe, schema


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's full shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_STACKED_EXPERTS = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)experts\.(?:(?P<e>\d+)\.)?(?P<rest>[a-z].*)$")


def per_expert(key: str) -> tuple[str, int | None] | None:
    """megatron-core's torch_dist expert key (``...mlp.experts.experts.linear_fc1.weight`` with an expert axis,
    or ``...experts.experts.{e}.linear_fc1.weight`` one per expert) as (the local-spec name with ``{e}`` for the
    expert: ``...mlp.experts.local_experts.{e}.linear_fc1.weight``, the expert or None: an axis); else None."""
    m = _STACKED_EXPERTS.match(key)
    if m is None:
        return None
    return f"{m['pre']}local_experts.{{e}}.{m['rest']}", None if m["e"] is None else int(m["e"])


def canonical(name: str) -> str:
    """Local-spec name for a (possibly Transformer Engine) Megatron tensor name."""
    for te, local in _TE_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def global_param_name(local: str, layer_offset: int, ep_rank: int = 0, experts_per_rank: int = 0) -> str:
    """A pipeline stage's (and expert-parallel rank's) parameter name as the whole model's: local-spec, the layer
    index made global, a local expert's index made global. The one mapping the legacy reader, the sharded
    import and the weight sync share."""
    return moe.global_expert_name(canonical(schema.global_name(local, layer_offset)), ep_rank, experts_per_rank)


def iteration_folder(root: Path, iteration: int | None) -> Path:
    """The folder holding the tensors of ``iteration`` (default: the one the tracker names) under ``root``:
    Megatron-LM's and Megatron-Bridge's ``iter_NNNNNNN/``, verl's ``global_step_N/actor/dist_ckpt/`` (``root`` may
    also be verl's ``actor/`` folder), or ``root`` itself when it is an iteration folder."""
    if (root / VERL_DIST).is_dir():
        return root / VERL_DIST
    tracker = root / "latest_checkpointed_iteration.txt"
    if iteration is not None:
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise CheckpointError(f"iteration must be a non-negative integer, got {iteration!r}")
        folder = _step_folder(root, iteration)
        if not folder.is_dir():
            have = sorted(p.name for p in (*root.glob("iter_*"), *root.glob("global_step_*")))
            raise CheckpointError(
                f"iteration {iteration} not found: {folder} does not exist (present: {have})"
            )
        return folder
    if not tracker.exists() and (root / BRIDGE_TRACKER).exists():
        return _bridge_iteration(root)
    if tracker.exists():
        text = tracker.read_text(errors="replace").strip()
        if text != "release" and not text.isdigit():
            raise CheckpointError(
                f"{tracker} holds {text[:40]!r}, not an iteration number or 'release'; fix it or pass --iteration"
            )
        folder = root / "release" if text == "release" else _step_folder(root, int(text))
        if not folder.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text}, but {folder} does not exist")
        return folder
    return root


def iteration_of(folder: Path) -> int | str | None:
    if folder.name == "release":
        return "release"
    m = re.match(r"^iter_(\d+)$", folder.name)
    if m is None and folder.name == VERL_DIST and len(folder.parents) > 1:
        m = re.match(r"^global_step_(\d+)$", folder.parents[1].name)
    return int(m[1]) if m else None


VERL_DIST = "dist_ckpt"
"""verl's Megatron checkpoint: ``global_step_N/actor/dist_ckpt/`` (megatron-core torch_dist) beside
``global_step_N/actor/huggingface/`` (the model's config.json), the step in ``latest_checkpointed_iteration.txt``."""


def _step_folder(root: Path, step: int) -> Path:
    """``iter_NNNNNNN`` (Megatron-LM, Megatron-Bridge), or verl's ``global_step_N/actor/dist_ckpt`` where that is
    what the root holds."""
    verl = root / f"global_step_{step}" / "actor" / VERL_DIST
    return verl if not (root / f"iter_{step:07d}").exists() and verl.is_dir() else root / f"iter_{step:07d}"


BRIDGE_TRACKER = "latest_train_state.pt"
"""Megatron-Bridge's tracker: its TrainState (``step``, the iteration, among tensors) at the checkpoint root."""


def _bridge_iteration(root: Path) -> Path:
    """The iteration folder Megatron-Bridge's ``latest_train_state.pt`` names (read as plain tensors)."""
    import torch

    path = root / BRIDGE_TRACKER
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = int(state["step"])
    except Exception as e:  # noqa: BLE001 - any failure to read the tracker is a damaged tracker
        raise CheckpointError(
            f"{path} cannot be read as Megatron-Bridge's train state ({type(e).__name__}: {e}); pass --iteration"
        ) from None
    folder = _step_folder(root, step)
    if not folder.is_dir():
        raise CheckpointError(f"{path} names iteration {step}, but {folder} does not exist")
    return folder
