"""Where a checkpoint's producer put the model configuration, found in one documented order.

1. **Megatron-LM's** ``args``: in a legacy rank file, in torch_dist's ``common.pt`` (megatron-core up to 0.16),
   or in the ``common_state`` item of the ``.distcp`` files (megatron-core 0.17 and later).
2. **Megatron-Bridge's** ``run_config.yaml`` in the iteration folder (its ``model:`` section).
3. A **Hugging Face** ``config.json``: the one named by ``hf_config`` (``--hf-config``), else the one in verl's
   ``huggingface/`` folder beside ``dist_ckpt/``.
4. The project's side file ``megatron_gpt_config.json`` (megatron-core-only saves, the demo's).

Every source present is read. The first gives the configuration; every other must agree with it on each
field that changes the math, or the checkpoint is refused naming both sources and values (never one picked
silently); an override of that field settles it. Overrides apply last.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parallel_bridge.checkpoint import megatron_files, records
from parallel_bridge.errors import CheckpointError, ConfigConflictError, ModelConfigError
from parallel_bridge.spec import bridge_config, families
from parallel_bridge.spec.model import CONFIG_FILE, GPTConfig, args_fields, build_config

logger = logging.getLogger(__name__)

OVERRIDE_ROUTES = (
    "--config-overrides '{\"field\": value}' on parallel-bridge inspect/convert/serve, or "
    "hf_overrides={\"megatron.field\": value} on vllm.LLM(..., load_format=\"megatron\") and "
    "vllm serve --hf-overrides"
)
"""How a user passes overrides where each tool runs; every refusal that asks for one names these."""

_NOT_MATH = frozenset({"max_position_embeddings", "vocab_size", "padded_vocab_size"})
"""Fields compared apart: the context limit does not change a forward; vocabulary rows are compared where
both sources state them (a Hugging Face config states real rows only)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One place a producer wrote the configuration, and the GPTConfig fields it states."""

    kind: str
    where: str
    fields: dict[str, Any]
    refused: tuple[str, ...] = ()
    states_padding: bool = True
    """Whether the source states the stored vocabulary rows (padding included); a Hugging Face config does not."""

    def describe(self) -> str:
        return f"{self.kind} ({self.where})"


def from_args(args: Any, where: str) -> Source:
    """Megatron-LM's ``args`` namespace, wherever it was stored."""
    fields, refused = _named(where, args_fields, args)
    return Source("Megatron-LM args", where, fields, tuple(refused))


def from_side_file(path: Path) -> Source:
    """The project's ``megatron_gpt_config.json``."""
    fields, refused = _named(str(path), args_fields, _json_object(path))
    return Source("side file", str(path), fields, tuple(refused))


def from_run_config(path: Path) -> Source:
    """Megatron-Bridge's ``run_config.yaml``: its ``model:`` section, every field classified."""
    model = bridge_config.model_section(path)
    fields, refused = _named(str(path), bridge_config.provider_fields, model)
    return Source("Megatron-Bridge run_config.yaml", str(path), fields, tuple(refused))


def from_hf_config(path: Path) -> Source:
    """A Hugging Face ``config.json`` of a family the schema knows (real vocabulary rows only)."""
    _, fields = _named(str(path), families.config_from_hf, _json_object(path))
    return Source("Hugging Face config.json", str(path), dict(fields), states_padding=False)


def _json_object(path: Path) -> dict[str, Any]:
    body = records.read_json(path)
    if not isinstance(body, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(body).__name__}")
    return body


def _named(where: str, read: Any, body: Any) -> Any:
    try:
        return read(body)
    except ModelConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def find(folder: Path, root: Path, args: tuple[Any, str] | None, hf_config: str | Path | None) -> list[Source]:
    """Every configuration source of the checkpoint in ``folder`` (under ``root``), in the documented order."""
    found = []
    if args is not None and args[0] is not None:
        found.append(from_args(*args))
    run_config = folder / bridge_config.RUN_CONFIG
    if run_config.is_file():
        found.append(from_run_config(run_config))
    hf = _hf_config_path(folder, hf_config)
    if hf is not None:
        found.append(from_hf_config(hf))
    side = next((p for p in (folder / CONFIG_FILE, root / CONFIG_FILE) if p.is_file()), None)
    if side is not None:
        found.append(from_side_file(side))
    return found


