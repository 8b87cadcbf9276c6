"""The one TP rule: what each tensor-parallel rank holds, and the sizes a degree does not split, named."""

import pytest

from parallel_bridge.spec.tp_split import TPSplitError, heads_per_rank, split_for_tp


@pytest.mark.parametrize(
    "tp, heads, kv, expected",
    [
        # (query heads, kv heads, kv replicas) per rank; vLLM's QKVParallelLinear rule: kv heads split when
        # tp <= kv heads, else one kv head per rank replicated tp / kv times
        (1, 8, 2, (8, 2, 1)),
        (2, 8, 2, (4, 1, 1)),
        (4, 8, 2, (2, 1, 2)),
        (8, 8, 1, (1, 1, 8)),
        (4, 32, 8, (8, 2, 1)),
    ],
)
def test_heads_split_or_kv_replicated(tp, heads, kv, expected):
    split = split_for_tp(tp, heads, kv, ffn=64, vocab=100)
    assert (split.heads, split.kv_heads, split.kv_replicas) == expected
    assert split.ffn == 64 // tp and split.vocab == -(-100 // tp) and split.padded_vocab % tp == 0


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"tp": 3, "heads": 8, "kv_heads": 8}, "tensor-parallel size 3 does not divide num_attention_heads=8, num_query_groups=8"),
        ({"tp": 4, "heads": 8, "kv_heads": 2, "replicate_kv": False}, "tensor-parallel size 4 does not divide num_query_groups=2"),
        ({"tp": 4, "heads": 12, "kv_heads": 3}, "num_query_groups=3 is below tensor-parallel size 4 and does not divide it"),
        ({"tp": 2, "heads": 6, "kv_heads": 4}, "num_query_groups=4 does not divide num_attention_heads=6"),
        ({"tp": 2, "heads": 4, "ffn": 33}, "does not divide ffn_hidden_size=33"),
        ({"tp": 2, "heads": 4, "vocab": 99, "pad_vocab": False}, "does not divide vocab_size=99"),
        ({"tp": 0, "heads": 4}, "tensor-parallel size must be a positive integer, got 0"),
    ],
)
def test_sizes_a_degree_does_not_split_are_named(kwargs, says):
    with pytest.raises(TPSplitError) as info:
        split_for_tp(**kwargs)
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_padding_vocab_is_allowed_unless_refused():
    assert split_for_tp(4, 4, vocab=10).padded_vocab == 12


def test_head_counts_not_divisible_by_tp():
    with pytest.raises(ValueError, match="tensor-parallel size 4 does not divide num_attention_heads=6"):
        heads_per_rank(6, 2, 4)
    with pytest.raises(ValueError, match="tensor-parallel size 4 does not divide num_query_groups=6"):
        heads_per_rank(12, 6, 4)
    with pytest.raises(
        ValueError, match="num_query_groups=3 is below tensor-parallel size 4 and does not divide it"
    ):
        heads_per_rank(12, 3, 4)
    assert heads_per_rank(8, 2, 4) == (2, 1)  # kv heads replicated
