"""Every Megatron model argument, classified once: read into :class:`GPTConfig`, required at the value
vLLM's Llama computes (refused by name otherwise), or without effect on a forward pass.

Names are megatron-core ``TransformerConfig`` fields and the Megatron-LM arguments they come from
(``apply_layernorm_1p`` -> ``layernorm_zero_centered_gamma``, ``swiglu`` -> ``gated_linear_unit``,
``num_experts`` -> ``num_moe_experts``...). ``tests/test_bad_inputs.py`` walks the installed
``TransformerConfig``: a field this table does not classify fails it, so a new megatron-core argument
cannot be ignored silently; on the ``TransformerConfig`` path an unclassified field away from its
default is refused at run time too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from parallel_bridge.spec import families

MAPPED = frozenset(
    """num_layers hidden_size num_attention_heads num_query_groups group_query_attention ffn_hidden_size
    kv_channels vocab_size padded_vocab_size true_vocab_size max_position_embeddings seq_length rotary_base
    norm_epsilon layernorm_epsilon untie_embeddings_and_output_weights tie_embeddings activation_func
    add_qkv_bias qk_layernorm use_rope_scaling rope_scaling rope_scaling_factor window_size num_experts
    num_moe_experts moe_router_topk moe_ffn_hidden_size moe_router_pre_softmax""".split()
)
"""Read into GPTConfig (``activation_func`` is checked to be SiLU under a gated unit): QKV biases (Qwen2),
QK layernorm (Qwen3), Llama-3.1 rope scaling, a causal sliding window on every layer (Mistral) and a softmax-routed MoE MLP on every
layer (Mixtral, Qwen3-MoE) are mapped to the vLLM family that computes them."""

_NONE = (None, 0, False)
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "normalization": (("RMSNorm",), "normalization other than RMSNorm"),
    "apply_layernorm_1p": ((False, None), "zero-centred norm weights"),
    "layernorm_zero_centered_gamma": ((False, None), "zero-centred norm weights"),
    "apply_residual_connection_post_layernorm": ((False, None), "residual taken after the norm"),
    "position_embedding_type": (("rope",), "position embeddings other than rope"),
    "rotary_percent": ((1.0, None), "partial rotary embedding"),
    "rotary_interleaved": ((False, None), "interleaved rotary embedding"),
    "rotary_seq_len_interpolation_factor": ((None, 1, 1.0), "rotary position interpolation"),
    "seq_len_interpolation_factor": ((None, 1, 1.0), "rotary position interpolation"),
    "mrope_section": ((None,), "multimodal rope"),
    "no_rope_freq": ((None,), "layers without rope"),
    "qk_l2_norm": ((False, None), "QK L2 norm"),
    "add_bias_linear": ((False, None), "biases on linear layers"),
    "softmax_scale": ((None,), "a custom softmax scale"),
    "softmax_type": (("vanilla", None), "a non-standard softmax"),
    "window_attn_skip_freq": ((None,), "sliding-window attention"),
    "attention_output_gate": ((False, None), "gated attention output"),
    "multi_latent_attention": ((False, None), "MLA (multi-latent attention)"),
    "experimental_attention_variant": ((None,), "an experimental attention variant"),
    "linear_attention_freq": ((None,), "linear-attention layers"),
    "swiglu": ((True,), "a non-gated MLP (needs SwiGLU)"),
    "gated_linear_unit": ((True,), "a non-gated MLP (needs SwiGLU)"),
    "squared_relu": ((False, None), "squared-ReLU activation"),
    "quick_geglu": ((False, None), "quick-GeGLU activation"),
    "glu_linear_offset": ((0.0, None), "an offset GLU"),
    "activation_func_clamp_value": ((None,), "a clamped activation"),
    "moe_router_score_function": (("softmax", None), "a router score function other than softmax"),
    "moe_router_load_balancing_type": (("aux_loss", "seq_aux_loss", "global_aux_loss", "none", None),
                                       "routing balanced in the forward (sinkhorn)"),
    "moe_router_num_groups": (_NONE, "group-limited routing"),
    "moe_router_group_topk": (_NONE, "group-limited routing"),
    "moe_router_topk_limited_devices": (_NONE, "device-limited routing"),
    "moe_router_topk_scaling_factor": ((None, 1, 1.0), "scaled routing weights"),
    "moe_router_enable_expert_bias": ((False, None), "an aux-loss-free expert bias in routing"),
    "moe_router_force_load_balancing": ((False, None), "routing forced to balance (not by the router)"),
    "moe_router_force_biased": ((False, None, 0, 0.0), "routing forced to be biased"),
    "moe_input_jitter_eps": ((None,), "router input jitter"),
    "moe_shared_expert_intermediate_size": (_NONE, "shared experts"),
    "moe_shared_expert_gate": ((False, None), "a gated shared expert"),
    "moe_layer_freq": ((1, None), "dense layers among the MoE layers"),
    "moe_expert_capacity_factor": ((None,), "expert capacity (tokens dropped)"),
    "moe_expert_rank_capacity_factor": ((None,), "expert capacity (tokens dropped)"),
    "moe_pad_expert_input_to_capacity": ((False, None), "expert inputs padded to capacity"),
    "moe_apply_probs_on_input": ((False, None), "routing weights applied to the expert's input"),
    "moe_latent_size": ((None,), "latent MoE"),
    "moe_mlp_glu_interleave_size": ((None,), "interleaved gate/up rows in the experts"),
    "moe_shared_expert_glu_interleave_size": ((None,), "interleaved gate/up rows in the shared experts"),
    "mtp_num_layers": (_NONE, "multi-token prediction layers"),
    "is_hybrid_model": ((False, None), "a hybrid Mamba model"),
    "hybrid_override_pattern": ((None,), "a hybrid Mamba model"),
    "heterogeneous_block_specs": ((False, None), "heterogeneous layers"),
    "heterogeneous_layers_config_path": ((None,), "heterogeneous layers"),
    "fp8_param": ((False, None), "FP8 parameters"),
    "fp4_param": ((False, None), "FP4 parameters"),
    "use_mup": ((False, None), "muP scaling (embedding and output multipliers, attention scale)"),
}
"""Argument -> (values at which vLLM's Llama-family models compute the same thing, what any other value means)."""

NO_MATH = frozenset(
    """mtp_loss_scaling_factor num_layers_in_first_pipeline_stage num_layers_in_last_pipeline_stage
    pipeline_model_parallel_layout account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split
    attention_backend hidden_dropout attention_dropout fp32_residual_connection activation_func_fp8_input_store
    qk_clip qk_clip_alpha qk_clip_threshold log_max_attention_logit test_mode calculate_per_token_loss
    dsa_indexer_n_heads dsa_indexer_head_dim dsa_indexer_topk dsa_indexer_loss_coeff dsa_indexer_use_sparse_loss
    linear_conv_kernel_dim linear_key_head_dim linear_value_head_dim linear_num_key_heads linear_num_value_heads
    init_method output_layer_init_method init_method_std embedding_init_method embedding_init_method_std
    init_model_with_meta_device apply_query_key_layer_scaling attention_softmax_in_fp32
    disable_bf16_reduced_precision_matmul bias_activation_fusion masked_softmax_fusion persist_layer_norm
    memory_efficient_layer_norm bias_dropout_fusion apply_rope_fusion use_fused_weighted_squared_relu
    fused_single_qkv_rope recompute_granularity recompute_method recompute_num_layers distribute_saved_activations
    recompute_modules fp8 fp8_recipe fp8_quantizer_factory fp8_margin fp8_interval fp8_amax_history_len
    fp8_amax_compute_algo fp8_wgrad fp8_dot_product_attention fp8_multi_head_attention tp_only_amax_red
    first_last_layers_bf16 num_layers_at_start_in_bf16 num_layers_at_end_in_bf16 use_kitchen use_kitchen_attention
    kitchen_attention_backend fp4 fp4_recipe fp4_quantizer_factory moe_shared_expert_overlap
    moe_enable_routing_replay moe_router_padding_for_quantization moe_router_padding_for_fp8 moe_router_dtype
    moe_router_bias_update_rate moe_grouped_gemm moe_use_legacy_grouped_gemm moe_aux_loss_coeff moe_z_loss_coeff
    moe_token_dropping moe_token_dispatcher_type moe_enable_deepep moe_flex_dispatcher_backend
    moe_per_layer_logging moe_token_drop_policy moe_layer_recompute moe_permute_fusion moe_router_fusion
    moe_deepep_num_sms moe_hybridep_num_sms cp_comm_type enable_cuda_graph cuda_graph_use_single_mempool
    cuda_graph_retain_backward_graph cuda_graph_warmup_steps external_cuda_graph cuda_graph_impl cuda_graph_scope
    clone_scatter_output_in_embedding disable_parameter_transpose_cache config_logger_dir flash_decode
    batch_invariant_mode use_te_activation_func inference_rng_tracker inference_sampling_seed symmetric_ar_type
    use_inference_optimized_layers inference_fuse_tp_communication mamba_state_dim mamba_head_dim mamba_num_groups
    mamba_num_heads use_mamba_mem_eff_path mlp_chunks_for_prefill hetereogenous_dist_checkpoint quant_recipe
    transformer_impl fine_grained_activation_offloading offload_modules min_offloaded_tensor_size
    make_vocab_size_divisible_by mtp_use_repeated_layer mtp_detach_heads mtp_hybrid_override_pattern
    flash_attention_version experimental_attention_variant_loss_scale_func dsa_indexer_topk_freq
    dsa_indexer_skip_topk_offset dsa_kernel_backend dsa_indexer_rope_interleaved dsa_indexer_rotate_activation
    dsa_indexer_scoring_relu dsa_indexer_k_norm_epsilon dsa_indexer_k_norm_fp32 mup_width_mult mup_base_hidden_size
    mup_embedding_mult mup_output_mult mup_base_head_dim mup_attn_scale_power fused_residual_rmsnorm
    use_transformer_engine_op_fuser fp8_output_proj high_priority_a2a_comm_stream
    use_grouped_gemm_for_shared_expert moe_router_quantile_balancing_ema use_grouped_gemm_for_dense_mlp
    moe_single_grouped_weight moe_single_grouped_bias moe_permute_fusion_into_hybridep
    moe_hybridep_pad_uneven_dispatch_inputs moe_pad_experts_for_cuda_graph_inference moe_flex_dispatcher_num_sms
    moe_hybridep_num_blocks_permute moe_hybridep_num_blocks_unpermute moe_hybridep_num_sms_preprocessing
    moe_ncclep_static_shape moe_ncclep_zero_copy cuda_graph_modules inference_cuda_graph_scope
    nccl_all_reduce_for_prefill inference_disable_triton_nvls_kernels inference_grouped_gemm_backend
    inference_moe_disable_fused_quant_kernels inference_moe_token_dispatcher_type mamba_training_ssm_states_dtype
    mlp_chunks_for_training delay_offload_until_cuda_graph delta_offload_bytes_across_pp_ranks
    activation_offload_fraction moe_paged_stash moe_paged_stash_page_size moe_paged_stash_buffer_size_factor_cuda
    moe_paged_stash_buffer_size_factor_cpu fine_grained_offloading_max_inflight_offloads q_lora_rank kv_lora_rank""".split()
)
"""No effect on the math of a served forward: training, kernels, precision recipes, initialisation,
and fields that only matter under a feature refused above (shared experts, Mamba, MLA, muP, DSA); megatron-core 0.16.1's
``TransformerConfig`` fields and those 0.17-0.19.2 added."""

PARALLEL = frozenset(
    """_cpu_offloading_context async_tensor_model_parallel_allreduce autocast_dtype barrier_with_L1_time
    batch_p2p_comm batch_p2p_sync bf16 context_parallel_size cpu_offloading cpu_offloading_activations
    cpu_offloading_double_buffering cpu_offloading_num_layers cpu_offloading_retain_pinned_cpu_buffers
    cpu_offloading_weights cross_entropy_fusion_impl cross_entropy_loss_fusion deallocate_pipeline_outputs
    defer_embedding_wgrad_compute delay_wgrad_compute deterministic_mode enable_autocast
    ep_overlap_early_attn_memory_release expert_gtp_weight_remat_size expert_model_parallel_size
    expert_tensor_parallel_num_weight_shards expert_tensor_parallel_size finalize_model_grads_func fp16
    grad_scale_func grad_sync_func gradient_accumulation_fusion gtp_weight_remat_size
    hierarchical_context_parallel_sizes hybrid_context_parallel max_seqlen_per_dp_cp_rank
    microbatch_group_size_per_vp_stage moe_extended_tp moe_grad_scale_func mtp_grad_scale_func mtp_standalone
    no_sync_func num_microbatches_with_partial_activation_checkpoints overlap_dispatch_backward_with_experts_wgrad
    overlap_moe_expert_parallel_comm overlap_p2p_comm overlap_p2p_comm_warmup_flush param_sync_func params_dtype
    perform_initialization pipeline_dtype pipeline_model_parallel_comm_backend pipeline_model_parallel_size
    sequence_parallel tensor_model_parallel_size tensor_parallel_num_weight_shards timers tp_comm_atomic_ag
    tp_comm_atomic_rs tp_comm_bootstrap_backend tp_comm_bulk_dgrad tp_comm_bulk_wgrad tp_comm_overlap
    tp_comm_overlap_ag tp_comm_overlap_disable_fc1 tp_comm_overlap_disable_qkv tp_comm_overlap_rs
    tp_comm_overlap_rs_dgrad tp_comm_split_ag tp_comm_split_rs use_cpu_initialization use_ring_exchange_p2p
    use_te_rng_tracker variable_seq_lengths virtual_pipeline_model_parallel_size wgrad_deferral_limit""".split()
)
"""megatron-core's ``ModelParallelConfig`` fields (0.16.1 and 0.19.2): how a model is split, scheduled and
kept in memory while training, never what it computes; written out so a config file can be classified
without megatron-core installed."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare are not neutral
        return False


def refused_features(get: Callable[[str, Any], Any]) -> list[str]:
    """``name=value (what it means)`` for every argument away from vLLM Llama's math that no registered family
    maps; ``get(name, default)`` reads the arguments (absent ones count as neutral)."""
    out = away_from(get, NEUTRAL, families.megatron_claims())  # and values a registered family maps
    activation = get("activation_func", None)
    if activation is not None and get("gated_linear_unit", get("swiglu", True)):
        import torch.nn.functional as F

        if activation is not F.silu:
            out.append(f"activation_func={getattr(activation, '__name__', activation)} (needs SiLU under SwiGLU)")
    return out


def _every_layer(value: Any) -> Any:
    """``moe_layer_freq`` as a per-layer list of ones is MoE on every layer, as 1 is (megatron-core then stores
    per-layer keys, ``decoder.layers.{i}.mlp...``, not the stacked layer axis: the reader takes both)."""
    if isinstance(value, (list, tuple)) and value and all(_same(v, 1) for v in value):
        return 1
    return value


_EQUIVALENT: dict[str, Callable[[Any], Any]] = {"moe_layer_freq": _every_layer}
"""Values written another way that mean a neutral one."""


def away_from(
    get: Callable[[str, Any], Any], table: dict[str, tuple[tuple[Any, ...], str]], claimed: dict | None = None
) -> list[str]:
    """``name=value (what it means)`` for every field of ``table`` (name -> (neutral values, meaning)) that
    ``get(name, default)`` reads away from its neutral values and from those ``claimed`` maps; absent is neutral."""
    out = []
    missing = object()
    for name, (ok, meaning) in table.items():
        value = _EQUIVALENT.get(name, lambda v: v)(get(name, missing))
        if value is missing or any(_same(value, v) for v in (*ok, *(claimed or {}).get(name, ()))):
            continue
        out.append(f"{name}={value if isinstance(value, str) else repr(value)} ({meaning})")
    return out


def unclassified_changes(config: Any) -> list[str]:
    """Fields of a megatron-core config dataclass this table does not classify, away from their defaults."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_fields = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    known = MAPPED | NO_MATH | set(NEUTRAL) | parallel_fields
    out = []
    for f in dataclasses.fields(config):
        if f.name in known or f.default is dataclasses.MISSING:
            continue
        value = getattr(config, f.name)
        if value != f.default:
            out.append(f"{f.name}={value!r} (an argument parallel_bridge does not know)")
    return out