def _hf_config_path(folder: Path, named: str | Path | None) -> Path | None:
    """The Hugging Face config named by ``hf_config`` (a config.json or its folder), else verl's."""
    if named is not None:
        path = Path(named)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"hf_config {named}: no such config.json (give the file or the folder holding it)")
        return path
    verl = folder.parent / "huggingface" / "config.json"  # verl: dist_ckpt/ beside huggingface/
    return verl if folder.name == megatron_files.VERL_DIST and verl.is_file() else None


def resolve(
    sources: list[Source], overrides: Mapping[str, Any] | None, stored_rows: int | None, what: Path
) -> GPTConfig:
    """The configuration: the first source's fields, every other source checked against them, then
    ``overrides``; vocabulary padding from the stored rows where no source states it."""
    overrides = dict(overrides or {})
    if not sources and not overrides:
        raise CheckpointError(
            f"{what} carries no model configuration: no Megatron-LM args (rank files, common.pt or the "
            f"common_state item), no Megatron-Bridge run_config.yaml, no Hugging Face config.json (verl's "
            f"huggingface/ or one named with --hf-config / hf_overrides={{\"megatron.hf_config\": PATH}}) and no "
            f"{CONFIG_FILE}; write one of them (num_layers, hidden_size, num_attention_heads, num_query_groups, "
            f"ffn_hidden_size, vocab_size, ...) or pass the fields with {OVERRIDE_ROUTES}"
        )
    refused = [r for s in sources for r in s.refused if r.split("=")[0] not in overrides]
    if refused:
        raise CheckpointError(
            f"{what}: this model is not a Llama-family GPT the mapping knows: {'; '.join(dict.fromkeys(refused))} "
            f"(configuration from {', '.join(s.describe() for s in sources if s.refused)}). Serving it as one would "
            "give wrong numbers, so it is refused"
        )
    first = sources[0] if sources else Source("overrides", "given", {})
    for other in sources[1:]:
        _check_agree(first, other, overrides)
    fields = dict(first.fields)
    stating = [s for s in sources if s.states_padding]
    if stating:
        fields["padded_vocab_size"] = stating[0].fields.get("padded_vocab_size")
    elif stored_rows is not None and fields.get("vocab_size") is not None and stored_rows >= fields["vocab_size"]:
        fields["padded_vocab_size"] = stored_rows  # padding is a storage detail the HF config does not state
    try:
        return build_config(GPTConfig, fields, [], overrides)
    except ModelConfigError as e:
        via = ", ".join(s.describe() for s in sources) or "the overrides"
        raise CheckpointError(f"{what}: {e} (configuration from {via})") from None


def _check_agree(first: Source, other: Source, overrides: Mapping[str, Any]) -> None:
    names = [f for f in first.fields if f not in _NOT_MATH]
    names.append("vocab_size")
    if first.states_padding and other.states_padding:
        names.append("padded_vocab_size")
    for name in names:
        if name in overrides or name not in other.fields:
            continue
        a, b = _effective(first.fields, name), _effective(other.fields, name)
        if not _equal(a, b):
            raise ConfigConflictError(
                f"the model configuration sources disagree on {name}: {first.describe()} says {a!r}, "
                f"{other.describe()} says {b!r}; the two would compute different numbers. Fix the wrong one, or "
                f"choose with {OVERRIDE_ROUTES.replace('field', name)}"
            )


def _effective(fields: Mapping[str, Any], name: str) -> Any:
    """The value a field takes in the forward: ``kv_channels`` unset means hidden / heads."""
    if name == "kv_channels" and fields.get(name) is None:
        hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
        return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    return fields.get(name)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b  # True is not 1, None is not 0
    return a == b
