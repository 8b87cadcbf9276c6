"""Hugging Face -> Megatron: `parallel-bridge convert HF_DIR OUT --to megatron --tp N --pp M`.

Tiny random models made here with transformers' own config classes (Llama with Llama-3.1 rope scaling,
Qwen2 with QKV biases and tied embeddings, Mistral with a 4-token sliding window, Qwen3 with QK layernorm), saved as safetensors, imported at TP=2,
loaded by megatron-core's own loader (``dist_checkpointing.load`` into a GPTModel built at TP=2 through the
project's Megatron adapter) and served by vLLM from the imported checkpoint: the round trip
HF -> Megatron -> vLLM. Parity with transformers' forward: the full first-step log-softmax within the parity rule's bound
(``parallel_bridge.numerics.parity``, max and mean; the three stacks sum in different orders) and equal greedy tokens.
"""

import hashlib
import subprocess
import sys

import pytest
import torch

from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import compare, first_step_and_tokens, hf_decode  # noqa: E402

VOCAB = 100
COMMON = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
          "num_hidden_layers": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
LENGTH = mc.length({"padded": 128 * 2})  # the imported sizes are tests/_megatron_ckpt's, padded for TP=2
FAMILIES = {
    "llama": ("LlamaConfig", {"rope_theta": 500000.0, "tie_word_embeddings": False, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
        {"rotary_base": 500000, "rope_scaling_factor": 8.0}),
    "qwen2": ("Qwen2Config", {"rope_theta": 10000.0, "tie_word_embeddings": True}, {"config": {"add_qkv_bias": True}}),
    "mistral": ("MistralConfig", {"rope_theta": 10000.0, "tie_word_embeddings": False, "sliding_window": 4},
                {"config": {"window_size": (3, 0)}}),
    "qwen3": ("Qwen3Config", {"rope_theta": 10000.0, "head_dim": 32, "tie_word_embeddings": False},
              {"config": {"qk_layernorm": True}}),
}


def hf_model(family, folder, families=None, seed=7):
    """A random tiny model of ``family`` (a row of ``families``: this module's by default) saved in ``folder``;
    weights far from their init (norms at 1, biases at 0 would hide a dropped tensor)."""
    import transformers

    cls, extra, _ = (families or FAMILIES)[family]
    config = getattr(transformers, cls)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 if name.endswith("norm.weight") else 0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def variant(family, tp):
    """What tests/_megatron_ckpt.build needs to rebuild the imported model (vocabulary padded to 128 x tp)."""
    _, extra, megatron = FAMILIES[family]
    return {"groups": 2, "tied": extra["tie_word_embeddings"], "vocab": VOCAB, "padded": 128 * tp, "seed": 0,
            **megatron}


def convert(*args):
    return subprocess.run([sys.executable, "-m", "parallel_bridge", "convert", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    out = {}
    for family in FAMILIES:
        model = hf_model(family, root / f"{family}_hf")
        proc = convert(root / f"{family}_hf", root / f"{family}_mg", "--to", "megatron", "--tp", 2)
        assert proc.returncode == 0, proc.stderr
        out[family] = (root / f"{family}_mg", hf_decode(model, mc.PROMPTS, mc.STEPS, VOCAB))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_loads_the_import_at_tp2(imported, family):
    folder, reference = imported[family]
    decoded = run_distributed(mc.reference_from_dist, 2, str(folder), variant(family, 2), 2, 1, timeout_s=300)
    for rank_decode in decoded:
        compare(rank_decode, reference, f"{family}: HF imported, Megatron at TP=2", LENGTH)


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_import(imported, family):
    folder, reference = imported[family]
    served = first_step_and_tokens(folder, 1, VOCAB, mc.PROMPTS, mc.STEPS, load_format="megatron",
                                   config_format="megatron")
    compare(served, reference, f"{family}: HF -> Megatron -> vLLM", LENGTH)


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_bad_hf_inputs_are_refused_before_anything_is_written(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    hf_model("qwen2", good)
    cases = []
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases.append((no_config, [], f"{no_config} has no config.json"))
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases.append((other, [], "config.json has model_type 'gpt2'; the schema knows ['llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe']"))
    cases.append((good, ["--tp", "3"], "--tp 3: tensor-parallel size 3 does not divide num_attention_heads=4"))
    cases.append((good, ["--pp", "3"], "--pp 3 does not divide num_hidden_layers=2"))
    cases.append((good, ["--format", "legacy"], "--format legacy: importing writes megatron-core's torch_dist"))
    window = tmp_path / "window"
    window.mkdir()
    (window / "config.json").write_text(json.dumps({**COMMON, "model_type": "qwen2", "use_sliding_window": True}))
    cases.append((window, [], "use_sliding_window=True (sliding-window attention)"))
    wrong = tmp_path / "wrong_shape"
    wrong.mkdir()
    (wrong / "config.json").write_text((good / "config.json").read_text())
    state = load_file(str(good / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:128]
    save_file(state, str(wrong / "model.safetensors"))
    cases.append((wrong, [], "tensor model.layers.1.mlp.up_proj.weight has shape (128, 128), but config.json implies (256, 128)"))
    before = _tree_hash(tmp_path)
    for source, extra, says in cases:
        out = tmp_path / "out"
        proc = convert(source, out, "--to", "megatron", *extra)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("parallel-bridge convert: error:")]
        assert proc.returncode == 1 and len(errors) == 1 and says in errors[0], (says, proc.stderr[-800:])
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert _tree_hash(tmp_path) == before  # inputs untouched
