"""A tensor no kind declares is refused by name, never treated as replicated: by the checkpoint readers
(torch_dist and legacy), the HF export, the HF import and the weight sync's source. An undeclared expert
weight silently replicated (or dropped) is the class of bug this guards against; each case also shows that
nothing was written."""

import json
import shutil

import pytest
import torch

from parallel_bridge.errors import UnknownTensorError
from parallel_bridge.spec.store import TensorStore
from parallel_bridge.testing import run_distributed

pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402

QWEN2 = {"groups": 2, "tied": False, "vocab": 100, "padded": 128, "seed": 5, "config": {"add_qkv_bias": True}}
LLAMA = {"groups": 2, "tied": False, "vocab": 100, "padded": 128, "seed": 6}
ROUTER = "decoder.layers.0.mlp.router.weight"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("undeclared")
    run_distributed(mc.save_dist, 1, str(root / "qwen2"), 1, 1, QWEN2, timeout_s=300)
    run_distributed(mc.save_legacy, 2, str(root / "legacy"), 2, LLAMA, timeout_s=300)
    return root


def _copy(written, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(written / name, dst)
    return dst


@pytest.mark.slow
def test_the_torch_dist_reader_refuses_a_tensor_its_config_does_not_declare(written, tmp_path):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    root = _copy(written, tmp_path, "qwen2")
    side = root / "megatron_gpt_config.json"
    config = json.loads(side.read_text())
    side.write_text(json.dumps({**config, "add_qkv_bias": False}))  # the biases are stored, the config omits them
    with pytest.raises(UnknownTensorError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.bias.*no tensor kind"):
        MegatronCheckpoint.open(root)


@pytest.mark.slow
def test_the_legacy_reader_refuses_an_undeclared_tensor(written, tmp_path):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    root = _copy(written, tmp_path, "legacy")
    for f in root.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        state["model"]["decoder.layers.0.mlp.router.weight"] = torch.zeros(4, 128)
        torch.save(state, f)
    with pytest.raises(UnknownTensorError, match=rf"is an MoE checkpoint .*{ROUTER}.* declares no num_moe_experts"):
        MegatronCheckpoint.open(root)  # a router under a dense config: named an MoE checkpoint, not replicated


@pytest.mark.slow
def test_the_hf_export_refuses_an_undeclared_tensor_before_writing(written, tmp_path):
    from parallel_bridge.checkpoint.hf_export import export_hf
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint, TensorInfo

    ckpt = MegatronCheckpoint.open(written / "qwen2")
    assert isinstance(ckpt, TensorStore)
    ckpt.tensors[ROUTER] = TensorInfo((4, 128), torch.float32)  # a store holding one more tensor than its config
    with pytest.raises(UnknownTensorError, match=rf"{ROUTER}.*nothing is written"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_the_hf_import_refuses_an_undeclared_tensor_before_writing(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from parallel_bridge.checkpoint.hf_import import import_hf

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**weights, "model.layers.0.mlp.gate.weight": torch.zeros(4, 64)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UnknownTensorError, match=r"model\.layers\.0\.mlp\.gate\.weight.*no tensor kind"):
        import_hf(tmp_path / "hf", tmp_path / "mg", tp=1)
    assert not (tmp_path / "mg").exists()


def test_the_sync_source_refuses_an_undeclared_parameter():
    pytest.importorskip("vllm")
    from parallel_bridge.adapters import megatron
    from parallel_bridge.models.hybrid_llama import HybridLlama
    from parallel_bridge.parallel.launch import single_process_world
    from parallel_bridge.spec.model import GPTConfig
    from parallel_bridge.sync import MegatronWeightSource

    spec = GPTConfig(num_layers=1, hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=128,
                     vocab_size=64)
    with single_process_world() as ctx, megatron.cpu_compat():
        model = HybridLlama(spec, ctx)
        model.decoder.layers[0].mlp.router = torch.nn.Linear(64, 4, bias=False)  # a router no kind declares
        with pytest.raises(UnknownTensorError, match=rf"{ROUTER}.*no tensor kind declares it"):
            MegatronWeightSource(ctx, model)
