"""The distributed, streaming HF -> Megatron import (`torchrun --nproc-per-node K -m parallel_bridge convert HF OUT
--to megatron --tp N --pp M`): each rank's shard built from only the safetensors slices it holds equals
megatron-core's shard of the full tensor (every kind, every rank), the checkpoint written under torchrun equals the
one-process import tensor for tensor (bytes are copied, so exactly), a world that does not match is refused before
anything is written, and a rank killed mid-import leaves no OUT and nothing the next run does not remove."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from parallel_bridge.spec import schema
from parallel_bridge.spec.model import GPTConfig

CONFIGS = {
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32},
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
                "num_experts_per_tok": 2},
}
SIZES = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
         "num_hidden_layers": 2, "vocab_size": 200, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_reads_exactly_its_shard(family, tp):
    spec = GPTConfig.from_hf({**SIZES, **CONFIGS[family]}, 256 * tp)
    g = torch.Generator().manual_seed(tp)
    for name, kind, layer in schema.tensors(spec):
        parts = [torch.randn(shape, generator=g) for shape in schema.hf_shapes(kind, spec)]
        full = schema.from_hf(kind, layer, parts, spec, schema.kind_of(name, spec).expert)
        read = [0]

        def read_part(i, dim, start, length, parts=parts, read=read):
            piece = parts[i] if dim is None else parts[i].narrow(dim, start, length)
            read[0] += piece.numel()
            return piece.clone()

        for rank in range(tp):
            got = kind.sharding.hf_shard(name, read_part, kind.shape(spec), spec, tp, rank)
            assert torch.equal(got, kind.sharding.shard(name, full, tp, rank)), (name, tp, rank)
        every = sum(p.numel() for p in parts)
        assert read[0] == (every if kind.sharding.dim is not None else every * tp), name  # split: once in all


# ------------------------------------------------------------------ under torchrun (real processes)
def torchrun(*args, n=2):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "parallel_bridge",
         "convert", *map(str, args), "--to", "megatron", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True)


def same_checkpoints(a, b):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    one, two = MegatronCheckpoint.open(a), MegatronCheckpoint.open(b)
    assert one.config == two.config and one.tensors.keys() == two.tensors.keys()
    for name in one.tensors:
        assert torch.equal(one.read(name), two.read(name)), name


@pytest.mark.slow
@pytest.mark.parametrize("family, tp, pp", [("qwen2", 2, 1), ("qwen2", 1, 2), ("qwen3", 2, 1), ("mixtral", 2, 1)])
def test_torchrun_import_equals_the_one_process_import(tmp_path, family, tp, pp):
    from test_hf_import import hf_model
    from test_moe_hf import FAMILIES as MOE

    from parallel_bridge.checkpoint.hf_import import import_hf

    hf = tmp_path / "hf"
    hf_model(family, hf, MOE if family in MOE else None)
    proc = torchrun(hf, tmp_path / "dist", "--tp", tp, "--pp", pp)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.strip().splitlines()[-1] == f"wrote {tmp_path / 'dist'}", err[-3000:]
    import_hf(hf, tmp_path / "one", tp=tp, pp=pp)
    same_checkpoints(tmp_path / "one", tmp_path / "dist")


@pytest.mark.slow
def test_a_world_that_does_not_match_is_refused_before_anything_is_written(tmp_path):
    from test_hf_import import hf_model

    hf_model("qwen3", tmp_path / "hf")
    proc = torchrun(tmp_path / "hf", tmp_path / "out", "--tp", 1, "--pp", 1)
    _, err = proc.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.startswith("parallel-bridge convert: error:")]
    assert proc.returncode != 0 and len(lines) == 2, err[-3000:]  # one line per rank
    assert "torchrun started 2 processes but --tp 1 x --pp 1 is 1" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.slow
def test_a_rank_killed_mid_import_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    import transformers

    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                                      intermediate_size=1536, num_hidden_layers=8, vocab_size=8192,
                                      tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")  # ~200 MB
    out = tmp_path / "out"
    proc = torchrun(tmp_path / "hf", out, "--tp", 2)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "parallel_bridge convert"], capture_output=True,
                           text=True).stdout.split()
    assert proc.poll() is None and len(ranks) == 2, "the import ended before a rank could be killed"
    os.kill(int(max(ranks, key=int)), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and not out.exists(), err[-2000:]
    again = torchrun(tmp_path / "hf", out, "--tp", 2)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # the killed run's folder removed
