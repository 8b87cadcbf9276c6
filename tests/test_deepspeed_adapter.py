"""DeepSpeed adapter: ZeRO engines over a ParallelContext (gloo, DS_ACCELERATOR=cpu, fp32).

Tolerance: DeepSpeed averages gradients across data-parallel replicas (all-reduce
then divide) where the reference takes the mean over the whole batch at once;
after a few AdamW steps of lr 1e-2 the difference is summation order only: the
parity rule's value bound on the parameters over the gradients' path (measured
values are printed with -s).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from parallel_bridge import ParallelContext
from parallel_bridge.numerics import parity
from parallel_bridge.testing import run_distributed

pytest.importorskip("deepspeed")
from parallel_bridge.adapters import deepspeed as pds  # noqa: E402
from parallel_bridge.adapters.deepspeed import context_from_deepspeed
from parallel_bridge.parallel.launch import context_from_torchrun

pytestmark = pytest.mark.usefixtures("deepspeed_cpu_extension")

STEPS, LR, BATCH = 4, 1e-2, 8
MLP_LENGTH = 2 * (16 + 32) + BATCH
"""Terms along the gradients' path of the 16-32-4 MLP (forward, back, and the sum over the batch)."""
# Megatron TP layers: gradients come from partial sums all-reduced over TP, and AdamW divides by sqrt(v), which
# turns a last-bit difference of a near-zero gradient into an update of either sign. One Adam step moves an
# entry by at most lr (1 - beta1) / sqrt(1 - beta2) (Kingma and Ba, 2.1), so two runs differ by at most twice
# that per step: the max can say no more. Rounding moves few entries, a layout mistake every one by ~lr: the
# mean is the detector there, within the value bound.
ADAM_STEP = LR * (1 - 0.9) / (1 - 0.999) ** 0.5


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 4, generator=g)


def _plain_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _ds_config(stage, micro):
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }


def _reference_params():
    model = _plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = _data(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero_stages(tp, stages):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun(tp=tp, timeout_s=120)
    micro = BATCH // ctx.dp
    out = {}
    for stage in stages:
        model = _plain_model()
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        engine, *_ = pds.initialize(ctx, model, _ds_config(stage, micro), optimizer=opt)
        for step in range(STEPS):
            x, y = _data(step)
            sl = slice(ctx.dp_rank * micro, (ctx.dp_rank + 1) * micro)
            loss = torch.nn.functional.mse_loss(engine(x[sl]), y[sl])
            engine.backward(loss)
            engine.step()
        if stage == 3:
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters(list(engine.module.parameters())):
                out[stage] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        else:
            out[stage] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        engine.destroy()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1xdp4", "tp2xdp2"])
def test_zero_stages_match_single_process_adamw(tp):
    stages = [0, 1, 2, 3]
    results = run_distributed(_zero_stages, 4, tp, stages, timeout_s=400)
    ref = _reference_params()
    for stage in stages:
        worst = 0.0
        for r in results:
            for name, want in ref.items():
                got = r[stage][name]
                ratio = (got - want).abs().max().item() / parity.value_bound(want.abs().max().item(), MLP_LENGTH)
                assert ratio <= 1.0, (stage, name, ratio)
                worst = max(worst, ratio)
                # replicas agree exactly
                assert torch.equal(got, results[0][stage][name]), (stage, name)
        print(f"\n[zero-{stage} tp={tp}] worst max|diff| / bound = {worst:.2f}")


def _megatron_in_zero1():
    import _megatron_block as blk
    import deepspeed

    from parallel_bridge.adapters import megatron
    from parallel_bridge.spec import schema

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun(tp=2, timeout_s=120)
    full = blk.full_weights(1)
    with megatron.cpu_compat():
        layer = blk.MegatronLayer(ctx, megatron.model_parallel_config(ctx, perform_initialization=False))
        with torch.no_grad():
            for name, p in layer.params().items():
                p.copy_(schema.shard("decoder.layers.0." + name, full["layers.0." + name], ctx.tp, ctx.tp_rank))
        opt = torch.optim.AdamW(layer.parameters(), lr=LR)
        micro = 4 // ctx.dp
        engine, *_ = pds.initialize(ctx, layer, _ds_config(1, micro), optimizer=opt)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, probe = torch.randn(8, 4, 64, generator=g), torch.randn(8, 4, 64, generator=g)
            sl = slice(ctx.dp_rank * micro, (ctx.dp_rank + 1) * micro)
            loss = (engine(x[:, sl]) * probe[:, sl]).sum() / micro
            engine.backward(loss)
            engine.step()
    return ctx.tp_rank, ctx.dp_rank, {n: p.detach().clone() for n, p in layer.params().items()}


@pytest.mark.slow
def test_megatron_tp_layers_inside_zero1_engine():
    import _megatron_block as blk

    from parallel_bridge.spec import schema
    results = run_distributed(_megatron_in_zero1, 4, timeout_s=400)
    full = {k: v.clone().requires_grad_(True) for k, v in blk.full_weights(1).items()}
    opt = torch.optim.AdamW(full.values(), lr=LR)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, probe = torch.randn(8, 4, 64, generator=g), torch.randn(8, 4, 64, generator=g)
        loss = (
            (blk.reference_block(x, full, range(1)) * probe).sum() / 4 / 2
        )  # mean over DP of per-replica loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    worst = 0.0
    length = blk.length(1, 8, tokens=8 * 4)
    for name in blk.NAMES:
        want = full["layers.0." + name].detach()
        for dp_rank in (0, 1):
            shards = [p[name] for tp_rank, d, p in sorted(results) if d == dp_rank]
            got = schema.merge("decoder.layers.0." + name, shards)
            diff = (got - want).abs()
            assert diff.max().item() <= 3 * 2 * ADAM_STEP, (name, dp_rank, diff.max().item())  # 3 steps
            ratio = diff.mean().item() / parity.value_bound(want.abs().max().item(), length)
            assert ratio <= 1.0, (name, dp_rank, ratio)
            worst = max(worst, ratio)
    print(f"\n[megatron TP=2 in ZeRO-1, DP=2] worst mean|diff| / bound = {worst:.1e}")


def _checkpoint_round_trip(folder):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun(timeout_s=120)
    micro = BATCH // ctx.dp

    def engine_():
        model = _plain_model()
        return pds.initialize(
            ctx, model, _ds_config(1, micro), optimizer=torch.optim.AdamW(model.parameters(), lr=LR)
        )[0]

    def step(engine, i):
        x, y = _data(i)
        sl = slice(ctx.dp_rank * micro, (ctx.dp_rank + 1) * micro)
        engine.backward(torch.nn.functional.mse_loss(engine(x[sl]), y[sl]))
        engine.step()

    first = engine_()
    for i in range(2):
        step(first, i)
    first.save_checkpoint(folder, tag="t2")
    step(first, 2)
    continued = {n: p.detach().clone() for n, p in first.module.named_parameters()}
    second = engine_()
    second.load_checkpoint(folder, tag="t2")
    # first has moved on one step, so the loaded engine (at the saved step) must differ from it
    differs_from_first = not all(
        torch.equal(a, b) for a, b in zip(second.module.parameters(), first.module.parameters())
    )
    step(second, 2)
    resumed = {n: p.detach().clone() for n, p in second.module.named_parameters()}
    return differs_from_first, all(torch.equal(continued[n], resumed[n]) for n in continued)


@pytest.mark.slow
def test_checkpoint_save_load_round_trips_exactly(tmp_path):
    for moved_on, same in run_distributed(_checkpoint_round_trip, 2, str(tmp_path), timeout_s=300):
        assert moved_on  # the loaded engine starts where the save was, not where the first engine is
        assert same  # and one more step lands exactly where the first engine's step did


def _expert_groups(tp):
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun(tp=tp, ep=2, timeout_s=120)
    if tp == 1:
        groups._create_expert_and_data_parallel(2)
    else:
        groups.mpu = pds.make_mpu(ctx)
        groups._create_expert_data_and_model_parallel(2, groups.mpu)
    name = "ep_size_2"
    ds = (groups._get_expert_parallel_group_ranks(name), groups._get_expert_data_parallel_group_ranks(name))
    ours = (ctx.ranks("ep"), ctx.ranks("expt_dp"))
    adopted = context_from_deepspeed()
    return [list(r) for r in ds], ours, (adopted.tp, adopted.dp, adopted.ep, adopted.ranks("ep"))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_expert_groups_equal_deepspeeds_own(tp):
    for ds, ours, adopted in run_distributed(_expert_groups, 4, tp, timeout_s=300):
        assert ds == [ours[0], ours[1]]
        assert adopted == (tp, 4 // tp, 2, ours[0])


def _install_expert_groups():
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun(ep=2, timeout_s=120)
    with pds.expert_groups(ctx) as name:
        t = torch.ones(1)
        dist.all_reduce(t, group=groups._get_expert_parallel_group(name))
        seen = name, groups._get_expert_parallel_world_size(name), t.item()
    assert name not in groups._EXPERT_PARALLEL_GROUP, "the scope must restore DeepSpeed's groups"
    return seen


@pytest.mark.slow
def test_install_expert_groups_is_what_deepspeed_reads():
    for name, size, total in run_distributed(_install_expert_groups, 4, timeout_s=300):
        assert (name, size, total) == ("ep_size_2", 2, 2.0)


def _wrong_world():
    ctx = ParallelContext(tp=2, dp=2, rank=dist.get_rank())
    try:
        pds.make_mpu(ctx)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_mpu_whose_sizes_disagree_with_world():
    for msg in run_distributed(_wrong_world, 2, timeout_s=60):
        assert msg == "the context describes 4 ranks (tp=2 x pp=1 x dp=2 x cp=1) but torch.distributed has 2"


def test_mpu_methods_and_sequence_methods_only_with_cp():
    plain = pds.make_mpu(ParallelContext(tp=2, dp=2, rank=3))
    assert plain.get_tensor_model_parallel_rank() == 1 and plain.get_data_parallel_rank() == 1
    assert plain.get_model_parallel_world_size() == 2 and plain.get_data_parallel_group_ranks() == [1, 3]
    assert plain.get_tensor_model_parallel_src_rank() == 2 and plain.get_slice_parallel_rank() == 1
    assert not hasattr(plain, "get_sequence_parallel_world_size")
    assert not hasattr(plain, "initialize_sequence_parallel")
    seq = pds.make_mpu(ParallelContext(tp=2, cp=2, rank=3))
    assert seq.get_sequence_parallel_world_size() == 2 and seq.get_sequence_parallel_rank() == 1
    assert seq.get_sequence_data_parallel_world_size() == 2
    assert not hasattr(seq, "initialize_sequence_parallel")  # it would make DeepSpeed drop TP
    assert hasattr(pds.make_mpu(ParallelContext(cp=2)), "initialize_sequence_parallel")


@pytest.mark.parametrize(
    "config,match",
    [
        (
            {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2},
            r"train_batch_size=10 is not divisible by train_micro_batch_size_per_gpu=2 x data-parallel size 4",
        ),
        ({"train_batch_size": 6}, r"train_batch_size=6 is not divisible by the data-parallel size 4"),
        (
            {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
            r"train_batch_size=16 != train_micro_batch_size_per_gpu=2 x gradient_accumulation_steps=1 x "
            r"data-parallel size 4 \(dp=4\) = 8",
        ),
        ({}, "needs train_batch_size or train_micro_batch_size_per_gpu"),
    ],
)
def test_batch_sizes_checked_against_dp(config, match):
    with pytest.raises(ValueError, match=match):
        pds.check_batch_config(ParallelContext(dp=4), config)


def test_deepspeed_missing_names_the_extra():
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "from parallel_bridge import ParallelContext\n"
        "from parallel_bridge.adapters import deepspeed as pds\n"
        "try:\n    pds.initialize(ParallelContext(), None, {'train_batch_size': 1})\n"
        "except ImportError as e:\n    print(e)\n"
    )
    env = {**os.environ}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert "deepspeed is not installed" in out and "parallel-bridge[deepspeed]" in out
