"""Megatron adapter: configs, groups and megatron-core layers over a ParallelContext (gloo, fp32).

Tolerance: fp32 results of the sharded layers may differ from the single-process
reference only by summation order (partial sums all-reduced across TP ranks,
gradients summed across DP replicas): the parity rule's value bound
(``parallel_bridge.numerics.parity.value_bound``: 7 u sqrt(K) times the values' magnitude, K the
terms summed along the path); the measured maximum is printed with -s.
"""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from _helpers import pipeline_step

from parallel_bridge import ParallelContext
from parallel_bridge.numerics import parity
from parallel_bridge.spec import schema
from parallel_bridge.testing import run_distributed

pytest.importorskip("megatron.core")

from parallel_bridge.adapters import megatron  # noqa: E402
from parallel_bridge.adapters.megatron import context_from_megatron
from parallel_bridge.parallel.launch import context_from_torchrun


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, what: str, length: int) -> float:
    """max|got - want| within the value bound for ``length`` summed terms; returns the gap over that bound."""
    bound = parity.value_bound(want.abs().max().item(), length)
    gap = (got - want).abs().max().item()
    assert gap <= bound, f"{what}: max|diff| = {gap:.2e} > {bound:.2e} (fp32 rounding over {length} terms)"
    return gap / bound


def _inputs(batch=4, seq=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(seq, batch, 64, generator=g)
    probe = torch.randn(seq, batch, 64, generator=g)
    return x, probe


# ------------------------------------------------------------------ block parity
def _block_run(tp, pp, num_layers):
    import _megatron_block as blk

    ctx = context_from_torchrun(tp=tp, pp=pp, timeout_s=60)
    overrides = {"pipeline_dtype": torch.float32} if pp > 1 else {}
    config = megatron.model_parallel_config(ctx, perform_initialization=False, **overrides)
    full = blk.full_weights(num_layers)
    per_stage = num_layers // pp
    offset = schema.layer_offset(num_layers, pp, ctx.pp_rank)
    layers = torch.nn.ModuleList(pm_layer(blk, ctx, config) for _ in range(per_stage))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for name, p in layer.params().items():
                key = f"layers.{offset + i}.{name}"
                p.copy_(schema.shard(key.replace("layers.", "decoder.layers."), full[key], tp, ctx.tp_rank))
    x_all, probe_all = _inputs()
    # data parallel: each replica takes its slice of the batch
    bs = x_all.shape[1] // ctx.dp
    sl = slice(ctx.dp_rank * bs, (ctx.dp_rank + 1) * bs)
    x = x_all[:, sl].clone().requires_grad_(True)
    probe = probe_all[:, sl]
    last = {}

    def stage(h):
        for layer in layers:
            h = layer(h)
        last["out"] = h
        return h

    pipeline_step(ctx, x, tuple(x.shape), stage, lambda out: (out * probe).sum())
    grads = {}
    for i, layer in enumerate(layers):
        for name, p in layer.params().items():
            g = p.grad.clone()
            dist.all_reduce(g, group=ctx.dp_group)  # DP: sum the replicas' gradients
            grads[f"layers.{offset + i}.{name}"] = g
    return {
        "tp_rank": ctx.tp_rank,
        "pp_rank": ctx.pp_rank,
        "dp_rank": ctx.dp_rank,
        "out": last["out"].detach() if ctx.is_last_pp_stage else None,
        "x_grad": x.grad if ctx.is_first_pp_stage else None,
        "grads": grads,
        "slice": (sl.start, sl.stop),
    }


def pm_layer(blk, ctx, config):
    return blk.MegatronLayer(ctx, config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,tp,pp,num_layers",
    [(1, 1, 1, 1), (2, 2, 1, 1), (4, 4, 1, 1), (4, 2, 1, 1), (4, 2, 2, 2)],
    ids=["tp1", "tp2", "tp4", "tp2xdp2", "tp2xpp2"],
)
def test_megatron_block_matches_full_weight_reference(world, tp, pp, num_layers):
    import _megatron_block as blk

    results = run_distributed(_block_run, world, tp, pp, num_layers, timeout_s=180)
    full = {k: v.clone().requires_grad_(True) for k, v in blk.full_weights(num_layers).items()}
    x_all, probe = _inputs()
    x_ref = x_all.clone().requires_grad_(True)
    out_ref = blk.reference_block(x_ref, full, range(num_layers))
    (out_ref * probe).sum().backward()
    worst = 0.0
    seq, tokens = x_all.shape[0], x_all.shape[0] * x_all.shape[1]
    forward, backward = blk.length(num_layers, seq), blk.length(num_layers, seq, tokens)
    for r in results:
        sl = slice(*r["slice"])
        if r["out"] is not None:
            worst = max(worst, assert_close_scaled(r["out"], out_ref.detach()[:, sl], "output", forward))
        if r["x_grad"] is not None:
            worst = max(worst, assert_close_scaled(r["x_grad"], x_ref.grad[:, sl], "input gradient", backward))
    # every weight gradient, gathered over TP ranks with Megatron's layout
    for key in full:
        stage = [r for r in results if key in r["grads"] and r["dp_rank"] == 0]
        shards = [r["grads"][key] for r in sorted(stage, key=lambda r: r["tp_rank"])]
        merged = schema.merge("decoder." + key, shards)
        worst = max(worst, assert_close_scaled(merged, full[key].grad, f"gradient of {key}", backward))
    print(f"\n[megatron block tp={tp} pp={pp} world={world}] worst max|diff| / bound = {worst:.2f}")


# ------------------------------------------------------------------- GPTModel
GPT = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
}
VOCAB, SEQ = 128, 16
GPT_LENGTH = parity.reduction_length(hidden=64, ffn=128, layers=2, vocab=VOCAB, heads=4, head_dim=16, seq_len=SEQ)
"""Terms summed per logit; the loss (a mean over 2 x SEQ tokens) and the weights after SGD steps (through
the gradients: the path back and the sum over the tokens) are values of the parity rule over these."""


