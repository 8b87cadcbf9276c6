"""The bad-input catalogue's mixture-of-experts cases (the rest is ``tests/test_bad_inputs.py``): every MoE setting
no family computes, every layout that cannot be served or written, and every checkpoint missing experts is refused
by name, before anything is read into an engine or written.

Checkpoints are written by megatron-core's own code (a Mixtral-like model at EP=2: torch_dist, and Megatron-LM's
legacy per-rank files) once per session and copied per case before being damaged.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from test_bad_inputs import cli_error

from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.errors import CheckpointError, ModelConfigError
from parallel_bridge.serving.megatron_format import check_serving_tp
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.testing import run_distributed

MOE_ARGS = dict(  # a Mixtral-like GPT as Megatron-LM's argparse namespace describes it
    num_layers=2, hidden_size=128, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
    ffn_hidden_size=256, padded_vocab_size=128, vocab_size=128, normalization="RMSNorm", swiglu=True,
    position_embedding_type="rope", num_experts=4, moe_router_topk=2, moe_router_score_function="softmax",
    moe_router_load_balancing_type="aux_loss", moe_layer_freq=1, moe_router_topk_scaling_factor=None,
)


@pytest.mark.parametrize("change, says", [
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function=sigmoid (a router score function other"),
    ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type=sinkhorn (routing balanced in"),
    ({"moe_layer_freq": [1, 0]}, "moe_layer_freq=[1, 0] (dense layers among the MoE layers)"),
    ({"mtp_num_layers": 1}, "mtp_num_layers=1 (multi-token prediction layers)"),
    ({"moe_shared_expert_intermediate_size": 256}, "moe_shared_expert_intermediate_size=256 (shared experts)"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias=True (an aux-loss-free expert bias"),
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "moe_router_num_groups=2 (group-limited routing)"),
    ({"moe_router_topk_scaling_factor": 2.5}, "moe_router_topk_scaling_factor=2.5 (scaled routing weights)"),
    ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor=1.0 (expert capacity (tokens dropped))"),
    ({"moe_input_jitter_eps": 0.01}, "moe_input_jitter_eps=0.01 (router input jitter)"),
    ({"multi_latent_attention": True}, "multi_latent_attention=True (MLA (multi-latent attention))"),
    ({"moe_router_topk": 5}, "moe_router_topk=5 with num_moe_experts=4"),
    ({"moe_router_pre_softmax": True}, "moe_router_pre_softmax=True (Mixtral renormalises"),
])
def test_moe_settings_no_family_computes_are_refused_by_name(change, says):
    with pytest.raises(ModelConfigError) as e:
        GPTConfig.from_args(argparse.Namespace(**{**MOE_ARGS, **change}))
    assert says in str(e.value), str(e.value)


QWEN3_MOE_HF = {"model_type": "qwen3_moe", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
                "vocab_size": 128, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True}


@pytest.mark.parametrize("config, says", [
    ({**QWEN3_MOE_HF, "mlp_only_layers": [0]}, "mlp_only_layers=[0] (dense layers among the MoE layers)"),
    ({**QWEN3_MOE_HF, "decoder_sparse_step": 2}, "decoder_sparse_step=2 (dense layers among the MoE layers)"),
    ({**QWEN3_MOE_HF, "model_type": "mixtral", "num_local_experts": 4, "sliding_window": 4096},
     "num_moe_experts=4, sliding_window=4096: no family parallel_bridge maps computes this combination"),
    ({"model_type": "deepseek_v3"}, "model_type 'deepseek_v3': DeepSeek-V3 / Kimi-K2 (MLA attention"),
    ({"model_type": "qwen2_moe"}, "model_type 'qwen2_moe': Qwen2-MoE (a shared expert with a sigmoid gate)"),
])
def test_moe_hf_configs_no_family_computes_are_refused_by_name(config, says):
    with pytest.raises(ModelConfigError) as e:
        GPTConfig.from_hf(config)
    assert says in str(e.value), str(e.value)


def test_a_serving_tp_the_experts_cannot_split_names_them():
    spec = GPTConfig.from_hf({**QWEN3_MOE_HF, "moe_intermediate_size": 66})
    with pytest.raises(CheckpointError, match="tensor-parallel size 4 does not divide moe_ffn_hidden_size=66"):
        check_serving_tp(spec, 4)


@pytest.fixture(scope="session")
def moe_written(tmp_path_factory):
    pytest.importorskip("megatron.core")
    import _megatron_ckpt as mc
    from test_moe import FAMILIES

    root = tmp_path_factory.mktemp("bad_moe")
    run_distributed(mc.save_dist, 2, str(root / "dist"), 1, 1, FAMILIES["mixtral"], 2, timeout_s=300)
    run_distributed(mc.save_legacy, 2, str(root / "legacy"), 1, FAMILIES["mixtral"], 2, timeout_s=300)
    return root


@pytest.fixture
def moe_ckpt(moe_written, tmp_path):
    def copy(kind: str) -> Path:
        dst = tmp_path / "in" / kind
        shutil.copytree(moe_written / kind, dst)
        return dst

    return copy


@pytest.mark.slow
def test_fewer_stored_experts_than_the_config_declares(moe_ckpt, tmp_path, capsys):
    """A config of 8 experts over a checkpoint of 4 (a missing EP rank's experts): named, nothing exported."""
    src = moe_ckpt("dist")
    side = src / "megatron_gpt_config.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "num_moe_experts": 8}))
    line = cli_error(capsys, "convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert "stores 4 experts per layer but its configuration declares num_moe_experts=8" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_missing_expert_parallel_rank_folder_is_named(moe_ckpt, capsys):
    src = moe_ckpt("legacy")
    shutil.rmtree(src / "iter_0000010" / "mp_rank_00_001")
    line = cli_error(capsys, "inspect", str(src))
    assert "mp_rank_00_001 is missing (source tp=1, pp=1, ep=2)" in line, line


@pytest.mark.slow
def test_a_missing_expert_parallel_rank_file_is_named(moe_ckpt, capsys):
    src = moe_ckpt("dist")
    (src / "iter_0000010" / "__1_0.distcp").unlink()
    line = cli_error(capsys, "inspect", str(src))
    assert "__1_0.distcp is missing" in line, line


@pytest.mark.slow
def test_legacy_experts_read_as_megatron_saved_them(moe_ckpt):
    """The legacy files' local expert indices come out global: EP rank 1's local expert 0 is global expert 2."""
    import torch

    legacy, dist = MegatronCheckpoint.open(moe_ckpt("legacy")), MegatronCheckpoint.open(moe_ckpt("dist"))
    assert (legacy.source_ep, dist.source_ep) == (2, 2)
    state = torch.load(legacy.path / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)["model"]
    local = state["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]
    assert torch.equal(legacy.read("decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"), local)
    assert torch.equal(dist.read("decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"), local)


def test_moe_on_every_layer_written_as_a_list_is_accepted():
    """``moe_layer_freq=[1, 1]`` is MoE on every layer, as 1 is: mapped, not refused as dense layers."""
    cfg = GPTConfig.from_args(argparse.Namespace(**{**MOE_ARGS, "moe_layer_freq": [1, 1]}))
    assert (cfg.family.model_type, cfg.num_moe_experts, cfg.moe_router_topk) == ("mixtral", 4, 2)


@pytest.mark.slow
def test_an_moe_config_over_a_dense_checkpoint_is_named(tmp_path, capsys):
    """A side file declaring experts over a dense checkpoint (a config of another model): named, not 'router
    missing'."""
    pytest.importorskip("megatron.core")
    import _megatron_ckpt as mc

    root = tmp_path / "dense"
    run_distributed(mc.save_dist, 1, str(root), 1, 1, {"groups": 2, "tied": False, "vocab": 128, "padded": 128,
                                                       "seed": 1}, timeout_s=300)
    side = root / "megatron_gpt_config.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "num_moe_experts": 8, "moe_router_topk": 2}))
    line = cli_error(capsys, "inspect", str(root))
    assert "declares num_moe_experts=8, but the checkpoint stores no router or expert tensors" in line, line
