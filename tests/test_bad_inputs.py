"""The bad-input catalogue: every case gives a clear error naming the thing at fault (or correct output),
raised before anything is written; commands that write leave no partial output and never change an input
(the input tree is hashed before and after).

Checkpoints are written by Megatron's own code (torch_dist from TP=2, legacy per-rank files from TP=2)
once per session and copied per case before being damaged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from _sync_rounds import full_tensors, publish
from torch import nn

from parallel_bridge import ParallelContext
from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.checkpoint.outputs import MARKER
from parallel_bridge.cli.main import main
from parallel_bridge.errors import CheckpointError, ModelConfigError
from parallel_bridge.spec import megatron_args
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.sync.shards import RoundError, RoundReader
from parallel_bridge.testing import run_distributed

VARIANT = {"groups": 2, "tied": False, "vocab": 100, "padded": 128, "seed": 1}
ARGS = dict(  # a Llama-family GPT as Megatron-LM's argparse namespace describes it
    num_layers=2, hidden_size=128, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
    ffn_hidden_size=256, padded_vocab_size=128, vocab_size=100, normalization="RMSNorm", swiglu=True,
    add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope",
)


@pytest.fixture(scope="session")
def written(tmp_path_factory):
    pytest.importorskip("megatron.core")
    import _megatron_ckpt as mc

    root = tmp_path_factory.mktemp("bad_inputs")
    run_distributed(mc.save_dist, 2, str(root / "dist"), 2, 1, VARIANT, timeout_s=300)
    run_distributed(mc.save_legacy, 2, str(root / "legacy"), 2, VARIANT, timeout_s=300)
    return root


@pytest.fixture
def ckpt(written, tmp_path):
    """A fresh copy of a session checkpoint, to damage: ``ckpt("dist")`` or ``ckpt("legacy")``."""

    def copy(kind: str) -> Path:
        dst = tmp_path / "in" / kind
        shutil.copytree(written / kind, dst)
        return dst

    return copy


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in this process; assert exit 1 and exactly one error line; return it."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"parallel-bridge {argv[0]}: error:")]
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_legacy_args(root: Path, **changes) -> None:
    """Change Megatron-LM's saved args in every rank file of a legacy checkpoint."""
    for f in root.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        for k, v in changes.items():
            setattr(state["args"], k, v)
        torch.save(state, f)


# ------------------------------------------------------------ outputs never touch inputs
@pytest.mark.slow
@pytest.mark.parametrize(
    "where, says",
    [("same", "is the input"), ("inside", "lies inside the input"), ("parent", "contains the input"),
     ("symlink", "is the input")],
)
def test_convert_output_overlapping_its_input_is_refused(ckpt, tmp_path, capsys, where, says):
    src = ckpt("dist")
    before = tree_hash(tmp_path / "in")
    out = {"same": src, "inside": src / "hf", "parent": tmp_path / "in", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(src)
    line = cli_error(capsys, "convert", str(src), str(out), "--force", "--quiet")
    assert f"output folder {out} {says}" in line
    assert tree_hash(tmp_path / "in") == before


@pytest.mark.slow
def test_force_replaces_only_an_earlier_export(ckpt, tmp_path, capsys):
    src, out = ckpt("dist"), tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = cli_error(capsys, "convert", str(src), str(out), "--force", "--quiet")
    assert f"output folder {out} exists and was not written by parallel-bridge convert" in line
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert main(["convert", str(src), str(out), "--quiet"]) == 0 and (out / MARKER).exists()
    line = cli_error(capsys, "convert", str(src), str(out), "--quiet")
    assert f"output folder {out} exists; pass overwrite (--force)" in line
    assert main(["convert", str(src), str(out), "--force", "--quiet"]) == 0  # an earlier export: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "in"]


@pytest.mark.slow
def test_output_that_is_a_file(ckpt, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    line = cli_error(capsys, "convert", str(ckpt("dist")), str(tmp_path / "f"), "--force", "--quiet")
    assert "exists and is not a folder" in line and (tmp_path / "f").read_text() == "x"


@pytest.mark.slow
def test_partial_folder_of_a_killed_convert_is_removed_by_the_next_run(ckpt, tmp_path):
    src = ckpt("dist")
    stale = tmp_path / ".hf.partial-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"half")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "in"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dist", "legacy"])
