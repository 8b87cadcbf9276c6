"""Megatron-Bridge's ``run_config.yaml``: its ``model:`` section (a ``GPTModelProvider``: megatron-core's
``TransformerConfig`` fields plus the provider's own), every field classified once.

TransformerConfig fields are classified by :mod:`~parallel_bridge.spec.megatron_args`; the provider's own
fields here: read into :class:`~parallel_bridge.spec.model.GPTConfig` (:data:`MAPPED`), required at the value
the families compute (:data:`NEUTRAL`, refused by name otherwise), or without effect on a forward
(:data:`NO_MATH`). A field no table names is refused: a newer Megatron-Bridge's field cannot be ignored
silently. ``tests/test_producers.py`` walks the field list Megatron-Bridge 0.6.2 itself dumped beside the
fixture it wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parallel_bridge.errors import CheckpointError, MissingDependencyError, ModelConfigError
from parallel_bridge.spec import megatron_args as margs
from parallel_bridge.spec.model import args_fields

RUN_CONFIG = "run_config.yaml"

MAPPED = frozenset(
    """share_embeddings_and_output_weights seq_length vocab_size should_pad_vocab make_vocab_size_divisible_by
    rope_scaling rope_scaling_factor rotary_base position_embedding_type""".split()
)
"""The provider's fields read into GPTConfig (padded vocabulary rows as Megatron-Bridge computes them: the
vocabulary rounded up to ``make_vocab_size_divisible_by x TP`` when ``should_pad_vocab``)."""

NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "rotary_scaling_factor": ((None,), "rotary scaling"),
    "yarn_rotary_scaling_factor": ((None,), "YaRN rope scaling"),
    "yarn_original_max_position_embeddings": ((None,), "YaRN rope scaling"),
    "yarn_beta_fast": ((None,), "YaRN rope scaling"),
    "yarn_beta_slow": ((None,), "YaRN rope scaling"),
    "yarn_mscale": ((None,), "YaRN rope scaling"),
    "yarn_mscale_all_dim": ((None,), "YaRN rope scaling"),
    "yarn_correction_range_round_to_int": ((None,), "YaRN rope scaling"),
    "mtp_enabled": ((False, None), "multi-token prediction layers"),
    "use_arbitrary_attention_mask": ((None, False), "an arbitrary attention mask"),
}
"""The provider's fields at which the families compute the same thing (value, meaning otherwise)."""

NO_MATH = frozenset(
    """_target_ parallel_output fp16_lm_cross_entropy deallocate_pipeline_outputs scatter_embedding_sequence_parallel
    tp_only_amax_red tp_comm_overlap_cfg use_transformer_engine_full_layer_spec use_transformer_engine_op_fuser
    dense_grouped_gemm transformer_layer_spec hf_model_id hf_model_revision moe_grouped_gemm
    init_model_with_meta_device use_te_rng_tracker virtual_pipeline_model_parallel_size
    account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split masked_softmax_fusion
    cross_entropy_loss_fusion gradient_accumulation_fusion restore_modelopt_state _pg_collection
    generation_config vocab_size_divisible_by""".split()
)
"""The provider's fields without effect on a served forward (fusions, layer-spec choices, where the weights
came from, training-only settings)."""


def model_section(path: Path) -> dict[str, Any]:
    """The ``model:`` mapping of a run_config.yaml (YAML errors name the file)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with vLLM and transformers
        raise MissingDependencyError("reading Megatron-Bridge's run_config.yaml needs PyYAML: pip install pyyaml") from None
    try:
        body = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path} has no model: section (Megatron-Bridge writes the model config there)")
    return model


def provider_fields(model: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """GPTConfig fields from a provider's ``model:`` section, and the features it turns on that no family
    maps; a field no table classifies raises naming it."""
    unknown = sorted(k for k in model if not classified(k))
    if unknown:
        raise ModelConfigError(
            f"model.{unknown[0]}" + (f" (and {unknown[1:4]})" if len(unknown) > 1 else "")
            + " is a field parallel_bridge does not know: it cannot tell whether it changes the math, so the "
            "configuration is refused (a newer Megatron-Bridge? report it)"
        )
    args = {k: _plain(v) for k, v in model.items() if k in margs.MAPPED | set(margs.NEUTRAL)}
    args.update(_provider_args(model))
    fields, refused = args_fields(args)
    return fields, refused + margs.away_from(lambda k, d: model.get(k, d), NEUTRAL)


def classified(name: str) -> bool:
    """Whether any table (the provider's or megatron_args') classifies the field ``name``."""
    tables = (MAPPED, NO_MATH, NEUTRAL, margs.MAPPED, margs.NO_MATH, margs.NEUTRAL, margs.PARALLEL)
    return any(name in table for table in tables)


def _provider_args(model: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron-LM argument names for the provider's own fields."""
    out: dict[str, Any] = {}
    vocab = model.get("vocab_size")
    if vocab is not None:
        out["vocab_size"] = vocab
        out["padded_vocab_size"] = _padded(model, vocab)
    if "share_embeddings_and_output_weights" in model:
        out["tie_embeddings"] = bool(model["share_embeddings_and_output_weights"])
    if "seq_length" in model:
        out["max_position_embeddings"] = model["seq_length"]
    out["rope_scaling"] = bool(model.get("rope_scaling", False))
    if out["rope_scaling"]:
        out["rope_scaling_factor"] = model.get("rope_scaling_factor")
    for name in ("rotary_base", "position_embedding_type"):
        if name in model:
            out[name] = model[name]
    return out


def _padded(model: Mapping[str, Any], vocab: Any) -> Any:
    if not model.get("should_pad_vocab", False) or not isinstance(vocab, int):
        return vocab
    multiple = int(model.get("make_vocab_size_divisible_by", 128)) * int(model.get("tensor_model_parallel_size", 1))
    return -(-vocab // multiple) * multiple


def _plain(value: Any) -> Any:
    """A YAML-dumped callable (``{_target_: torch.nn.functional.silu, _call_: false}``) as the function it names
    when it is a known activation, else its name (which the classification then refuses)."""
    if isinstance(value, dict) and "_target_" in value:
        target = value["_target_"]
        if target in ("torch.nn.functional.silu", "torch.nn.modules.activation.SiLU"):
            import torch.nn.functional as F

            return F.silu
        return str(target).rsplit(".", 1)[-1]
    return value
