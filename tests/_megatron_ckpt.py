"""Megatron checkpoints written by Megatron's own code, and Megatron's own forward of them.

Run on torchrun-like ranks through parallel_bridge.testing.run_distributed.
"""

import argparse
from pathlib import Path

import torch

from parallel_bridge.adapters import megatron
from parallel_bridge.checkpoint.megatron_save import save_torch_dist
from parallel_bridge.numerics import parity
from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.spec.model import GPTConfig

SIZES = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "ffn_hidden_size": 256}
PROMPTS = [[5, 17, 42], [3, 9, 27, 81, 11, 2], [64]]
STEPS = 4
SEQ = 64


def spec_of(variant) -> GPTConfig:
    """The model spec of a test variant (its family settings under megatron-core's names)."""
    family = dict(variant.get("config", {}))
    window = family.pop("window_size", None)
    return GPTConfig(
        **SIZES, num_query_groups=variant["groups"], vocab_size=variant["vocab"], padded_vocab_size=variant["padded"],
        max_position_embeddings=SEQ, tie_embeddings=variant["tied"], rotary_base=variant.get("rotary_base", 10000.0),
        rope_scaling_factor=variant.get("rope_scaling_factor"), sliding_window=None if window is None else window[0] + 1,
        **family,
    )


def build(ctx, variant):
    """(TransformerConfig, GPTModel) of the variant on the context's groups, family tensors perturbed."""
    extra = {"pipeline_dtype": torch.float32} if ctx.pp > 1 else {}
    extra.update(variant.get("megatron", {}))  # TransformerConfig settings the spec leaves at their defaults
    config, model = megatron.gpt_model(ctx, spec_of(variant), init_method_std=0.2, **extra)
    _perturb_family_tensors(ctx, model)
    return config, model


@torch.no_grad()
def _perturb_family_tensors(ctx, model):
    """Megatron starts QKV biases at zero and QK layernorm weights at one, where a mapping that drops or
    misplaces them would still pass; give them values (replicated ones equal on every TP rank)."""
    for name, p in model.named_parameters():
        if name.endswith("linear_qkv.bias"):
            g = torch.Generator().manual_seed(100 + ctx.tp_rank)  # a TP shard: each rank its own rows
            p.copy_(torch.randn(p.shape, generator=g))
        elif "q_layernorm" in name or "k_layernorm" in name:
            g = torch.Generator().manual_seed(200 + int("k_layernorm" in name))
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def length(variant) -> int:
    """Terms summed per logit along the residual path for these sizes (the parity rule's ``K``; an MoE layer sums
    its top-k experts' FFN columns)."""
    sizes = {"groups": 1, "vocab": variant["padded"], "tied": False, **variant}  # only the sizes matter
    return parity.reduction_length_of(spec_of(sizes), max(map(len, PROMPTS)) + STEPS)


@torch.no_grad()
def megatron_decode(ctx, model, vocab):
    """Megatron's forward (TP only): per prompt, greedy tokens, the first-step log-softmax over the true
    vocabulary and the largest |logit| at any position."""
    model.eval()
    out = []
    for prompt in PROMPTS:
        ids, first, zmax = list(prompt), None, 0.0
        for step in range(STEPS):
            x = torch.tensor([ids])
            logits = ctx.comm("tp").all_gather(model(x, torch.arange(len(ids))[None], attention_mask=None))
            zmax = max(zmax, logits[0, :, :vocab].abs().max().item())
            lp = torch.log_softmax(logits[0, -1, :vocab].double(), -1)
            first = lp if step == 0 else first
            ids.append(int(lp.argmax()))
        out.append((ids[len(prompt) :], first.tolist(), zmax))
    return out


def save_dist(root, tp, pp, variant, ep=1, etp=None):
    ctx = context_from_torchrun(tp=tp, pp=pp, ep=ep, etp=etp, timeout_s=120)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, variant["seed"])
        _, model = build(ctx, variant)
        save_torch_dist(ctx, model, root, 10, spec_of(variant))


def reference_from_dist(root, variant, tp=1, iteration=10, ep=1):
    """Megatron loads the checkpoint itself (resharding to ``tp``, experts to ``ep``) and runs its forward."""
    from megatron.core import dist_checkpointing

    ctx = context_from_torchrun(tp=tp, ep=ep, timeout_s=120)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, 999)
        _, model = build(ctx, variant)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(root) / f"iter_{iteration:07d}"))
        model.load_state_dict(state)
        return megatron_decode(ctx, model, variant["vocab"])