def test_corrupt_tensor_bytes_fail_the_checksum_and_write_nothing(ckpt, tmp_path, capsys, kind):
    src = ckpt(kind)
    target = (
        sorted(src.glob("iter_*/__0_*.distcp"))[0]
        if kind == "dist"
        else src / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    )
    flip_byte(target)
    before = tree_hash(tmp_path / "in")
    line = cli_error(capsys, "convert", str(src), str(tmp_path / "hf"), "--quiet")
    assert f"shard file {target}" in line and "fails its CRC-32 check" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no partial folder
    assert tree_hash(tmp_path / "in") == before


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer, says", [("missing", "does not exist"), ("empty", "holds none of")])
def test_convert_with_a_bad_tokenizer_folder_writes_nothing(ckpt, tmp_path, capsys, tokenizer, says):
    src = ckpt("dist")
    tok = tmp_path / "in" / tokenizer
    if tokenizer == "empty":
        tok.mkdir()
    line = cli_error(capsys, "convert", str(src), str(tmp_path / "hf"), "--tokenizer", str(tok), "--quiet")
    assert f"tokenizer folder {tok}" in line and says in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ------------------------------------------------------------------- readers check what they read
@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda r: (r / "iter_0000010" / "common.pt").write_bytes(b"not a pickle"), "common.pt cannot be read"),
        (lambda r: (r / "latest_checkpointed_iteration.txt").write_text("ten"),
         "latest_checkpointed_iteration.txt holds 'ten', not an iteration number"),
        (lambda r: (r / "latest_checkpointed_iteration.txt").write_text("20"),
         "names iteration 20, but .*iter_0000020 does not exist"),
        (lambda r: (r / "iter_0000010" / "metadata.json").write_text("{oops"), "metadata.json is not valid JSON"),
        (lambda r: (r / "iter_0000010" / "metadata.json").write_text('{"sharded_backend": "zarr"}'),
         "sharded_backend 'zarr' is not supported"),
        (lambda r: (r / "megatron_gpt_config.json").write_text("[1, 2]"), "must hold a JSON object, not a list"),
        (lambda r: (r / "megatron_gpt_config.json").write_text("{"), "megatron_gpt_config.json is not valid JSON"),
        (lambda r: (r / "iter_0000010" / ".metadata").write_bytes(b"junk"), r"\.metadata cannot be read"),
        (lambda r: sorted(r.glob("iter_*/__1_*.distcp"))[0].unlink(), r"shard file .*__1_.*\.distcp is missing"),
        (lambda r: (r / "iter_0000010" / "metadata.json").unlink(),
         "Megatron-LM's torch_dcp or fsdp_dtensor format .*not read; read are torch_dist"),
        (lambda r: (r / "latest_checkpointed_iteration.txt").unlink() or (r / "latest_train_state.pt").write_text("x"),
         "latest_train_state.pt cannot be read as Megatron-Bridge's train state"),
    ],
    ids=["common-not-pickle", "tracker-garbage", "tracker-stale", "metadata-json", "backend", "config-list",
         "config-json", "dcp-metadata", "shard-missing", "torch-dcp", "bridge-tracker"],
)
def test_damaged_torch_dist_files_are_named(ckpt, capsys, damage, says):
    import re

    src = ckpt("dist")
    damage(src)
    line = cli_error(capsys, "inspect", str(src))
    assert re.search(says, line), line


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, says",
    [
        ({"num_layers": "2"}, "model config field num_layers='2' must be a positive integer"),
        ({"vocab_size": 200}, "vocab_size=200 is larger than padded_vocab_size=128"),
        ({"rotary_base": -1}, "rotary_base=-1 must be a positive number"),
        ({"tie_embeddings": "no"}, "tie_embeddings='no' must be true or false"),
        ({"num_query_groups": 3}, "num_attention_heads=4 is not a multiple of num_query_groups=3"),
        ({"rope_flavour": "x"}, "unknown model configuration keys ['rope_flavour']"),
        ({"rotary_percent": 0.5}, "rotary_percent=0.5 (partial rotary embedding)"),
    ],
)
def test_side_config_values_are_checked(ckpt, capsys, change, says):
    import json

    src = ckpt("dist")
    side = src / "megatron_gpt_config.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), **change}))
    assert says in cli_error(capsys, "inspect", str(src))


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [{"add_bias_linear": True}, {"softmax_scale": 0.5}, {"rotary_percent": 0.5}, {"rotary_interleaved": True},
     {"multi_latent_attention": True}, {"moe_shared_expert_intermediate_size": 256}, {"apply_layernorm_1p": True}],
)
def test_math_changing_megatron_lm_args_are_refused_by_name(ckpt, capsys, change):
    src = ckpt("legacy")
    edit_legacy_args(src, **change)
    ((name, value),) = change.items()
    line = cli_error(capsys, "inspect", str(src))
    assert f"{name}={value!r}" in line and "is not a Llama-family GPT" in line and "wrong numbers" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, missing",
    [({"add_qkv_bias": True}, "linear_qkv.bias"), ({"qk_layernorm": True}, "q_layernorm.weight")],
)
def test_mapped_features_without_their_tensors_are_refused(ckpt, capsys, change, missing):
    """QKV biases and QK layernorm are mapped now: arguments that claim them over a checkpoint without the
    tensors are a damaged checkpoint, named, not served without them."""
    src = ckpt("legacy")
    edit_legacy_args(src, **change)
    line = cli_error(capsys, "inspect", str(src))
    assert f"tensor decoder.layers.0.self_attention.{missing} is missing" in line, line


