"""Megatron checkpoints (written by Megatron's own save code) served by vLLM at TP=1 and TP=2, and exported.

Parity: the full next-token log-softmax over the vocabulary for each prompt
matches Megatron's own forward of the same checkpoint within the parity rule's
bound (``parallel_bridge.numerics.parity``, max and mean; vLLM's kernels and Megatron's
unfused ops sum in different orders; measured gaps printed with -s), and 4 greedy
tokens are equal.
"""

import shutil

import pytest
import torch

from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.errors import CheckpointError
from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import OnDemand, first_step_and_tokens, hf_decode  # noqa: E402
from _helpers import compare as compare_within  # noqa: E402

VARIANTS = {
    # torch_dist from TP=2 x PP=2; 100-token vocabulary padded to 128; untied; 2 kv heads
    "dist_tp2pp2": {"groups": 2, "tied": False, "vocab": 100, "padded": 128, "seed": 1},
    # torch_dist from TP=1; tied embeddings; 1 kv head (fewer than serving TP=2)
    "dist_tp1": {"groups": 1, "tied": True, "vocab": 128, "padded": 128, "seed": 2},
    # Megatron-LM legacy per-rank files from TP=2; untied
    "legacy_tp2": {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 3},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Variant -> (the folder Megatron's own code wrote, Megatron's reference decode), written when first asked."""
    root = tmp_path_factory.mktemp("megatron")

    def write(variant):
        v, folder = VARIANTS[variant], root / variant
        if variant == "legacy_tp2":
            return folder, run_distributed(mc.save_legacy, 2, str(folder), 2, v, timeout_s=300)[0]
        tp, pp = (2, 2) if variant == "dist_tp2pp2" else (1, 1)
        run_distributed(mc.save_dist, tp * pp, str(folder), tp, pp, v, timeout_s=300)
        return folder, run_distributed(mc.reference_from_dist, 1, str(folder), v)[0]

    return OnDemand(write)


def serve(model, tp, vocab, **kwargs):
    """Greedy tokens and the first step's full log-softmax over the vocabulary from vLLM for mc.PROMPTS."""
    return first_step_and_tokens(model, tp, vocab, mc.PROMPTS, mc.STEPS, **kwargs)


def compare(served, reference, label, variant="dist_tp2pp2"):
    return compare_within(served, reference, label, mc.length(VARIANTS[variant]))


SERVED = [(tp, v) for tp in (1, 2) for v in VARIANTS if (tp, v) != (2, "dist_tp2pp2")]
SERVED.append(pytest.param(2, "dist_tp2pp2", marks=pytest.mark.parity))


@pytest.mark.slow
@pytest.mark.parametrize("tp,variant", SERVED)
def test_vllm_serves_megatron_checkpoint(checkpoints, variant, tp, monkeypatch):
    if tp == 2:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    folder, reference = checkpoints[variant]
    served = serve(folder, tp, VARIANTS[variant]["vocab"], load_format="megatron", config_format="megatron")
    compare(served, reference, f"{variant} served at TP={tp}", variant)


@pytest.mark.slow
def test_overrides_reach_vllms_config_parser_and_loader(checkpoints, tmp_path):
    """A checkpoint with no configuration at all, served by vLLM with every field given as
    ``hf_overrides={"megatron.<field>": value}``: the parser builds the model from them and the loader (in the
    engine's worker) opens the checkpoint with the same ones, or it would refuse it."""
    import dataclasses
    import json

    folder, reference = checkpoints["dist_tp2pp2"]
    fields = dataclasses.asdict(MegatronCheckpoint.open(folder).config)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "megatron_gpt_config.json").unlink()
    with pytest.raises(CheckpointError, match="carries no model configuration"):
        MegatronCheckpoint.open(bare)
    options = {f"megatron.{k}": v for k, v in fields.items() if v is not None}
    json.dumps(options)  # what `vllm serve --hf-overrides` takes
    served = serve(bare, 1, 100, load_format="megatron", config_format="megatron", hf_overrides=options)
    compare(served, reference, "no config, every field through hf_overrides, TP=1")


@pytest.mark.slow
def test_megatron_checkpoint_into_bridge_registered_hybrid(checkpoints):
    """The hybrid Megatron-layer model as the target (chosen with vLLM's hf_overrides): its load_weights
    gets Megatron-named tensors."""
    from parallel_bridge.models.hybrid_llama import ARCHITECTURE

    folder, reference = checkpoints["dist_tp2pp2"]
    served = serve(
        folder,
        1,
        100,
        load_format="megatron",
        config_format="megatron",
        hf_overrides={"architectures": [ARCHITECTURE]},
    )
    compare(served, reference, f"dist_tp2pp2 into {ARCHITECTURE} at TP=1")


