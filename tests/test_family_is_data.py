"""A model family is data: Llama with biases on every linear layer (megatron-core ``add_bias_linear``),
defined entirely in this file (its three tensor rows beyond the core's QKV bias, and its family row), with
no edit anywhere else, round-trips megatron-core save (TP=2) -> vLLM's own ``LlamaForCausalLM``
(``attention_bias``, ``mlp_bias``) at TP=1 and TP=2 -> HF export -> transformers, each within the parity
rule's bound of megatron-core's own forward.

vLLM's processes import this module through ``PARALLEL_BRIDGE_MODELS`` (the package's plugin imports the
modules named there in every vLLM process), so the family is known in its TP workers too.
"""

import os
import zlib

import pytest
import torch

from parallel_bridge.spec import sharding
from parallel_bridge.spec.families import Family, families, register_family, unregister_family
from parallel_bridge.spec.schema import H, L, TensorKind
from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import compare, first_step_and_tokens, hf_decode  # noqa: E402


def _biased(spec):
    return spec.add_bias_linear


BIASED_LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    features=frozenset({"add_bias_linear", "add_qkv_bias"}),
    from_hf=lambda config: {"add_bias_linear": True, "add_qkv_bias": True},
    to_hf=lambda spec: {"attention_bias": True, "mlp_bias": True},
    hf_claims=frozenset({"attention_bias", "mlp_bias"}),
    recognise=lambda config: bool(config.get("attention_bias")) and bool(config.get("mlp_bias")),
    megatron_claims={"add_bias_linear": True},
    kinds=(
        TensorKind(L + "self_attention.linear_proj.bias", (H + "self_attn.o_proj.bias",), H + "self_attn.o_proj.bias",
                   sharding.REPLICATED, lambda c: (c.hidden_size,), _biased),
        TensorKind(L + "mlp.linear_fc1.bias", (H + "mlp.gate_proj.bias", H + "mlp.up_proj.bias"),
                   H + "mlp.gate_up_proj.bias", sharding.GATED, lambda c: (2 * c.ffn_hidden_size,), _biased),
        TensorKind(L + "mlp.linear_fc2.bias", (H + "mlp.down_proj.bias",), H + "mlp.down_proj.bias",
                   sharding.REPLICATED, lambda c: (c.hidden_size,), _biased),
    ),
)
ACTIVE = "PB_TEST_BIASED_LLAMA"
"""Set while this module's tests run: processes that import the module (the ranks, vLLM's workers) register
the family then, and only then (the rest of the suite keeps add_bias_linear refused)."""
if os.environ.get(ACTIVE) == "1" and all(f.features != BIASED_LLAMA.features for f in families()):
    register_family(BIASED_LLAMA)


@pytest.fixture(scope="module", autouse=True)
def biased_family():
    """The family, for this module's tests and the processes they start."""
    os.environ[ACTIVE] = "1"
    registered = all(f.features != BIASED_LLAMA.features for f in families())
    if registered:
        register_family(BIASED_LLAMA)
    try:
        yield
    finally:
        os.environ.pop(ACTIVE, None)
        if registered:
            unregister_family(BIASED_LLAMA)

VARIANT = {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 21,
           "config": {"add_bias_linear": True, "add_qkv_bias": True}}


@torch.no_grad()
def _perturb_biases(ctx, model):
    """Megatron starts biases at zero, where a dropped one would pass: give each its own values, equal on
    every TP rank for the replicated ones (row-parallel biases are added after the all-reduce)."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            sharded = "linear_qkv" in name or "linear_fc1" in name
            seed = zlib.crc32(name.encode()) % 10_000 + (100 * ctx.tp_rank if sharded else 0)
            g = torch.Generator().manual_seed(seed)
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _save(root):
    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist
    from parallel_bridge.parallel.launch import context_from_torchrun

    ctx = context_from_torchrun(tp=2, timeout_s=120)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, VARIANT["seed"])
        _, model = mc.build(ctx, VARIANT)
        _perturb_biases(ctx, model)
        save_torch_dist(ctx, model, root, 10, mc.spec_of(VARIANT))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("biased") / "ckpt"
    run_distributed(_save, 2, str(root), timeout_s=300)
    reference = run_distributed(mc.reference_from_dist, 1, str(root), VARIANT, timeout_s=300)[0]
    return root, reference


@pytest.mark.slow
def test_the_family_maps_every_bias(written):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    root, _ = written
    ckpt = MegatronCheckpoint.open(root)
    assert ckpt.config.family is BIASED_LLAMA
    assert ckpt.config.to_hf()["attention_bias"] is True and ckpt.config.to_hf()["mlp_bias"] is True
    biases = sorted(n for n in ckpt.tensors if n.endswith(".bias"))
    assert len(biases) == 4 * mc.SIZES["num_layers"]  # qkv, proj, fc1, fc2 on every layer


@pytest.mark.slow
def test_without_the_family_row_the_checkpoint_is_refused_by_name(written):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.errors import CheckpointError

    unregister_family(BIASED_LLAMA)
    try:
        with pytest.raises(CheckpointError, match=r"add_bias_linear=True \(biases on linear layers\)"):
            MegatronCheckpoint.open(written[0])
    finally:
        register_family(BIASED_LLAMA)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_serves_the_family_it_was_never_told_about(written, tp, monkeypatch):
    monkeypatch.setenv("PARALLEL_BRIDGE_MODELS", __name__)
    if tp == 2:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    root, reference = written
    served = first_step_and_tokens(root, tp, VARIANT["vocab"], mc.PROMPTS, mc.STEPS, load_format="megatron",
                                   config_format="megatron")
    compare(served, reference, f"biased Llama (TP=2 save) served at TP={tp}", mc.length(VARIANT))


@pytest.mark.slow
def test_hf_export_of_the_family_matches_megatron_in_transformers(written, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from parallel_bridge.checkpoint.hf_export import export_hf
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.numerics import parity

    root, reference = written
    out = export_hf(MegatronCheckpoint.open(root), tmp_path / "hf")
    config = AutoConfig.from_pretrained(out)
    assert config.attention_bias and config.mlp_bias
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    compare(hf_decode(model, mc.PROMPTS, mc.STEPS, VARIANT["vocab"]), reference, "biased Llama exported, in transformers",
            mc.length(VARIANT))
    with torch.no_grad():  # the biases matter at this bound: zeroed, the same weights drift far past it
        for name, p in model.named_parameters():
            if name.endswith("o_proj.bias") or name.endswith("mlp.down_proj.bias"):
                p.zero_()
    without = parity.Gap.between([r[1] for r in hf_decode(model, mc.PROMPTS, mc.STEPS, VARIANT["vocab"])],
                                 [r[1] for r in reference])
    assert without.max > 10 * parity.logprob_bound(max(r[2] for r in reference), mc.length(VARIANT)).max