@pytest.mark.slow
def test_legacy_shards_that_disagree_name_the_tensor_and_files(ckpt, capsys):
    src = ckpt("legacy")
    f = src / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    state["model"]["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(128, 100)
    torch.save(state, f)
    line = cli_error(capsys, "inspect", str(src))
    assert "tensor decoder.layers.1.mlp.linear_fc2.weight: shard (128, 100) in" in line
    assert "mp_rank_01/model_optim_rng.pt disagrees with (128, 128) in" in line and "mp_rank_00" in line
    del state["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
    torch.save(state, f)
    assert "mp_rank_01/model_optim_rng.pt lacks tensor decoder.layers.1.mlp.linear_fc2.weight" in cli_error(
        capsys, "inspect", str(src)
    )


@pytest.mark.slow
def test_legacy_file_that_is_not_a_state_dict(ckpt, capsys):
    src = ckpt("legacy")
    torch.save(torch.zeros(3), src / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt")
    assert "holds a Tensor, not Megatron's state dict" in cli_error(capsys, "inspect", str(src))


# ------------------------------------------------------------------- config sources
def hf_config_of(src: Path, tmp_path: Path, **changes) -> Path:
    """A Hugging Face config.json describing the checkpoint at ``src`` (its own config), with ``changes``."""
    import json

    body = {**MegatronCheckpoint.open(src).config.to_hf(), **changes}
    path = tmp_path / "hf" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, field, first, second",
    [({"rope_theta": 500000.0}, "rotary_base", "10000.0", "500000.0"),
     ({"rms_norm_eps": 1e-6}, "norm_epsilon", "1e-05", "1e-06"),
     ({"num_key_value_heads": 4}, "num_query_groups", "2", "4"),
     ({"head_dim": 64}, "kv_channels", "32", "64")],
)
def test_config_sources_that_disagree_are_refused_naming_both(ckpt, tmp_path, capsys, change, field, first, second):
    src = ckpt("dist")
    hf = hf_config_of(src, tmp_path, **change)
    line = cli_error(capsys, "inspect", str(src), "--hf-config", str(hf))
    assert f"sources disagree on {field}: Hugging Face config.json ({hf}) says {second}, side file (" in line, line
    assert f"megatron_gpt_config.json) says {first};" in line and f'"{field}": value' in line, line
    # an override of that field settles it, and says so
    value = float(second) if "." in second or "e" in second else int(second)
    if field in ("rotary_base", "norm_epsilon"):
        info = MegatronCheckpoint.open(src, hf_config=hf, overrides={field: value})
        assert [s.kind for s in info.config_sources] == ["Hugging Face config.json", "side file"]
        assert getattr(info.config, field) == value


@pytest.mark.slow
def test_agreeing_sources_are_all_named_by_inspect(ckpt, tmp_path, capsys):
    src = ckpt("dist")
    hf = hf_config_of(src, tmp_path)
    assert main(["inspect", str(src), "--hf-config", str(hf.parent)]) == 0
    out = capsys.readouterr().out
    assert f"config from Hugging Face config.json ({hf}); side file ({src / 'megatron_gpt_config.json'})" in out, out


@pytest.mark.slow
def test_expert_tensors_under_a_dense_config_name_an_moe_checkpoint(ckpt, capsys):
    """Router and expert tensors whose config omits num_moe_experts: named an MoE checkpoint, not 'linear_fc1
    is missing'."""
    src = ckpt("legacy")
    for f in src.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        for layer in range(2):
            fc1 = state["model"].pop(f"decoder.layers.{layer}.mlp.linear_fc1.weight")
            fc2 = state["model"].pop(f"decoder.layers.{layer}.mlp.linear_fc2.weight")
            state["model"][f"decoder.layers.{layer}.mlp.router.weight"] = torch.zeros(4, 128)
            for e in range(4):
                state["model"][f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1
                state["model"][f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2
        torch.save(state, f)
    line = cli_error(capsys, "inspect", str(src))
    assert "is an MoE checkpoint (4 experts: tensors such as decoder.layers.0.mlp." in line, line
    assert "declares no num_moe_experts" in line and "missing" not in line, line


@pytest.mark.slow
def test_serve_passes_overrides_through_vllms_hf_overrides(ckpt, tmp_path, capsys):
    import json
    import shlex

    (tmp_path / "TOK").mkdir()
    (tmp_path / "TOK" / "tokenizer.json").write_text("{}")
    src = ckpt("dist")
    hf = hf_config_of(src, tmp_path)
    code = main(["serve", str(src), "--print", "--tokenizer", str(tmp_path / "TOK"), "--iteration", "10",
                 "--config-overrides", '{"max_position_embeddings": 32}', "--hf-config", str(hf)])
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert code == 0 and cmd[:3] == ["vllm", "serve", str(src)]
    options = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert options == {"megatron.max_position_embeddings": 32, "megatron.hf_config": str(hf.resolve()),
                       "megatron.iteration": 10}


PRODUCERS = Path(__file__).resolve().parent / "fixtures" / "producers"


def producer_copy(tmp_path: Path, name: str) -> Path:
    """A fresh copy of a committed producer fixture's checkpoint (tests/test_producers.py), to damage."""
    dst = tmp_path / "in" / name
    shutil.copytree(PRODUCERS / name / "checkpoint", dst)
    return dst


def test_a_damaged_common_state_item_is_refused_by_name(tmp_path, capsys):
    """megatron-core 0.19's common_state item (Megatron-LM's args inside the .distcp file): a flipped byte
    fails its record's CRC-32, named; bytes that are not a pickle are named too."""
    from torch.distributed.checkpoint import FileSystemReader

    src = producer_copy(tmp_path, "mcore_0_19_megatron_lm")
    folder = src / "iter_0000010"
    meta = FileSystemReader(str(folder)).read_metadata()
    ((index, info),) = [(i, v) for i, v in meta.storage_data.items() if i.fqn == "common_state/shard_0_1"]
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = cli_error(capsys, "inspect", str(src))
    assert "the common_state/shard_0_1 item: shard file" in line and "fails its CRC-32 check" in line, line
    data[info.offset : info.offset + info.length] = b"\0" * info.length  # no zip records left to check
    shard.write_bytes(bytes(data))
    line = cli_error(capsys, "inspect", str(src))
    assert f"the common_state item in {shard} cannot be read" in line, line


@pytest.mark.parametrize(
    "model, says",
    [({"position_embedding_type": "yarn"}, "position_embedding_type=yarn (position embeddings other than rope)"),
     ({"yarn_rotary_scaling_factor": 4.0}, "yarn_rotary_scaling_factor=4.0 (YaRN rope scaling)"),
     ({"moe_router_score_function": "sigmoid"},
      "moe_router_score_function=sigmoid (a router score function other than softmax)"),
     ({"use_mup": True}, "use_mup=True (muP scaling"),
     ({"softmax_scale": 0.1}, "softmax_scale=0.1 (a custom softmax scale)"),
     ({"activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False}},
      "activation_func=gelu (needs SiLU under SwiGLU)"),
     ({"rope_flavour": "x"}, "model.rope_flavour is a field parallel_bridge does not know")],
)
def test_a_run_config_yaml_with_a_refused_field_is_refused_by_name(tmp_path, capsys, model, says):
    """The run_config.yaml Megatron-Bridge 0.6.2 wrote, one field changed: math-changing and unknown fields are
    refused by name."""
    import yaml

    src = producer_copy(tmp_path, "megatron_bridge_0_6")
    path = src / "iter_0000000" / "run_config.yaml"
    body = yaml.safe_load(path.read_text())
    body["model"].update(model)
    path.write_text(yaml.safe_dump(body))
    line = cli_error(capsys, "inspect", str(src))
    assert says in line and "run_config.yaml" in line, line


def test_run_config_yaml_and_a_hf_config_that_disagree_are_refused(tmp_path, capsys):
    import json

    src = producer_copy(tmp_path, "megatron_bridge_0_6")
    hf = tmp_path / "config.json"
    body = MegatronCheckpoint.open(src).config.to_hf()
    hf.write_text(json.dumps({**body, "rms_norm_eps": 1e-5}))
    line = cli_error(capsys, "inspect", str(src), "--hf-config", str(hf))
    assert "disagree on norm_epsilon: Megatron-Bridge run_config.yaml (" in line and "says 1e-06" in line, line
    assert f"Hugging Face config.json ({hf}) says 1e-05" in line, line


def test_a_verl_checkpoint_whose_hf_config_is_another_model_is_refused(tmp_path, capsys):
    """verl's huggingface/config.json against the tensors in dist_ckpt/: the shapes name the mismatch."""
    import json

    src = producer_copy(tmp_path, "verl_layout")
    config = src / "global_step_10" / "actor" / "huggingface" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "intermediate_size": 512}))
    line = cli_error(capsys, "inspect", str(src))
    assert "tensor decoder.layers.0.mlp.linear_fc1.weight has shape (512, 128) but the config implies (1024, 128)" in line


# ------------------------------------------------------------------- command-line values
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, says",
    [
        ("{not json", "--config-overrides is not valid JSON"),
        ("[1, 2]", "--config-overrides must be a JSON object"),
        ('{"num_layers": "x"}', "override num_layers='x' must be a positive integer"),
        ('{"hidden_size": 1.5}', "override hidden_size=1.5 must be a positive integer"),
        ('{"layers": 2}', r"unknown configuration keys ['layers']"),
        ('{"hidden_size": 256}', "has shape (128, 128) but the config implies (128, 256)"),
    ],
)
def test_config_overrides_are_checked(ckpt, capsys, overrides, says):
    assert says in cli_error(capsys, "inspect", str(ckpt("dist")), "--config-overrides", overrides)


@pytest.mark.slow
def test_iteration_that_is_negative_or_absent(ckpt, capsys):
    src = ckpt("dist")
    assert "iteration must be a non-negative integer, got -1" in cli_error(
        capsys, "inspect", str(src), "--iteration", "-1"
    )
    assert "iteration 99 not found" in cli_error(capsys, "inspect", str(src), "--iteration", "99")


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, says",
    [
        (["--tokenizer", "/nonexistent/tok"], "--tokenizer folder /nonexistent/tok does not exist"),
        (["--tokenizer", "FILE"], "is a file; give the folder"),
        (["--tokenizer", "EMPTY"], "holds no tokenizer.json"),
        (["-tp", "3", "--tokenizer", "TOK"], "tensor-parallel size 3 does not divide num_attention_heads=4"),
        (["--port", "70000", "--tokenizer", "TOK"], "--port 70000 is not a TCP port"),
        ([], "no tokenizer: pass --tokenizer"),
    ],
)
def test_serve_checks_before_starting_anything(ckpt, tmp_path, capsys, extra, says):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "TOK").mkdir()
    (tmp_path / "TOK" / "tokenizer.json").write_text("{}")
    extra = [str(tmp_path / a) if a in ("FILE", "EMPTY", "TOK") else a for a in extra]
    assert says in cli_error(capsys, "serve", str(ckpt("dist")), "--print", *extra)


def test_unknown_convert_target(tmp_path, capsys):
    assert "unknown target format 'gguf'; supported: hf" in cli_error(
        capsys, "convert", str(tmp_path), str(tmp_path / "o"), "--to", "gguf"
    )


def test_unexpected_errors_say_where_the_traceback_went(monkeypatch, capsys):
    import parallel_bridge.cli.main as cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_env", boom)
    line = cli_error(capsys, "env")
    log = line.split("traceback in ")[1].split(",")[0]
    assert "unexpected ZeroDivisionError (a bug" in line and "ZeroDivisionError" in Path(log).read_text()
    os.unlink(log)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "env"])


# ------------------------------------------------------------------- the argument catalogue
@pytest.mark.parametrize("name", sorted(megatron_args.NEUTRAL))
def test_every_math_changing_argument_away_from_llama_is_refused_by_name(name):
    """Walks the list: each argument at a value vLLM's Llama does not compute is refused, naming it."""
    odd = {"normalization": "LayerNorm", "position_embedding_type": "learned_absolute", "softmax_type": "learnable",
           "swiglu": False, "gated_linear_unit": False, "rotary_percent": 0.5, "glu_linear_offset": 1.0}
    value = odd.get(name, 7 if megatron_args.NEUTRAL[name][0][0] is None else True)
    args = {**ARGS, name: value} if name not in ("swiglu", "gated_linear_unit") else {**ARGS, "swiglu": False,
                                                                                    "gated_linear_unit": False}
    with pytest.raises(ModelConfigError, match=rf"{name}={value!s}.*refused"):
        GPTConfig.from_args(argparse.Namespace(**args))