def _gpt_step(tp, pp, full_state):
    """Two SGD steps of a megatron-core GPTModel; returns the losses and the final weights.

    Pipeline stages are driven by hand (``set_input_tensor`` + send/recv on the
    context's pp group): megatron-core 0.16.1's schedules allocate a CUDA tensor
    unconditionally (``torch.zeros(..., device="cuda")`` in schedules.py), so they
    cannot run on CPU.
    """
    ctx = context_from_torchrun(tp=tp, pp=pp, timeout_s=60)
    extra = {"pipeline_dtype": torch.float32} if pp > 1 else {}
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, 1234)
        config = megatron.transformer_config(ctx, **GPT, vocab_size=VOCAB, **extra)
        model = megatron.build_gpt_model(ctx, config, vocab_size=VOCAB, max_sequence_length=SEQ)
        offset = schema.layer_offset(GPT["num_layers"], pp, ctx.pp_rank)
        if full_state is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(schema.shard(name, full_state[schema.global_name(name, offset)], tp, ctx.tp_rank))
        losses = []

        def stage(x):
            if x is not None:
                model.set_input_tensor(x)
            labelled = labels if ctx.is_last_pp_stage else None
            return model(ids if x is None else None, pos, attention_mask=None, labels=labelled)

        for _ in range(2):
            model.zero_grad()
            loss = pipeline_step(ctx, None, (SEQ, 2, GPT["hidden_size"]), stage, lambda out: out.float().mean())
            if loss is not None:
                losses.append(loss.item())
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad  # untied embeddings: no embedding-group all-reduce needed
        state = {schema.global_name(n, offset): p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "state": state, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank}


@pytest.mark.slow
def test_gpt_model_training_step_tp2_and_tp2xpp2_match_tp1():
    initial = _initial_state()
    (ref,) = run_distributed(_gpt_step, 1, 1, 1, initial, timeout_s=180)
    assert ref["losses"][1] < ref["losses"][0]  # the step changed the model
    for tp, pp, world in [(2, 1, 2), (2, 2, 4)]:
        results = run_distributed(_gpt_step, world, tp, pp, initial, timeout_s=240)
        losses = [r["losses"] for r in results if r["losses"]]
        assert len(losses) == tp  # every last-stage rank computed the loss
        for got in losses:
            for a, b in zip(got, ref["losses"]):
                assert abs(a - b) <= parity.value_bound(abs(b), GPT_LENGTH + 2 * SEQ), (tp, pp, got, ref["losses"])
        # weights after the steps, gathered over TP, equal TP=1's
        for key, want in ref["state"].items():
            shards = [
                r["state"][key] for r in sorted(results, key=lambda r: r["tp_rank"]) if key in r["state"]
            ]
            merged = schema.merge(key, shards[:tp])
            bound = parity.value_bound(want.abs().max().item(), 2 * GPT_LENGTH + 2 * SEQ)
            assert (merged - want).abs().max().item() <= bound, key
        print(f"\n[gpt tp={tp} pp={pp}] losses {losses[0]} vs tp1 {ref['losses']}")


