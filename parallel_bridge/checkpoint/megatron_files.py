"""Where a Megatron checkpoint keeps things: the iteration folder ``latest_checkpointed_iteration.txt``
names, legacy rank-folder names (``mp_rank_TT[_PPP]``), and the local-spec name of a Transformer Engine
tensor name."""

from __future__ import annotations

import re
from pathlib import Path

from parallel_bridge.errors import CheckpointError

_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def canonical(name: str) -> str:
    """Local-spec name for a (possibly Transformer Engine) Megatron tensor name."""
    for te, local in _TE_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def iteration_folder(root: Path, iteration: int | None) -> Path:
    tracker = root / "latest_checkpointed_iteration.txt"
    if iteration is not None:
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise CheckpointError(f"iteration must be a non-negative integer, got {iteration!r}")
        folder = root / f"iter_{iteration:07d}"
        if not folder.is_dir():
            have = sorted(p.name for p in root.glob("iter_*"))
            raise CheckpointError(
                f"iteration {iteration} not found: {folder} does not exist (present: {have})"
            )
        return folder
    if tracker.exists():
        text = tracker.read_text(errors="replace").strip()
        if text != "release" and not text.isdigit():
            raise CheckpointError(
                f"{tracker} holds {text[:40]!r}, not an iteration number or 'release'; fix it or pass --iteration"
            )
        folder = root / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not folder.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text}, but {folder} does not exist")
        return folder
    return root


def iteration_of(folder: Path) -> int | str | None:
    if folder.name == "release":
        return "release"
    m = re.match(r"^iter_(\d+)$", folder.name)
    return int(m[1]) if m else None