def test_the_llama_arguments_themselves_are_accepted():
    cfg = GPTConfig.from_args(argparse.Namespace(**ARGS, use_rope_scaling=False, rotary_percent=1.0))
    assert (cfg.num_query_groups, cfg.vocab_size, cfg.padded_vocab_size) == (2, 100, 128)


def test_every_transformer_config_field_is_classified():
    """A megatron-core argument this project does not classify would be ignored silently: fail instead."""
    pytest.importorskip("megatron.core")
    import dataclasses

    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer import TransformerConfig

    layout = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} - layout
    unclassified = sorted(fields - megatron_args.MAPPED - megatron_args.NO_MATH - set(megatron_args.NEUTRAL))
    assert not unclassified, f"classify these in parallel_bridge/spec/megatron_args.py: {unclassified}"
    assert not (megatron_args.MAPPED & megatron_args.NO_MATH) and not (set(megatron_args.NEUTRAL) & (megatron_args.MAPPED | megatron_args.NO_MATH))


def test_an_unclassified_field_away_from_its_default_is_refused():
    pytest.importorskip("megatron.core")
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    @dataclasses.dataclass
    class NewerConfig(TransformerConfig):
        attention_sink_tokens: int = 0  # a field a newer megatron-core might add

    kwargs = dict(num_layers=2, hidden_size=128, num_attention_heads=4, add_bias_linear=False)
    assert megatron_args.unclassified_changes(NewerConfig(**kwargs)) == []
    assert megatron_args.unclassified_changes(NewerConfig(**kwargs, attention_sink_tokens=4)) == [
        "attention_sink_tokens=4 (an argument parallel_bridge does not know)"
    ]