def _initial_state():
    """Deterministic full (TP=1) weights for the GPT test."""
    g = torch.Generator().manual_seed(7)
    h, ffn, kv = GPT["hidden_size"], GPT["ffn_hidden_size"], GPT["num_query_groups"]
    qkv = (GPT["num_attention_heads"] + 2 * kv) * (h // GPT["num_attention_heads"])
    state = {
        "embedding.word_embeddings.weight": torch.randn(VOCAB, h, generator=g) * 0.5,
        "decoder.final_layernorm.weight": torch.ones(h),
        "output_layer.weight": torch.randn(VOCAB, h, generator=g) * h**-0.5,
    }
    for i in range(GPT["num_layers"]):
        p = f"decoder.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        state[p + "self_attention.linear_qkv.weight"] = torch.randn(qkv, h, generator=g) * h**-0.5
        state[p + "self_attention.linear_proj.weight"] = torch.randn(h, h, generator=g) * h**-0.5
        state[p + "pre_mlp_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        state[p + "mlp.linear_fc1.weight"] = torch.randn(2 * ffn, h, generator=g) * h**-0.5
        state[p + "mlp.linear_fc2.weight"] = torch.randn(h, ffn, generator=g) * ffn**-0.5
    return state


# -------------------------------------------------------------- foreign groups
def _pg_count():
    return len(dist.distributed_c10d._world.pg_map)


def _bind_foreign_group():
    from megatron.core import parallel_state as mps
    from megatron.core.tensor_parallel import RowParallelLinear

    # groups made by "someone else", as vLLM makes its TP, PP and DP groups
    foreign = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in (0, 1)]
    mine = singles[dist.get_rank()]
    ctx = context_from_torchrun(tp=2).with_groups({"tp": foreign, "pp": mine, "dp": mine})
    before = _pg_count()
    full = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx, names=["tp"]):
        bound = mps.get_tensor_model_parallel_group() is foreign
        layer = RowParallelLinear(
            6,
            8,
            config=megatron.model_parallel_config(ctx, perform_initialization=False),
            init_method=torch.nn.init.zeros_,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )  # no tp_group: reads the bound global
        with torch.no_grad():
            layer.weight.copy_(full.chunk(2, dim=1)[ctx.tp_rank])
        out, _ = layer(x.chunk(2, dim=1)[ctx.tp_rank])
    restored = mps._TENSOR_MODEL_PARALLEL_GROUP is None
    return bound, restored, _pg_count() - before, _over_bound(out, x @ full.T, 6)


def _over_bound(got, want, length):
    """max|got - want| over the parity rule's value bound for ``length`` summed terms (<= 1: rounding)."""
    return (got - want).abs().max().item() / parity.value_bound(want.abs().max().item(), length)


@pytest.mark.slow
def test_bind_uses_foreign_group_without_creating_one():
    for bound, restored, new_groups, err in run_distributed(_bind_foreign_group, 2, timeout_s=120):
        assert bound and restored
        assert new_groups == 0
        assert err <= 1.0  # within fp32 rounding of the 6-term sums


def _from_megatron():
    from megatron.core import parallel_state as mps

    mps.initialize_model_parallel(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, create_gloo_process_groups=False
    )
    ctx = context_from_megatron()
    same = ctx.group("tp") is mps.get_tensor_model_parallel_group()
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.pp_group)
    return ctx.tp, ctx.pp, ctx.dp, ctx.ranks("tp"), same, t.item()


@pytest.mark.slow
def test_context_from_megatron_parallel_state():
    for rank, (tp, pp, dp, tp_ranks, same, total) in enumerate(
        run_distributed(_from_megatron, 4, timeout_s=120)
    ):
        assert (tp, pp, dp) == (2, 2, 1) and same and total == 2.0
        assert tp_ranks == [rank - rank % 2, rank - rank % 2 + 1]


