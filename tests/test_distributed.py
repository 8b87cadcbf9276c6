"""Multi-process (gloo) checks of ParallelContext against real torch, megatron-core and vLLM groups."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from parallel_bridge import VLLM_ORDER
from parallel_bridge.adapters.vllm import context_from_vllm
from parallel_bridge.parallel.launch import context_from_device_mesh, context_from_torchrun, device_mesh_of
from parallel_bridge.testing import DistributedTestError, run_distributed

pytestmark = pytest.mark.slow

AXIS_GROUPS = (
    "tp",
    "pp",
    "dp",
    "cp",
    "mp",
    "tp_cp",
    "dp_cp",
    "tp_dp",
    "tp_dp_cp",
    "ep",
    "expt_tp",
    "expt_dp",
    "tp_ep",
    "tp_ep_pp",
    "world",
)


def _all_reduce_per_axis(degrees):
    ctx = context_from_torchrun(**degrees, timeout_s=60)
    sums = {}
    for name in AXIS_GROUPS:
        group = ctx.group(name)
        assert dist.get_process_group_ranks(group) == ctx.ranks(name), name
        t = torch.tensor([float(ctx.rank)])
        dist.all_reduce(t, group=group)
        sums[name] = (t.item(), float(sum(ctx.ranks(name))))
    coords = (ctx.tp_rank, ctx.cp_rank, ctx.dp_rank, ctx.pp_rank)
    return ctx.to_dict(), coords, sums


@pytest.mark.parametrize(
    "world,degrees",
    [
        (1, {}),
        (2, {"tp": 2}),
        (4, {"tp": 2, "pp": 2}),
        (8, {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),  # dp = 2 derived from WORLD_SIZE
        (8, {"tp": 2, "cp": 2, "pp": 2}),
    ],
)
def test_all_reduce_over_every_group(world, degrees):
    results = run_distributed(_all_reduce_per_axis, world, degrees, init=False, timeout_s=120)
    for rank, (data, _, sums) in enumerate(results):
        assert data["rank"] == rank
        assert data["tp"] * data["pp"] * data["dp"] * data["cp"] == world
        for name, (got, want) in sums.items():
            assert got == want, (rank, name, got, want)
    # every rank holds a distinct coordinate: the layout is a bijection
    assert len({coords for _, coords, _ in results}) == world


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def _sleep_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(600)
    return "done"


def _exit_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(3)
    time.sleep(60)


def test_harness_reports_failing_rank_traceback():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed:.*ValueError: boom on purpose"):
        run_distributed(_raise_on_rank_one, 2, timeout_s=60)


def test_harness_reports_hung_rank_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"ranks \[1\] of 2 did not finish within 8 s"):
        run_distributed(_sleep_on_rank_one, 2, timeout_s=8)
    assert time.monotonic() - start < 30


def test_harness_reports_dead_rank():
    with pytest.raises(DistributedTestError, match="rank 1 of 2 died with exit code 3"):
        run_distributed(_exit_on_rank_one, 2, timeout_s=60)


def _collective_with_departed_peer():
    ctx = context_from_torchrun(tp=2, timeout_s=5)
    ctx.tp_group  # noqa: B018 - create the group while both ranks live
    dist.barrier()
    if ctx.rank == 1:
        return "left without joining the all-reduce"
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=ctx.tp_group)
    except Exception as e:  # noqa: BLE001 - the point is that it raises
        return f"raised {type(e).__name__} after {time.monotonic() - start:.1f}s"
    return "no error"


def test_departed_rank_gives_an_error_not_a_hang():
    rank0, _ = run_distributed(_collective_with_departed_peer, 2, timeout_s=60, init=False)
    assert rank0.startswith("raised "), rank0
    assert float(rank0.rsplit(" ", 1)[1][:-1]) < 30


def _megatron_groups(configs):
    from megatron.core import parallel_state as mps

    rank = dist.get_rank()
    mismatches = []
    for cfg in configs:
        cfg = dict(cfg)
        order = cfg.pop("order", "tp-cp-ep-dp-pp")
        mps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.get("tp", 1),
            pipeline_model_parallel_size=cfg.get("pp", 1),
            context_parallel_size=cfg.get("cp", 1),
            expert_model_parallel_size=cfg.get("ep", 1),
            expert_tensor_parallel_size=cfg.get("etp"),
            order=order,
            create_gloo_process_groups=False,
        )
        ctx = context_from_torchrun(order=order, **cfg)
        real = {
            "tp": mps.get_tensor_model_parallel_group(),
            "pp": mps.get_pipeline_model_parallel_group(),
            "dp": mps.get_data_parallel_group(),
            "dp_cp": mps.get_data_parallel_group(with_context_parallel=True),
            "cp": mps.get_context_parallel_group(),
            "mp": mps.get_model_parallel_group(),
            "tp_cp": mps.get_tensor_and_context_parallel_group(),
            "tp_dp": mps.get_tensor_and_data_parallel_group(),
            "tp_dp_cp": mps.get_tensor_and_data_parallel_group(with_context_parallel=True),
            "embd": mps.get_embedding_group(),
            "ep": mps.get_expert_model_parallel_group(),
            "expt_tp": mps.get_expert_tensor_parallel_group(),
            "expt_dp": mps.get_expert_data_parallel_group(),
            "tp_ep": mps.get_expert_tensor_and_model_parallel_group(),
            "tp_ep_pp": mps.get_expert_tensor_model_pipeline_parallel_group(),
        }
        for name, group in real.items():
            got = dist.get_process_group_ranks(group)
            if got != ctx.ranks(name):
                mismatches.append((cfg, order, name, rank, got, ctx.ranks(name)))
        mps.destroy_model_parallel()
    return mismatches


MEGATRON_CONFIGS = [
    {"tp": 2, "pp": 2},
    {"tp": 2, "cp": 2},
    {"tp": 4, "pp": 2},
    {"tp": 1, "pp": 2, "ep": 2},
    {"tp": 2, "ep": 4, "etp": 1},
    {"tp": 2, "pp": 2, "cp": 2},
    {"tp": 2, "pp": 2, "order": "tp-pp-dp"},
]


def test_megatron_groups_equal_context_rank_lists_world8():
    results = run_distributed(_megatron_groups, 8, MEGATRON_CONFIGS, timeout_s=240)
    assert all(r == [] for r in results), [r for r in results if r]


def _vllm_groups(configs):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as vps

    from parallel_bridge.adapters.vllm import (
        destroy_vllm_parallel_state,
        init_vllm_parallel_state,
        vllm_config_for,
    )

    mismatches = []
    for cfg in configs:
        ctx = context_from_torchrun(order=VLLM_ORDER, **cfg)
        config = init_vllm_parallel_state(ctx)
        with set_current_vllm_config(config):
            real = {
                "tp": vps.get_tp_group().ranks,
                "pp": vps.get_pp_group().ranks,
                "dp": vps.get_dp_group().ranks,
                # vLLM's EP group spans DP x PCP x TP within a pipeline stage
                "tp_dp_cp": vps.get_ep_group().ranks,
            }
            adopted = context_from_vllm()
        for name, got in real.items():
            if list(got) != ctx.ranks(name):
                mismatches.append((cfg, name, ctx.rank, got, ctx.ranks(name)))
        layout_fields = ("tp", "pp", "dp", "cp", "rank", "order")
        if [getattr(adopted, f) for f in layout_fields] != [getattr(ctx, f) for f in layout_fields]:
            mismatches.append(("from_vllm", adopted.to_dict(), ctx.to_dict()))
        t = torch.ones(1)
        dist.all_reduce(t, group=adopted.tp_group)
        if t.item() != ctx.tp:
            mismatches.append(("tp all-reduce over adopted group", t.item()))
        destroy_vllm_parallel_state()
        assert vllm_config_for(ctx).parallel_config.tensor_parallel_size == ctx.tp
    return mismatches


VLLM_CONFIGS = [{"tp": 2, "pp": 2, "dp": 2}, {"tp": 8}, {"tp": 4, "pp": 2}, {"tp": 2, "dp": 4}]


def test_vllm_groups_equal_context_rank_lists_world8():
    pytest.importorskip("vllm")
    results = run_distributed(_vllm_groups, 8, VLLM_CONFIGS, timeout_s=400)
    assert all(r == [] for r in results), [r for r in results if r]


def _device_mesh_round_trip():
    ctx = context_from_torchrun(tp=2, pp=2, timeout_s=60)
    mesh = device_mesh_of(ctx)
    assert mesh.mesh_dim_names == ("pp", "tp")
    back = context_from_device_mesh(mesh, timeout_s=60)
    same = all(back.all_ranks(n) == ctx.all_ranks(n) for n in ("tp", "pp", "dp"))
    t = torch.ones(1)
    dist.all_reduce(t, group=back.tp_group)  # the mesh's own group, adopted
    return same, back.adopted_groups, t.item()


def test_device_mesh_round_trip_world4():
    for same, adopted, total in run_distributed(_device_mesh_round_trip, 4, init=False, timeout_s=120):
        assert same and set(adopted) >= {"tp", "pp"} and total == 2.0