@pytest.mark.parametrize(
    "values, says",
    [
        ({"vocab_size": 129}, "vocab_size=129 is larger than padded_vocab_size=128"),
        ({"num_layers": 0}, "num_layers=0 must be a positive integer"),
        ({"num_layers": True}, "num_layers=True must be a positive integer"),
        ({"hidden_size": 130}, "hidden_size=130 is not a multiple of num_attention_heads=4; give kv_channels"),
        ({"normalization": 1}, "normalization=1 must be a string"),
    ],
)
def test_model_config_values(values, says):
    base = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                vocab_size=100, padded_vocab_size=128)
    with pytest.raises(ModelConfigError) as e:
        GPTConfig(**{**base, **values})
    assert says in str(e.value)


# ------------------------------------------------------------------- loaders fill every parameter
def test_vllm_parameter_left_unfilled_is_named():
    from parallel_bridge.serving.megatron_format import fill_parameters

    params = {"model.norm.weight": torch.empty(4), "model.layers.0.self_attn.o_proj.bias": torch.empty(4)}
    with pytest.raises(CheckpointError, match=r"no checkpoint tensor filled vLLM's parameters "
                                              r"\['model.layers.0.self_attn.o_proj.bias'\]"):
        fill_parameters(params, iter([("model.norm.weight", torch.ones(4))]), "ckpt", "LlamaForCausalLM")
    with pytest.raises(CheckpointError, match="checkpoint tensor model.extra.weight has no parameter"):
        fill_parameters(params, iter([("model.extra.weight", torch.ones(4))]), "ckpt", "LlamaForCausalLM")
    with pytest.raises(CheckpointError, match=r"this rank's part has shape \(3,\) but vLLM's parameter has \(4,\)"):
        fill_parameters(params, iter([("model.norm.weight", torch.ones(3))]), "ckpt", "LlamaForCausalLM")


