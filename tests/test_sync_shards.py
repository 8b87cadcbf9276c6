"""The shared-memory round format: reading any slice of the TP-sharded tensors returns exactly the full
tensor's slice (pinned to the sharding objects' merge) and reads only the slice's bytes. Pure CPU, no processes.
Corrupt, stale and missing rounds are refused by name: see test_bad_inputs.py."""

import pytest
import torch
from _sync_rounds import CFG, full_tensors, publish

from parallel_bridge.spec.store import TensorStore
from parallel_bridge.sync.pieces import copy_and_hash, shard_hash
from parallel_bridge.sync.shards import RoundReader


@pytest.fixture
def full():
    return full_tensors()


@pytest.mark.parametrize("tp", [1, 2])
def test_every_slice_equals_the_full_tensors_slice(tmp_path, full, tp):
    publish(tmp_path, full, tp)
    r = RoundReader(tmp_path, 1, tp, 1)
    assert r.config == CFG and isinstance(r, TensorStore)  # served by rank_parts like a checkpoint
    for name, x in full.items():
        assert r.shape(name) == tuple(x.shape), name
        assert torch.equal(r.read(name), x), name
        for dim in range(x.dim()):
            for start in range(x.shape[dim]):
                for n in {1, x.shape[dim] - start}:
                    assert torch.equal(r.read(name, dim, start, n), x.narrow(dim, start, n)), (name, dim, start, n)


def test_row_ranges_read_only_their_bytes(tmp_path, full):
    publish(tmp_path, full, 2)
    r = RoundReader(tmp_path, 1, 2, 1)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    got = r.read_rows(fc1, [(0, 3), (6, 3)])  # gate and up halves of rank 0 of a TP=2 serving split
    assert torch.equal(got, torch.cat([full[fc1][0:3], full[fc1][6:9]]))
    assert r.received_bytes == got.numel() * 4


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
        assert not torch.equal(x[0], x[1])  # random rows: the swap moves something
        assert not torch.equal(shard_hash(y, 0), shard_hash(x, 0))
