"""How far two correct implementations of one model may disagree: the parity rule of the tests and demos.

Two fp32 implementations of the same math (megatron-core's unfused ops, vLLM's kernels, transformers, on
AVX2 or AVX-512 kernels) sum in different orders, so their log-probabilities differ by rounding alone. The
rule bounds that difference from the numbers of the model, not from one machine's measurement:

* Every reduction a forward performs rounds at the unit roundoff ``u`` (2^-24 in fp32); errors of
  independent roundings add like a random walk, so a sum of ``n`` terms is off by about ``u * sqrt(n)``
  relative to its terms' magnitude (Higham and Mary's probabilistic bound). Along the residual path a
  token's logits pass ``reduction_length`` such terms in all (per layer: QKV, scores, the weighted sum
  of values, the projection, both MLP matmuls; then the output layer and the log-softmax's sum over the
  vocabulary), and an error of the hidden state reaches the logits scaled by their magnitude.
* So one implementation's log-probabilities are off the exact ones by about ``u * Z * sqrt(K)``, with
  ``Z`` the largest |logit| and ``K`` the reduction length. ``benchmarks/parity_rule.py`` measures that
  error (fp32 against fp64, tiny Llamas of every size the suite uses and beyond): the maximum over
  every log-probability stayed below ``SINGLE_MAX * u * Z * sqrt(K)`` and the mean below
  ``SINGLE_MEAN * u * Z * sqrt(K)``.
* Two implementations are each that close to the exact values, so they are within twice it of each
  other (the triangle inequality): the bound is ``2 * SINGLE_MAX * u * Z * sqrt(K)`` for the maximum
  and ``2 * SINGLE_MEAN * ...`` for the mean, on any CPU, whatever order its kernels sum in.

A bug is not rounding: a dropped bias, a stale or swapped weight, a wrong rope scaling moved
log-probabilities by 3e-4 or more in this project's checks, and on the suite's models the bound stays
several times below that (``tests/test_parity_rule.py`` asserts both).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch

from parallel_bridge.errors import BridgeError

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
"""Half the distance from 1 to the next number, per dtype (round to nearest)."""
SINGLE_MAX = 3.5
"""One fp32 implementation's largest |log-prob error| in units of ``u * Z * sqrt(K)``: the measured ceiling
(``benchmarks/results/parity_rule.json``), rounded up."""
SINGLE_MEAN = 0.3
"""One implementation's mean |log-prob error| in the same units: the measured ceiling, rounded up."""


class ParityError(BridgeError, AssertionError):
    """Two implementations disagree by more than rounding can explain; the message gives both numbers."""


def reduction_length(
    *, hidden: int, ffn: int, layers: int, vocab: int, heads: int, head_dim: int, seq_len: int
) -> int:
    """The number of terms a token's logits are summed over along the residual path (see the module)."""
    per_layer = hidden + head_dim + seq_len + heads * head_dim + hidden + ffn
    return layers * per_layer + hidden + vocab


def reduction_length_of(cfg: Any, seq_len: int) -> int:
    """:func:`reduction_length` of a model config (Megatron names: ``num_layers``, ``hidden_size``,
    ``ffn_hidden_size``, ``num_attention_heads``, ``head_dim``, ``padded_vocab_size`` or ``vocab_size``; an MoE
    layer sums ``moe_router_topk`` experts of ``expert_ffn`` columns each)."""
    ffn = getattr(cfg, "expert_ffn", cfg.ffn_hidden_size) * (getattr(cfg, "moe_router_topk", None) or 1)
    return reduction_length(
        hidden=cfg.hidden_size,
        ffn=ffn,
        layers=cfg.num_layers,
        vocab=getattr(cfg, "padded_vocab_size", None) or cfg.vocab_size,
        heads=cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        seq_len=seq_len,
    )


@dataclasses.dataclass(frozen=True)
class Gap:
    """The element-wise |a - b| of two sets of log-probabilities: largest, mean, how many."""

    max: float
    mean: float
    count: int

    @classmethod
    def between(cls, a: Any, b: Any) -> Gap:
        """The gap of two equally shaped sets of numbers: tensors, or (nested) lists of numbers or tensors."""
        x, y = _flat(a), _flat(b)
        if x.shape != y.shape or x.numel() == 0:
            raise ParityError(f"cannot compare {x.numel()} values with {y.numel()}")
        d = (x - y).abs()
        if not torch.isfinite(d).all():
            raise ParityError(f"{int((~torch.isfinite(d)).sum())} of {d.numel()} log-probabilities are not finite")
        return cls(max=d.max().item(), mean=d.mean().item(), count=d.numel())

    def worst(self, other: Gap) -> Gap:
        """The gap of both sets together."""
        count = self.count + other.count
        mean = (self.mean * self.count + other.mean * other.count) / count
        return Gap(max=max(self.max, other.max), mean=mean, count=count)


def _flat(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64).flatten()
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
        parts = [_flat(v) for v in values]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return torch.tensor([float(values)], dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class ParityBound:
    """The largest max and mean |log-prob gap| rounding allows between two fp32 implementations of a model."""

    max: float
    mean: float
    max_abs_logit: float
    reduction_length: int

    def holds(self, gap: Gap) -> bool:
        return gap.max <= self.max and gap.mean <= self.mean

    def check(self, gap: Gap, label: str) -> Gap:
        """Return ``gap`` if rounding explains it, else raise :class:`ParityError` naming both numbers."""
        if not self.holds(gap):
            raise ParityError(
                f"{label}: |d logprob| max {gap.max:.2e} / mean {gap.mean:.2e} over {gap.count} values exceeds "
                f"what fp32 rounding allows, max {self.max:.2e} / mean {self.mean:.2e} (|logit| <= "
                f"{self.max_abs_logit:.3g}, {self.reduction_length} terms per logit): a mapping or a weight is wrong"
            )
        return gap

    def describe(self) -> str:
        return f"max {self.max:.1e}, mean {self.mean:.1e}"


def logprob_bound(max_abs_logit: float, length: int, dtype: torch.dtype = torch.float32) -> ParityBound:
    """The rule: ``2 * SINGLE_MAX * u * Z * sqrt(K)`` for the max and ``2 * SINGLE_MEAN * ...`` for the
    mean, with ``Z = max_abs_logit`` (of the reference's logits, at the compared positions) and
    ``K = length`` (:func:`reduction_length`)."""
    if not math.isfinite(max_abs_logit) or max_abs_logit <= 0:
        raise ParityError(f"the reference's largest |logit| is {max_abs_logit}: nothing to scale a bound by")
    scale = UNIT_ROUNDOFF[dtype] * max_abs_logit * math.sqrt(length)
    return ParityBound(2 * SINGLE_MAX * scale, 2 * SINGLE_MEAN * scale, float(max_abs_logit), int(length))


def value_bound(max_abs: float, length: int, dtype: torch.dtype = torch.float32) -> float:
    """The same rule for plain values (a layer's output, a gradient): two fp32 evaluations of values of
    magnitude up to ``max_abs``, each reached through ``length`` summed terms, differ by at most
    ``2 * SINGLE_MAX * u * max_abs * sqrt(length)``."""
    return 2 * SINGLE_MAX * UNIT_ROUNDOFF[dtype] * float(max_abs) * math.sqrt(length)


def bound_for(cfg: Any, max_abs_logit: float, seq_len: int, dtype: torch.dtype = torch.float32) -> ParityBound:
    """:func:`logprob_bound` of a model config at sequences up to ``seq_len`` tokens."""
    return logprob_bound(max_abs_logit, reduction_length_of(cfg, seq_len), dtype)