# ------------------------------------------------------------------- registry, context, DeepSpeed
class _Complete(nn.Module):
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return input_ids

    def compute_logits(self, hidden_states):
        return hidden_states


class _NoLogits(nn.Module):
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return input_ids


def _factory(vllm_config, ctx) -> _NoLogits:  # a string annotation here: this module has future annotations
    return _NoLogits()


def test_registering_over_a_vllm_architecture_needs_override():
    pytest.importorskip("vllm")
    from vllm import ModelRegistry

    from parallel_bridge import register_model
    from parallel_bridge.serving.registry import unregister

    with pytest.raises(ValueError, match=r"vLLM already has a model 'LlamaForCausalLM' \(vllm.model_executor.models"
                                         r".llama.LlamaForCausalLM\).*pass override=True"):
        register_model("LlamaForCausalLM", lambda vllm_config, ctx: nn.Linear(1, 1))
    saved = ModelRegistry.models["LlamaForCausalLM"]
    try:
        cls = register_model("LlamaForCausalLM", _Complete, override=True)
        assert ModelRegistry.models["LlamaForCausalLM"].model_cls is cls
    finally:
        ModelRegistry.models["LlamaForCausalLM"] = saved
        unregister("LlamaForCausalLM")


def test_factory_return_annotation_is_checked_under_future_annotations():
    pytest.importorskip("vllm")
    from parallel_bridge import register_model

    with pytest.raises(TypeError, match="_NoLogits, the return type of .*lacks what vLLM calls: compute_logits"):
        register_model("PBTest_future_annotations", _factory)