@pytest.mark.slow
def test_hf_export_loads_in_transformers_and_vllm(checkpoints, tmp_path):
    from transformers import LlamaForCausalLM

    from parallel_bridge.checkpoint.hf_export import export_hf

    folder, reference = checkpoints["dist_tp2pp2"]
    out = export_hf(MegatronCheckpoint.open(folder), tmp_path / "hf", shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    compare(hf_decode(model, mc.PROMPTS, mc.STEPS, 100), reference, "HF export in transformers")
    compare(serve(out, 1, 100), reference, "HF export served by stock vLLM")


@pytest.mark.slow
def test_inspect_both_formats(checkpoints):
    info = MegatronCheckpoint.open(checkpoints["dist_tp2pp2"][0]).describe()
    assert (info["format"], info["iteration"], info["source_tp"], info["source_pp"]) == (
        "torch_dist",
        10,
        2,
        2,
    )
    assert info["tensors"]["decoder.layers.1.self_attention.linear_qkv.weight"] == [256, 128]
    legacy = MegatronCheckpoint.open(checkpoints["legacy_tp2"][0]).describe()
    assert (legacy["format"], legacy["source_tp"], legacy["source_pp"]) == ("torch", 2, 1)
    assert legacy["config"]["num_query_groups"] == 2 and legacy["dtype"] == "float32"


# ------------------------------------------------------------------ bad input
@pytest.fixture
def broken(checkpoints, tmp_path):
    def copy(variant):
        dst = tmp_path / variant
        shutil.copytree(checkpoints[variant][0], dst)
        return dst

    return copy


@pytest.mark.slow
def test_missing_rank_folder(broken):
    root = broken("legacy_tp2")
    shutil.rmtree(root / "iter_0000010" / "mp_rank_01")
    with pytest.raises(
        CheckpointError, match=r"rank folder .*iter_0000010/mp_rank_01 is missing \(source tp=2, pp=1\)"
    ):
        MegatronCheckpoint.open(root)


@pytest.mark.slow
def test_missing_and_truncated_shard_files(broken):
    root = broken("dist_tp2pp2")
    shard = sorted((root / "iter_0000010").glob("__1_*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"shard file .*{shard.name} is truncated: \d+ bytes, metadata needs "
                       rf"\d+; the record of \S+ \(chunk at \[[\d, ]+\]\) from byte \d+ on is cut"):
        MegatronCheckpoint.open(root)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard file .*{shard.name} is missing"):
        MegatronCheckpoint.open(root)
    legacy = broken("legacy_tp2")
    f = legacy / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"shard file .*mp_rank_00/model_optim_rng.pt cannot be read"):
        MegatronCheckpoint.open(legacy)


@pytest.mark.slow
def test_unknown_iteration_and_stale_tracker(broken):
    root = broken("dist_tp1")
    with pytest.raises(
        CheckpointError,
        match=r"iteration 99 not found: .*iter_0000099 does not exist \(present: \['iter_0000010'\]\)",
    ):
        MegatronCheckpoint.open(root, iteration=99)
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(CheckpointError, match="names iteration 20, but .*iter_0000020 does not exist"):
        MegatronCheckpoint.open(root)


@pytest.mark.slow
def test_shape_disagreeing_with_config(checkpoints):
    with pytest.raises(
        CheckpointError,
        match=r"tensor embedding.word_embeddings.weight has shape \(128, 128\) but the "
        r"config implies \(128, 256\)",
    ):
        MegatronCheckpoint.open(checkpoints["dist_tp1"][0], overrides={"hidden_size": 256})


@pytest.mark.slow
def test_unknown_architecture(checkpoints):
    with pytest.raises(
        CheckpointError, match="not a Llama-family GPT the mapping knows: normalization=LayerNorm"
    ):
        MegatronCheckpoint.open(checkpoints["dist_tp1"][0], overrides={"normalization": "LayerNorm"})


@pytest.mark.slow
def test_missing_config(broken):
    root = broken("dist_tp1")
    (root / "megatron_gpt_config.json").unlink()
    with pytest.raises(CheckpointError, match="carries no model configuration: no Megatron-LM args") as e:
        MegatronCheckpoint.open(root)
    for route in ("no megatron_gpt_config.json", "--config-overrides", 'hf_overrides={"megatron.field": value}'):
        assert route in str(e.value), str(e.value)


@pytest.mark.slow
def test_convert_refuses_existing_output_and_leaves_nothing_on_failure(checkpoints, tmp_path):
    from parallel_bridge.checkpoint.hf_export import export_hf

    ckpt = MegatronCheckpoint.open(checkpoints["dist_tp1"][0])
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="output folder .*exists; pass overwrite"):
        export_hf(ckpt, tmp_path / "exists")
    tok = tmp_path / "empty_tokenizer"
    tok.mkdir()
    with pytest.raises(CheckpointError, match="holds none of"):
        export_hf(ckpt, tmp_path / "new", tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_tokenizer", "exists"]  # nothing half-written


def test_tp_that_does_not_divide_heads():
    from parallel_bridge.checkpoint.megatron_reader import GPTConfig
    from parallel_bridge.serving.megatron_format import check_serving_tp
    from parallel_bridge.spec.sharding import GroupedQKV

    cfg = GPTConfig(2, 128, 4, 2, 256, 100, 128)
    with pytest.raises(CheckpointError, match="tensor-parallel size 3 does not divide num_attention_heads=4"):
        check_serving_tp(cfg, 3)
    # kv replication: 4 heads in 1 group at TP=2 -> each rank keeps its 2 query heads and the one kv head
    assert GroupedQKV(4, 1, 32).rank_rows(2, 1, order="qkv") == [(64, 64), (128, 32), (160, 32)]


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    for args, expected in [
        (
            ["inspect", str(tmp_path / "nope")],
            f"parallel-bridge inspect: error: checkpoint folder {tmp_path / 'nope'} does not exist",
        ),
        (
            ["convert", str(tmp_path), str(tmp_path / "o"), "--to", "gguf"],
            "parallel-bridge convert: error: unknown target format 'gguf'; supported: hf",
        ),
        (
            ["inspect", str(tmp_path)],
            f"parallel-bridge inspect: error: {tmp_path} is neither a torch_dist checkpoint",
        ),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "parallel_bridge", *args], capture_output=True, text=True
        )
        lines = [line for line in proc.stderr.splitlines() if line.startswith("parallel-bridge")]
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr
