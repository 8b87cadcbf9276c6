"""The sharding objects (parallel_bridge/spec/sharding.py) against index arithmetic on full tensors: shard and
merge, the pieces a range of the full tensor is made of, a vLLM rank's slice read through a TensorStore, the
HF parts both ways, and the grouped QKV rows for weights and for activations. Pure CPU, no processes."""

import pytest
import torch

from parallel_bridge.spec import schema, sharding
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.sharding import GroupedQKV
from parallel_bridge.spec.slices import rank_parts

SPEC = GPTConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                 vocab_size=50, padded_vocab_size=64)


class DictStore:
    """A TensorStore over full tensors in memory."""

    def __init__(self, spec, tensors):
        self.config, self.tensors = spec, tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, length=None):
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, t.shape[dim] - start if length is None else length)

    def read_rows(self, name, index):
        return torch.cat([self.read(name, 0, s, n) for s, n in index])


@pytest.fixture
def full():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in schema.expected_shapes(SPEC).items()}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_merge_is_the_full_tensor_and_pieces_locate_every_entry(full, tp):
    for name, t in full.items():
        s = schema.sharding_of(name)
        shards = [s.shard(name, t, tp, r) for r in range(tp)]
        assert torch.equal(s.merge(name, shards), t), name
        assert s.full_shape(shards[0].shape, tp) == tuple(t.shape), name
        if s.dim is None:
            continue
        local = shards[0].shape[s.dim]
        for start in range(0, t.shape[s.dim], 7):
            pieces = s.pieces(local, tp, start, 5)
            got = torch.cat([shards[r].narrow(s.dim, a, n) for r, a, n in pieces], dim=s.dim)
            assert torch.equal(got, t.narrow(s.dim, start, min(5, t.shape[s.dim] - start))), (name, start)


def test_the_gated_shard_holds_its_gate_then_its_up_rows(full):
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    t, half = full[name], full[name].shape[0] // 2
    n = half // 2
    assert torch.equal(sharding.GATED.shard(name, t, 2, 1), torch.cat([t[n:half], t[half + n :]]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_vllm_rank_keeps_its_heads_its_gate_and_up_rows_its_columns_and_its_vocabulary(full, tp):
    parts = dict(rank_parts(DictStore(SPEC, full), tp, tp - 1))
    qkv = GroupedQKV.of(SPEC)
    q, k, v = qkv.unfuse("qkv", full["decoder.layers.0.self_attention.linear_qkv.weight"])
    heads, d = qkv.rank_groups(tp, tp - 1)[1], SPEC.head_dim
    groups = qkv.rank_groups(tp, tp - 1)[0]
    want_qkv = torch.cat([q[heads.start * d : heads.stop * d], *(x[g * d : (g + 1) * d] for x in (k, v) for g in groups)])
    assert torch.equal(parts["model.layers.0.self_attn.qkv_proj.weight"], want_qkv)
    f = SPEC.ffn_hidden_size // tp
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    r = tp - 1
    assert torch.equal(parts["model.layers.0.mlp.gate_up_proj.weight"],
                       torch.cat([fc1[r * f : (r + 1) * f], fc1[SPEC.ffn_hidden_size + r * f : SPEC.ffn_hidden_size + (r + 1) * f]]))
    assert torch.equal(parts["model.layers.0.mlp.down_proj.weight"], full["decoder.layers.0.mlp.linear_fc2.weight"][:, r * f : (r + 1) * f])
    per = -(-SPEC.vocab_size // tp)
    rows = slice(min(r * per, SPEC.vocab_size), min((r + 1) * per, SPEC.vocab_size))
    assert torch.equal(parts["model.embed_tokens.weight"], full["embedding.word_embeddings.weight"][rows])
    assert torch.equal(parts["model.norm.weight"], full["decoder.final_layernorm.weight"])


def test_hf_parts_both_ways(full):
    for name, t in full.items():
        located = schema.kind_of(name)
        parts = [p for _, p in schema.to_hf(name, t, SPEC)]
        assert [tuple(p.shape) for p in parts] == schema.hf_shapes(located.kind, SPEC), name
        back = schema.from_hf(located.kind, located.layer, parts, SPEC)
        real = t[: SPEC.vocab_size] if located.kind.sharding is sharding.VOCAB else t
        assert torch.equal(back[: real.shape[0]], real), name  # vocabulary padding comes back as zeros
        if located.kind.sharding is sharding.VOCAB:
            assert not back[SPEC.vocab_size :].any()


def test_the_grouped_qkv_rows_split_activations_as_they_split_weights():
    qkv = GroupedQKV(4, 2, 8)
    x = torch.randn(5, 64)
    w = torch.randn(qkv.rows, 64)
    by_weights = [x @ part.T for part in qkv.unfuse("w", w)]
    assert all(torch.allclose(a, b) for a, b in zip(qkv.unfuse_features(x @ w.T), by_weights))
    assert torch.equal(qkv.fuse(*qkv.unfuse("w", w)), w)


def test_an_undeclared_name_has_no_sharding():
    from parallel_bridge.errors import UnknownTensorError

    with pytest.raises(UnknownTensorError, match="decoder.layers.0.mlp.experts.linear_fc1.weight has no place"):
        schema.sharding_of("decoder.layers.0.mlp.experts.linear_fc1.weight")
