"""The parity rule (parallel_bridge/numerics/parity.py): it bounds one fp32 implementation's rounding error on the
suite's own model sizes, and it stays far enough below real bugs that each still fails clearly.

The rule's constants come from benchmarks/parity_rule.py (57 tiny Llamas, fp32 against fp64). Here a few of
those models are measured again on whatever CPU runs the suite (AVX2 or AVX-512 kernels, capped or not),
and the bugs this project has met (a weight one RL step stale, swapped kv heads, a dropped QKV bias, a
dropped rope scaling, two FFN columns swapped) are applied to the suite's model sizes and compared with it.
"""

import copy
import math

import pytest
import torch

from parallel_bridge.numerics import parity

pytest.importorskip("transformers")

PROMPTS = [[5, 17, 42], [3, 9, 27, 81, 11, 2], [64]]  # the checkpoint tests' prompts
SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.2,
             tie_word_embeddings=False)
LENGTH = parity.reduction_length(hidden=128, ffn=256, layers=2, vocab=128, heads=4, head_dim=32, seq_len=10)
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def _llama(seed=0, family="llama", **change):
    import transformers

    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    config = getattr(transformers, config_cls)(**{**SIZES, **change}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    if family == "qwen2":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.copy_(torch.randn(p.shape))  # as the suite's checkpoints do: zero biases hide a drop
    return model


def _first_steps(model):
    """Per prompt, the full next-token log-softmax (float64 of the model's logits) and the largest |logit|."""
    rows, zmax = [], 0.0
    for p in PROMPTS:
        with torch.no_grad():
            z = model(torch.tensor([p])).logits[0].double()
        zmax = max(zmax, z.abs().max().item())
        rows.append(torch.log_softmax(z[-1], -1))
    return rows, zmax


@pytest.mark.parity
@pytest.mark.parametrize("seed,change", [(0, {}), (1, {}), (2, {"initializer_range": 0.3}),
                                         (3, {"num_hidden_layers": 4}), (4, {"vocab_size": 1024})])
def test_one_implementation_is_within_half_the_bound_of_exact(seed, change):
    """fp32 against the same model in fp64, over every position of random sequences: max and mean within
    SINGLE_MAX and SINGLE_MEAN units (half the two-implementation bound), on this CPU's kernels."""
    model = _llama(seed, **change)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z32 = model(ids).logits.double()
        z64 = copy.deepcopy(model).double()(ids).logits
    c = model.config
    length = parity.reduction_length(hidden=c.hidden_size, ffn=c.intermediate_size, layers=c.num_hidden_layers,
                                     vocab=c.vocab_size, heads=4, head_dim=c.hidden_size // 4, seq_len=16)
    for row32, row64 in zip(z32, z64):  # per sequence, as the rule is calibrated
        bound = parity.logprob_bound(row64.abs().max().item(), length)
        gap = parity.Gap.between(torch.log_softmax(row32, -1), torch.log_softmax(row64, -1))
        print(f"\n[fp32 vs fp64, seed {seed} {change}] max {gap.max:.2e} mean {gap.mean:.2e} (half the rule: "
              f"{bound.max / 2:.2e} / {bound.mean / 2:.2e})")
        assert gap.max <= bound.max / 2 and gap.mean <= bound.mean / 2


def _stale(model):
    with torch.no_grad():  # every weight one Adam step of lr 1e-4 behind (the RL demo's step)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(1e-4 * torch.sign(torch.randn(p.shape, generator=g)))


def _swapped_kv_heads(model):
    with torch.no_grad():
        k = model.model.layers[1].self_attn.k_proj.weight
        k[:32], k[32:64] = k[32:64].clone(), k[:32].clone()


def _swapped_ffn_columns(model):
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w[:, [0, 1]] = w[:, [1, 0]]


def _dropped_k_bias(model):
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.zero_()


BUGS = {
    "one RL step stale": ("llama", {}, _stale),
    "two kv heads swapped": ("llama", {}, _swapped_kv_heads),
    "two FFN columns swapped": ("llama", {}, _swapped_ffn_columns),
    "k bias dropped": ("qwen2", {}, _dropped_k_bias),
}


@pytest.mark.parametrize("bug", [*BUGS, "rope scaling dropped"])
def test_real_bugs_exceed_the_bound_many_times(bug):
    """On the suite's model sizes, each bug moves log-probs by more than 10x the bound, in max and in mean."""
    if bug == "rope scaling dropped":
        model = _llama(0, rope_scaling=ROPE, rope_theta=500000.0)
        broken = _llama(0, rope_theta=500000.0)
        broken.load_state_dict(model.state_dict())
    else:
        family, change, apply = BUGS[bug]
        model = _llama(0, family, **change)
        broken = copy.deepcopy(model)
        apply(broken)
    rows, zmax = _first_steps(model)
    bound = parity.logprob_bound(zmax, LENGTH)
    gap = parity.Gap.between(_first_steps(broken)[0], rows)
    print(f"\n[{bug}] max {gap.max:.1e} ({gap.max / bound.max:.0f}x the bound), "
          f"mean {gap.mean:.1e} ({gap.mean / bound.mean:.0f}x)")
    assert gap.max > 10 * bound.max and gap.mean > 10 * bound.mean
    with pytest.raises(parity.ParityError, match="a mapping or a weight is wrong"):
        bound.check(gap, bug)


def test_the_suites_bound_sits_below_the_smallest_bug_seen():
    """A bug that moved one log-prob by 3e-4 (the smallest this project's checks met) fails the max test by
    at least 2x on the suite's models, and one that moved them all by 3e-5 fails the mean test."""
    rows, zmax = _first_steps(_llama(0))
    bound = parity.logprob_bound(zmax, LENGTH)
    assert 3e-4 > 2 * bound.max and 3e-5 > 2 * bound.mean, bound


def test_the_rule_scales_with_logit_magnitude_and_reduction_length():
    base = parity.logprob_bound(5.0, 1000)
    assert parity.logprob_bound(10.0, 1000).max == pytest.approx(2 * base.max)
    assert parity.logprob_bound(5.0, 4000).max == pytest.approx(2 * base.max)
    assert base.max == pytest.approx(2 * parity.SINGLE_MAX * 2**-24 * 5.0 * math.sqrt(1000))
    assert base.mean == pytest.approx(base.max * parity.SINGLE_MEAN / parity.SINGLE_MAX)


@pytest.mark.parametrize(
    "a,b,needle",
    [([1.0, 2.0], [1.0], "cannot compare 2 values with 1"),
     ([1.0, float("nan")], [1.0, 2.0], "1 of 2 log-probabilities are not finite"),
     ([], [], "cannot compare 0 values with 0")],
)
def test_gaps_that_cannot_be_measured_are_refused(a, b, needle):
    with pytest.raises(parity.ParityError, match=needle):
        parity.Gap.between(a, b)


@pytest.mark.parametrize("z", [0.0, float("inf"), float("nan"), -1.0])
def test_a_bound_needs_a_logit_scale(z):
    with pytest.raises(parity.ParityError, match="largest \\|logit\\|"):
        parity.logprob_bound(z, 100)
