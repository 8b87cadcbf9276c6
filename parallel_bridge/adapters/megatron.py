"""Megatron adapter: ParallelContext -> megatron-core configs and process groups.

- :func:`model_parallel_config` / :func:`transformer_config`: configs whose
  degrees come from the context, checked before any layer is built.
- :func:`process_groups`: a ``ProcessGroupCollection`` for code that takes
  explicit groups (megatron-core >= 0.15: ``pg_collection=``, ``tp_group=``).
- :func:`bind_parallel_state`: for code that reads ``megatron.core.parallel_state``
  globals, points them at the context's groups (which may belong to vLLM or to
  the user) and restores them afterwards.
- :func:`context_from_megatron`: the context an initialized ``parallel_state``
  describes, with its groups adopted.
- :func:`cpu_compat` and :func:`model_parallel_manual_seed`: the opt-in minimal
  layer that lets Megatron's tensor-parallel code run on CPU under gloo.

The parallel_state binding lives in :mod:`~parallel_bridge.adapters.megatron_state`, the CPU layer in
:mod:`~parallel_bridge.adapters.megatron_cpu`; both are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from parallel_bridge.adapters.megatron_cpu import CpuRNGStatesTracker, cpu_compat, model_parallel_manual_seed
from parallel_bridge.adapters.megatron_state import (
    STATE_GLOBALS,
    bind_parallel_state,
    context_from_megatron,
    import_megatron,
    memory_buffer,
)
from parallel_bridge.errors import ConfigError
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.tp_split import split_for_tp

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------- configs
def _cpu_defaults() -> dict[str, Any]:
    """Settings without which megatron-core's layers need CUDA or fused kernels."""
    on_gpu = torch.cuda.is_available()
    return {
        "use_cpu_initialization": not on_gpu,
        "gradient_accumulation_fusion": False,
    }


def model_parallel_config(ctx: ParallelContext, **overrides: Any):
    """A ``ModelParallelConfig`` with the context's degrees (user ``overrides`` win).

    Checks the layout-level errors Megatron would raise later, with the numbers.
    """
    import_megatron()
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(**_parallel_kwargs(ctx, overrides))


def _parallel_kwargs(ctx: ParallelContext, overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "tensor_model_parallel_size": ctx.tp,
        "pipeline_model_parallel_size": ctx.pp,
        "context_parallel_size": ctx.cp,
        "expert_model_parallel_size": ctx.ep,
        "expert_tensor_parallel_size": ctx.etp,
        "params_dtype": torch.float32,
        **_cpu_defaults(),
    }
    for degree, field in (
        ("tp", "tensor_model_parallel_size"),
        ("pp", "pipeline_model_parallel_size"),
        ("cp", "context_parallel_size"),
        ("ep", "expert_model_parallel_size"),
    ):
        if field in overrides and overrides[field] != getattr(ctx, degree):
            raise ConfigError(
                f"{field}={overrides[field]} disagrees with the context's {degree}={getattr(ctx, degree)}; "
                f"change the ParallelContext instead"
            )
    kwargs.update(overrides)
    if kwargs.get("sequence_parallel") and ctx.tp == 1:
        raise ConfigError("sequence_parallel=True needs tensor parallelism, but the context has tp=1")
    if ctx.pp > 1 and kwargs.get("pipeline_dtype") is None:
        raise ConfigError(
            f"pipeline parallelism (pp={ctx.pp}) needs pipeline_dtype (the dtype sent between "
            f"stages), e.g. pipeline_dtype=torch.float32"
        )
    return kwargs


def transformer_config(
    ctx: ParallelContext,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
    vocab_size: int | None = None,
    **overrides: Any,
):
    """A Llama-style ``TransformerConfig`` (RMSNorm, SwiGLU, no biases, no dropout) for the context.

    ``vocab_size`` is only checked (Megatron takes it in the model, not the config).
    Raises before anything is built when tp does not divide heads, query groups,
    FFN size or vocabulary.
    """
    import_megatron()
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    ffn = ffn_hidden_size if ffn_hidden_size is not None else 4 * hidden_size
    split_for_tp(
        ctx.tp, num_attention_heads, num_query_groups, ffn, vocab_size, replicate_kv=False, pad_vocab=False
    )
    if hidden_size % num_attention_heads:
        raise ConfigError(
            f"num_attention_heads={num_attention_heads} does not divide hidden_size={hidden_size}"
        )
    kwargs: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_query_groups": num_query_groups,
        "ffn_hidden_size": ffn,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
    }
    kwargs.update(_parallel_kwargs(ctx, overrides))
    return TransformerConfig(**kwargs)


# ------------------------------------------------------------ process groups
def process_groups(ctx: ParallelContext, names: Sequence[str] | None = None):
    """A megatron-core ``ProcessGroupCollection`` holding the context's groups.

    Its field names are the context's group names; by default every field the
    installed version defines that the context knows. Collective when it must
    create groups the context has not adopted yet.
    """
    import dataclasses

    import_megatron()
    from megatron.core.process_groups_config import ProcessGroupCollection

    if names is None:
        fields = {f.name for f in dataclasses.fields(ProcessGroupCollection)}
        names = [n for n in STATE_GLOBALS if n in fields]
    return ProcessGroupCollection(**{n: ctx.group(n) for n in names})


# -------------------------------------------------------------------- models
def build_gpt_model(
    ctx: ParallelContext,
    config: Any,
    *,
    vocab_size: int,
    max_sequence_length: int,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    rope_scaling_factor: float | None = None,
):
    """A megatron-core ``GPTModel`` (local spec: no Transformer Engine) on the context's groups.

    RoPE positions, this rank's pipeline stage (pre/post-processing) and every
    process group come from the context. Run it inside :func:`cpu_compat` (which
    also provides Megatron's activation buffer) or :func:`bind_parallel_state`;
    ``rope_scaling_factor``: Llama-3.1 rope scaling (None: none). megatron-core 0.16's vocab-parallel loss still reads ``parallel_state``, so
    training with labels needs the binding.
    """
    import_megatron()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    split_for_tp(
        ctx.tp,
        config.num_attention_heads,
        config.num_query_groups,
        vocab=vocab_size,
        replicate_kv=False,
        pad_vocab=False,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization=config.normalization,
        qk_layernorm=config.qk_layernorm,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=ctx.is_first_pp_stage,
        post_process=ctx.is_last_pp_stage,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rope_scaling=rope_scaling_factor is not None,
        rope_scaling_factor=rope_scaling_factor or 8.0,
        pg_collection=process_groups(ctx),
    )


def gpt_model(ctx: ParallelContext, spec: GPTConfig, **config_overrides: Any) -> tuple[Any, Any]:
    """megatron-core's ``TransformerConfig`` and ``GPTModel`` of a model spec on the context's groups
    (``config_overrides``: training settings such as ``init_method_std``, ``pipeline_dtype``)."""
    config = transformer_config(ctx, **spec.megatron_config(), vocab_size=spec.padded_vocab_size, **config_overrides)
    return config, build_gpt_model(ctx, config, **spec.megatron_model())


__all__ = [
    "CpuRNGStatesTracker",
    "bind_parallel_state",
    "build_gpt_model",
    "gpt_model",
    "context_from_megatron",
    "cpu_compat",
    "import_megatron",
    "memory_buffer",
    "model_parallel_config",
    "model_parallel_manual_seed",
    "process_groups",
    "transformer_config",
]
