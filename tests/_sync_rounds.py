"""A shared-memory weight-sync round published from a tiny model's TP shards, for the shard tests."""

import dataclasses

import torch

from parallel_bridge.spec import schema
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.sync.shards import LocalTensor, ShardWriter

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


def publish(root, full, tp, version=1, skip=None, writers=None):
    writers = writers or [None] * tp
    for t in range(tp):
        local = {n: schema.shard(n, x, tp, t) for n, x in full.items()}
        if writers[t] is None:
            layout = [LocalTensor(n, tuple(x.shape), x.dtype) for n, x in local.items()]
            writers[t] = ShardWriter(root, t, 0, layout)
        w = writers[t]
        for n, x in local.items():
            if n != skip:
                w.write(n, x)
        w.commit(version, {**META, "source_tp": tp})
    return writers


def full_tensors():
    """The tiny model's full tensors, seeded."""
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(*s, generator=g) for n, s in FULL.items()}