def megatron_lm_args(config, variant):
    """The fields of Megatron-LM's argparse namespace that describe the model."""
    return argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        group_query_attention=True,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        padded_vocab_size=variant["padded"],
        vocab_size=variant["vocab"],
        max_position_embeddings=SEQ,
        seq_length=SEQ,
        position_embedding_type="rope",
        rotary_base=variant.get("rotary_base", 10000),
        normalization="RMSNorm",
        norm_epsilon=config.layernorm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm,
        window_size=config.window_size,
        use_rope_scaling=variant.get("rope_scaling_factor") is not None,
        rope_scaling_factor=variant.get("rope_scaling_factor") or 8.0,
        untie_embeddings_and_output_weights=not variant["tied"],
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size,
        num_experts=config.num_moe_experts,
        moe_router_topk=config.moe_router_topk,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        make_vocab_size_divisible_by=128,
        ckpt_format="torch",
    )


def save_legacy(root, tp, variant, ep=1):
    """Per-rank torch.save files as Megatron-LM's legacy 'torch' format writes them (``mp_rank_TT[_EEE]``, written
    by expert-data-parallel rank 0, experts under local indices); returns Megatron's decode."""
    ctx = context_from_torchrun(tp=tp, ep=ep, timeout_s=120)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, variant["seed"])
        config, model = build(ctx, variant)
        folder = Path(root) / "iter_0000010" / (f"mp_rank_{ctx.tp_rank:02d}" + (f"_{ctx.ep_rank:03d}" if ep > 1 else ""))
        if ctx.expert_dp_rank:
            return megatron_decode(ctx, model, variant["vocab"])
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "args": megatron_lm_args(config, variant),
            "checkpoint_version": 3.0,
            "iteration": 10,
            "model": model.state_dict_for_save_checkpoint(),
            "rng_state": [{"random_rng_state": None}],
        }
        torch.save(state, folder / "model_optim_rng.pt")
        if ctx.rank == 0:
            (Path(root) / "latest_checkpointed_iteration.txt").write_text("10")
        return megatron_decode(ctx, model, variant["vocab"])


@torch.no_grad()
def _route_margin(model, prompts):
    """The smallest gap between the k-th and (k+1)-th router logit over every token and MoE layer of the
    prompts' greedy continuations: how far fp32 noise (~1e-6) is from flipping a top-k choice."""
    margins = []

    def hook(router, args, _out):
        logits = args[0].reshape(-1, args[0].shape[-1]) @ router.weight.t()
        top = logits.topk(router.topk + 1, dim=-1).values
        margins.append((top[:, router.topk - 1] - top[:, router.topk]).min().item())

    handles = [layer.mlp.router.register_forward_hook(hook) for layer in model.decoder.layers]
    try:
        for prompt in prompts:
            model(torch.tensor([prompt]), torch.arange(len(prompt))[None], attention_mask=None)
    finally:
        for h in handles:
            h.remove()
    return min(margins)


@torch.no_grad()
def _swap_experts(model, a, b, copy=False):
    """Layer 0's experts ``a`` and ``b`` swapped (or ``b`` made a copy of ``a``): what a mapping that misplaces
    or duplicates an expert would serve."""
    experts = model.decoder.layers[0].mlp.experts.local_experts
    for pa, pb in zip(experts[a].parameters(), experts[b].parameters(), strict=True):
        saved = pb.detach().clone()
        pb.copy_(pa)
        if not copy:
            pa.copy_(saved)


def moe_reference(root, variant, iteration=10):
    """Megatron loads the MoE checkpoint at TP=1, EP=1 (resharding the expert axis itself): its decode, its full
    tensors by name, the smallest router margin, and its decodes with two experts swapped and one duplicated."""
    from megatron.core import dist_checkpointing

    ctx = context_from_torchrun(timeout_s=120)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, 999)
        _, model = build(ctx, variant)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(root) / f"iter_{iteration:07d}"))
        model.load_state_dict(state)
        reference = megatron_decode(ctx, model, variant["vocab"])
        tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        margin = _route_margin(model, [ids + toks for ids, (toks, _, _) in zip(PROMPTS, reference, strict=True)])
        _swap_experts(model, 0, 1)
        swapped = megatron_decode(ctx, model, variant["vocab"])
        _swap_experts(model, 0, 1)
        _swap_experts(model, 0, 1, copy=True)
        duplicated = megatron_decode(ctx, model, variant["vocab"])
        return {"reference": reference, "tensors": tensors, "margin": margin, "swapped": swapped,
                "duplicated": duplicated}
