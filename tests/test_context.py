"""ParallelContext in one process: defaults, accessors, serialization and bad input."""

import json

import pytest
import torch

from parallel_bridge import ParallelContext
from parallel_bridge.parallel.launch import context_from_torchrun


def test_single_process_default_needs_nothing_initialized():
    ctx = ParallelContext()
    assert ctx == ParallelContext.single_process()
    assert (ctx.world_size, ctx.rank, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank) == (1, 0, 0, 0, 0)
    assert ctx.get_tensor_parallel_rank() == 0
    assert ctx.get_tensor_parallel_world_size() == 1
    assert ctx.get_pipeline_parallel_rank() == 0
    assert ctx.get_pipeline_parallel_world_size() == 1
    assert ctx.get_data_parallel_size() == 1
    assert ctx.is_first_pp_stage and ctx.is_last_pp_stage
    assert ctx.ranks("tp") == [0] and ctx.ranks("world") == [0]


def test_coordinates_and_group_lists_megatron_order():
    # world 16, tp fastest, then cp, dp, pp (Megatron's default order)
    ctx = ParallelContext(tp=2, cp=2, dp=2, pp=2, rank=13)
    assert ctx.world_size == 16
    assert (ctx.tp_rank, ctx.cp_rank, ctx.dp_rank, ctx.pp_rank) == (1, 0, 1, 1)
    assert ctx.ranks("tp") == [12, 13]
    assert ctx.ranks("cp") == [13, 15]
    assert ctx.ranks("dp") == [9, 13]
    assert ctx.ranks("pp") == [5, 13]
    assert ctx.ranks("mp") == [4, 5, 12, 13]
    assert ctx.ranks("dp_cp") == [9, 11, 13, 15]
    assert ctx.ranks("embd") == [5, 13] and ctx.ranks("pos_embd") == []
    assert not ctx.is_first_pp_stage and ctx.is_last_pp_stage


def test_expert_coordinates():
    # world 8 = tp2 x dp4; experts: etp1 x ep4 x edp2
    ctx = ParallelContext(tp=2, dp=4, ep=4, etp=1, rank=5)
    assert ctx.expert_dp == 2
    assert ctx.ranks("ep") == [4, 5, 6, 7]
    assert ctx.ranks("expt_tp") == [5]
    assert ctx.ranks("expt_dp") == [1, 5]
    assert (ctx.ep_rank, ctx.etp_rank, ctx.expert_dp_rank) == (1, 0, 1)


def test_vllm_order_puts_pp_inside_dp():
    ctx = ParallelContext(tp=2, pp=2, dp=2, order="tp-cp-pp-dp", rank=2)
    assert ctx.ranks("tp") == [2, 3]
    assert ctx.ranks("pp") == [0, 2]
    assert ctx.ranks("dp") == [2, 6]


def test_json_round_trip_keeps_layout_not_groups():
    ctx = ParallelContext(tp=4, pp=2, dp=2, ep=2, rank=7, timeout_s=30.0)
    text = ctx.to_json()
    data = json.loads(text)
    assert data["tp"] == 4 and data["etp"] == 4 and "_cache" not in data
    back = ParallelContext.from_json(text)
    assert back == ctx and back.ranks("tp_ep") == ctx.ranks("tp_ep")


def test_contexts_are_immutable():
    ctx = ParallelContext(tp=2, rank=1)
    with pytest.raises(AttributeError):
        ctx.tp = 4


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tp": 0}, ValueError, "tp must be a positive integer, got 0"),
        ({"dp": -2}, ValueError, "dp must be a positive integer, got -2"),
        ({"tp": 2.0}, TypeError, "tp must be an int, got 2.0"),
        ({"tp": 2, "rank": 2}, ValueError, r"rank 2 is outside the world of 2 ranks \(tp=2"),
        ({"tp": 2, "ep": 4}, ValueError, "etp=2 x ep=4 x pp=1 = 8 does not divide the world size 2"),
        ({"tp": 2, "order": "tp-xx"}, ValueError, r"unknown axes \['xx'\]"),
        ({"tp": 2, "pp": 2, "order": "tp-dp"}, ValueError, r"leaves out \['pp'\]"),
        ({"tp": 1, "etp": 0}, ValueError, "etp must be a positive integer, got 0"),
    ],
)
def test_bad_degrees_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ParallelContext(**kwargs)


def test_unknown_fields_in_dict():
    with pytest.raises(ValueError, match=r"unknown ParallelContext fields \['tensor_parallel'\]"):
        ParallelContext.from_dict({"tensor_parallel": 2})


def test_unknown_group_name():
    with pytest.raises(KeyError, match="unknown group 'tensor'"):
        ParallelContext().ranks("tensor")


def test_group_without_backend_says_what_to_do():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized.*from_torchrun"):
        ParallelContext().group("tp")


ENV = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_torchrun_missing_variable(missing):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(RuntimeError, match=f"environment variable {missing} is not set: run under torchrun"):
        context_from_torchrun(env=env)


def test_torchrun_non_integer_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE='four' is not an integer"):
        context_from_torchrun(env={**ENV, "WORLD_SIZE": "four"})


def test_torchrun_degrees_do_not_divide_world():
    with pytest.raises(ValueError, match=r"tp=3 x pp=1 x cp=1 = 3 does not divide WORLD_SIZE=4"):
        context_from_torchrun(tp=3, env=ENV)
    with pytest.raises(ValueError, match=r"tp=2 x pp=1 x cp=1 x dp=4 = 8 but WORLD_SIZE=4"):
        context_from_torchrun(tp=2, dp=4, env=ENV)


def test_import_needs_torch_alone():
    import subprocess
    import sys

    code = (
        "import sys, parallel_bridge\n"
        "heavy = [m for m in ('vllm', 'megatron', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_group_object_carries_ranks_and_neighbours():
    from parallel_bridge import GroupName

    ctx = ParallelContext(tp=2, pp=3, rank=3)  # megatron order: tp fastest, pp last -> pp group [1, 3, 5]
    pp = ctx.comm(GroupName.PP)
    assert (pp.ranks, pp.rank_in_group, pp.size) == ((1, 3, 5), 1, 3)
    assert (pp.prev_rank, pp.next_rank, pp.is_first, pp.is_last) == (1, 5, False, False)
    first = ParallelContext(tp=2, pp=3, rank=1).comm("pp")
    with pytest.raises(ValueError, match=r"rank 1 is first in its pp group \[1, 3, 5\]"):
        first.prev_rank  # noqa: B018
    assert ctx.comm("tp").ranks == (2, 3) and ctx.comm("tp").rank_in_group == 1


def test_one_rank_group_collectives_return_at_once_without_distributed():
    """World size 1: every collective is the identity and needs no torch.distributed (vLLM's rule)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    tp = ParallelContext().comm("tp")
    x = torch.arange(6.0).reshape(2, 3)
    assert tp.all_reduce(x) is x and tp.all_gather(x) is x and tp.all_gather_list(x) == [x]


def test_group_names_are_an_enum_of_megatron_fields():
    from parallel_bridge import GROUP_NAMES, Axis, GroupName

    assert GroupName.TP == "tp" and Axis.PP == "pp"
    assert set(GROUP_NAMES) == {g.value for g in GroupName}
    ctx = ParallelContext(tp=2, dp=2, rank=1)
    assert ctx.all_ranks(GroupName.DP) == ctx.all_ranks("dp") == [[0, 2], [1, 3]]
