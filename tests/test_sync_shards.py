"""The shared-memory round format: reading any slice of the TP-sharded tensors returns exactly the full
tensor's slice (pinned to megatron_layout.merge), reads only the slice's bytes, and refuses corrupt,
stale, missing or mis-laid-out data by name. Pure CPU, no processes."""

import dataclasses

import pytest
import torch

from parallel_bridge.checkpoint import megatron_layout as ml
from parallel_bridge.checkpoint.gpt_config import GPTConfig
from parallel_bridge.sync.shards import (
    LocalTensor,
    RoundError,
    RoundReader,
    ShardWriter,
    copy_and_hash,
    shard_hash,
)

CFG = GPTConfig(
    num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=6,
    vocab_size=10, padded_vocab_size=12,
)
FULL = {
    "embedding.word_embeddings.weight": (12, 8),
    "decoder.layers.0.self_attention.linear_qkv.weight": (16, 8),
    "decoder.layers.0.self_attention.linear_proj.weight": (8, 8),
    "decoder.layers.0.mlp.linear_fc1.weight": (12, 8),
    "decoder.layers.0.mlp.linear_fc2.weight": (8, 6),
    "decoder.layers.0.input_layernorm.weight": (8,),
}
META = {"source_pp": 1, "config": dataclasses.asdict(CFG)}


def _publish(root, full, tp, version=1, skip=None, writers=None):
    writers = writers or [None] * tp
    for t in range(tp):
        local = {n: ml.shard(n, x, tp, t) for n, x in full.items()}
        if writers[t] is None:
            layout = [LocalTensor(n, tuple(x.shape), x.dtype) for n, x in local.items()]
            writers[t] = ShardWriter(root, t, 0, layout)
        w = writers[t]
        for n, x in local.items():
            if n != skip:
                w.write(n, x)
        w.commit(version, {**META, "source_tp": tp})
    return writers


@pytest.fixture
def full():
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(*s, generator=g) for n, s in FULL.items()}


@pytest.mark.parametrize("tp", [1, 2])
def test_every_slice_equals_the_full_tensors_slice(tmp_path, full, tp):
    _publish(tmp_path, full, tp)
    r = RoundReader(tmp_path, 1, tp, 1)
    assert r.config == CFG
    for name, x in full.items():
        assert torch.equal(r.read(name), x), name
        for dim in range(x.dim()):
            for start in range(x.shape[dim]):
                for n in {1, x.shape[dim] - start}:
                    assert torch.equal(r.read(name, dim, start, n), x.narrow(dim, start, n)), (name, dim, start, n)


def test_row_ranges_read_only_their_bytes(tmp_path, full):
    _publish(tmp_path, full, 2)
    r = RoundReader(tmp_path, 1, 2, 1)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    got = r.read_rows(fc1, [(0, 3), (6, 3)])  # gate and up halves of rank 0 of a TP=2 serving split
    assert torch.equal(got, torch.cat([full[fc1][0:3], full[fc1][6:9]]))
    assert r.received_bytes == got.numel() * 4


def test_flipped_byte_is_named(tmp_path, full):
    writers = _publish(tmp_path, full, 2)
    writers[1]._buf[70] ^= 0x10  # inside rank 1's first tensor (the embedding), row 2
    r = RoundReader(tmp_path, 1, 2, 1)
    with pytest.raises(RoundError, match="embedding.word_embeddings.weight: checksum mismatch in row 2 of trainer rank tp=1"):
        r.read("embedding.word_embeddings.weight")


def test_stale_version_and_layout_are_refused(tmp_path, full):
    _publish(tmp_path, full, 2, version=3)
    with pytest.raises(RoundError, match="trainer rank \\(tp=0, pp=0\\) published version 3, not 4"):
        RoundReader(tmp_path, 4, 2, 1)
    with pytest.raises(RoundError, match="tp=2 pp=1 layout, but the engine was initialized for tp=1 pp=1"):
        RoundReader(tmp_path, 3, 1, 1)


def test_tensor_not_rewritten_this_round_is_refused(tmp_path, full):
    writers = _publish(tmp_path, full, 2, version=1)
    fc2 = "decoder.layers.0.mlp.linear_fc2.weight"
    _publish(tmp_path, full, 2, version=2, skip=fc2, writers=writers)  # round 1's bytes and hashes remain
    r = RoundReader(tmp_path, 2, 2, 1)
    r.read("decoder.layers.0.self_attention.linear_qkv.weight")
    with pytest.raises(RoundError, match=f"{fc2} was not written in round 2 .* \\(last written in round 1\\)"):
        r.read(fc2)
    with pytest.raises(RoundError, match="tensor decoder.layers.1.mlp.linear_fc2.weight was published by no trainer rank"):
        r.read("decoder.layers.1.mlp.linear_fc2.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3000, 1024), (7, 5), (9,)])
def test_fused_copy_and_hash_equals_separate(dtype, shape):
    x = torch.randn(*shape).to(dtype)
    for axis in (0, 1) if len(shape) > 1 else (0,):
        dst = torch.empty_like(x)
        assert torch.equal(copy_and_hash(dst, x, axis), shard_hash(x, axis))
        assert torch.equal(dst, x)
    if len(shape) > 1:  # a swapped pair of rows changes the column hashes' partner: the row hashes
        y = x.clone()
        y[[0, 1]] = y[[1, 0]]
        assert not torch.equal(shard_hash(y, 0), shard_hash(x, 0)) or torch.equal(x[0], x[1])