@pytest.mark.parametrize(
    "kwargs, error, says",
    [
        ({"timeout_s": "5"}, TypeError, "timeout_s must be a number of seconds, got '5' (str)"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be positive, got 0"),
        ({"tp": "2"}, TypeError, "tp must be an int, got '2'"),
        ({"backend": 3}, TypeError, "backend must be a torch.distributed backend name like 'gloo' or 'nccl', got 3"),
        ({"order": "tp-xx"}, ValueError, "order 'tp-xx' names unknown axes ['xx']"),
    ],
)
def test_parallel_context_values(kwargs, error, says):
    with pytest.raises(error) as e:
        ParallelContext(**kwargs)
    assert says in str(e.value)


@pytest.mark.parametrize(
    "config, error, says",
    [
        ({"train_batch_size": "8"}, TypeError, "DeepSpeed config train_batch_size='8' must be an integer, not str"),
        ({"train_batch_size": 8, "gradient_accumulation_steps": 0}, ValueError,
         "gradient_accumulation_steps=0 must be >= 1"),
        ([("train_batch_size", 8)], TypeError, "the DeepSpeed config must be a dict, got list"),
    ],
)
def test_deepspeed_batch_config_types(config, error, says):
    from parallel_bridge.adapters.deepspeed import check_batch_config

    with pytest.raises(error) as e:
        check_batch_config(ParallelContext(), config)
    assert says in str(e.value)


# ------------------------------------------------------------------- weight-sync rounds
def test_sync_flipped_byte_is_named(tmp_path):
    writers = publish(tmp_path, full_tensors(), 2)
    writers[1]._buf[70] ^= 0x10  # inside rank 1's first tensor (the embedding), row 2
    r = RoundReader(tmp_path, 1, 2, 1)
    with pytest.raises(RoundError, match="embedding.word_embeddings.weight: checksum mismatch in row 2 of trainer rank \\(tp=1, pp=0\\)"):
        r.read("embedding.word_embeddings.weight")


def test_sync_stale_version_and_layout_are_refused(tmp_path):
    publish(tmp_path, full_tensors(), 2, version=3)
    with pytest.raises(RoundError, match="trainer rank \\(tp=0, pp=0\\) published version 3, not 4"):
        RoundReader(tmp_path, 4, 2, 1)
    with pytest.raises(RoundError, match="tp=2 pp=1 layout, but the engine was initialized for tp=1 pp=1"):
        RoundReader(tmp_path, 3, 1, 1)


def test_sync_tensor_not_rewritten_this_round_is_refused(tmp_path):
    full = full_tensors()
    writers = publish(tmp_path, full, 2, version=1)
    fc2 = "decoder.layers.0.mlp.linear_fc2.weight"
    publish(tmp_path, full, 2, version=2, skip=fc2, writers=writers)  # round 1's bytes and hashes remain
    r = RoundReader(tmp_path, 2, 2, 1)
    r.read("decoder.layers.0.self_attention.linear_qkv.weight")
    with pytest.raises(RoundError, match=f"{fc2} was not written in round 2 .* \\(last written in round 1\\)"):
        r.read(fc2)
    with pytest.raises(RoundError, match="tensor decoder.layers.1.mlp.linear_fc2.weight was published by no trainer rank"):
        r.read("decoder.layers.1.mlp.linear_fc2.weight")


def test_checkpoint_is_opened_once_per_process_until_rewritten(ckpt):
    """vLLM's config parser, download_model and load_weights share one open; a rewrite opens it again."""
    from parallel_bridge.serving.megatron_format import opened

    folder = ckpt("dist")
    first = opened(folder)
    assert opened(folder) is first
    shard = next(folder.rglob("*.distcp"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))  # written again
    assert opened(folder) is not first