# --------------------------------------------------------------- CPU compat
def _cpu_compat_paths():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_cuda_rng_tracker

    ctx = context_from_torchrun(tp=2)
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(8, 6, generator=g), torch.randn(6, 8, generator=g)
    x = torch.randn(4, 2, 6, generator=g)  # [seq, batch, hidden]
    r = ctx.tp_rank
    results = {}

    def column(**kw):
        cfg = megatron.model_parallel_config(ctx, perform_initialization=False, **kw.pop("cfg", {}))
        layer = ColumnParallelLinear(
            6, 8, config=cfg, init_method=torch.nn.init.zeros_, bias=False, tp_group=ctx.tp_group, **kw
        )
        with torch.no_grad():
            layer.weight.copy_(w1.chunk(2)[r])
        return layer

    # without the compatibility layer, Megatron's own behaviour: the CUDA-only gather fails
    try:
        column(gather_output=True)(x)
        results["without"] = "ran"
    except (AssertionError, RuntimeError) as e:
        results["without"] = str(e)
    with megatron.cpu_compat():
        megatron.model_parallel_manual_seed(ctx, 42)
        out, _ = column(gather_output=True)(x)
        results["gather"] = _over_bound(out, x @ w1.T, 6)
        # sequence parallel: input split on the sequence, output reduce-scattered back to it
        seq_cfg = {"sequence_parallel": True}
        col = column(cfg=seq_cfg, gather_output=False)
        row = RowParallelLinear(
            8,
            6,
            config=megatron.model_parallel_config(ctx, perform_initialization=False, **seq_cfg),
            init_method=torch.nn.init.zeros_,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=ctx.tp_group,
        )
        with torch.no_grad():
            row.weight.copy_(w2.chunk(2, dim=1)[r])
        x_local = x.chunk(2, dim=0)[r].clone().requires_grad_(True)
        h, _ = col(x_local)
        y, _ = row(h)
        y.sum().backward()
        x_ref = x.clone().requires_grad_(True)
        y_ref = (x_ref @ w1.T) @ w2.T
        y_ref.sum().backward()
        results["seq_out"] = _over_bound(y, y_ref.chunk(2, dim=0)[r], 6 + 8)  # two chained matmuls
        results["seq_grad"] = _over_bound(x_local.grad, x_ref.grad.chunk(2, dim=0)[r], 2 * (6 + 8))
        # dropout: the tensor-parallel RNG differs per TP rank, the default one does not
        with get_cuda_rng_tracker().fork():
            results["tp_mask"] = torch.nn.functional.dropout(torch.ones(64), 0.5).tolist()
        results["default_mask"] = torch.nn.functional.dropout(torch.ones(64), 0.5).tolist()
    return results


@pytest.mark.slow
def test_cpu_compat_enables_gather_sequence_parallel_and_dropout():
    r0, r1 = run_distributed(_cpu_compat_paths, 2, timeout_s=120)
    for r in (r0, r1):
        assert "CUDA" in r["without"]
        assert r["gather"] <= 1.0  # each: max|diff| over the parity rule's value bound
        assert r["seq_out"] <= 1.0 and r["seq_grad"] <= 1.0
    assert r0["tp_mask"] != r1["tp_mask"]
    assert r0["default_mask"] == r1["default_mask"]


# ---------------------------------------------------------------- bad input
SIZES = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
}


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"num_attention_heads": 2, "hidden_size": 64, "num_query_groups": 2},
            r"tensor-parallel size 4 does not divide num_attention_heads=2, num_query_groups=2",
        ),
        (
            {"num_attention_heads": 6, "hidden_size": 96, "num_query_groups": 6},
            r"tensor-parallel size 4 does not divide num_attention_heads=6, num_query_groups=6",
        ),
        ({"num_query_groups": 2}, r"does not divide num_query_groups=2"),
        ({"ffn_hidden_size": 130}, r"does not divide ffn_hidden_size=130"),
        ({"vocab_size": 1001}, r"does not divide vocab_size=1001"),
    ],
)
def test_sizes_not_divisible_by_tp(change, match):
    ctx = ParallelContext(tp=4)
    kwargs = {**SIZES, "num_attention_heads": 8, "num_query_groups": 4, **change}
    with pytest.raises(ValueError, match=match):
        megatron.transformer_config(ctx, **kwargs)


def test_sequence_parallel_needs_tp():
    with pytest.raises(
        ValueError, match="sequence_parallel=True needs tensor parallelism, but the context has tp=1"
    ):
        megatron.model_parallel_config(ParallelContext(), sequence_parallel=True)


def test_pipeline_needs_dtype():
    with pytest.raises(ValueError, match=r"pipeline parallelism \(pp=2\) needs pipeline_dtype"):
        megatron.model_parallel_config(ParallelContext(pp=2))


def test_override_disagreeing_with_context():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=4 disagrees with the context's tp=2"):
        megatron.model_parallel_config(ParallelContext(tp=2), tensor_model_parallel_size=4)


def test_config_carries_the_context_degrees():
    cfg = megatron.transformer_config(
        ParallelContext(tp=2, pp=2, dp=2, ep=2),
        **SIZES,
        pipeline_dtype=torch.float32,
        num_moe_experts=4,
        sequence_parallel=True,
    )
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    assert (cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size) == (2, 2)
    assert cfg.use_cpu_initialization == (not torch.cuda.is_available())


def test_megatron_missing_names_the_extra():
    code = (
        "import sys; sys.modules['megatron'] = None\n"
        "from parallel_bridge import ParallelContext\n"
        "from parallel_bridge.adapters import megatron\n"
        "try:\n    megatron.model_parallel_config(ParallelContext())\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "megatron-core is not installed" in out and "parallel-bridge[megatron]" in out
