"""Does a tensor-parallel degree split this model, and what does each rank keep: the one TP rule.

Attention, the Megatron adapter, the hybrid model and the checkpoint loaders all ask here, so a size
that one of them accepts is accepted by all, with the same message when it is not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from parallel_bridge.errors import ConfigError
from parallel_bridge.parallel.layout import ceil_div

NAMES = {"heads": "num_attention_heads", "kv_heads": "num_query_groups", "ffn": "ffn_hidden_size", "vocab": "vocab_size"}
"""How sizes are named in messages: the model spec's fields (:class:`~parallel_bridge.spec.model.GPTConfig`)."""


class TPSplitError(ConfigError):
    """A tensor-parallel degree that does not split the model; the message names each size at fault."""


@dataclasses.dataclass(frozen=True)
class TPSplit:
    """What one tensor-parallel rank holds of a model."""

    tp: int
    heads: int
    """Query heads per rank."""
    kv_heads: int
    """Key/value heads per rank (1 when they are replicated)."""
    kv_replicas: int
    """Ranks holding the same kv head: 1 when kv heads are split, tp / num_kv_heads when replicated."""
    ffn: int | None
    """FFN (intermediate) columns per rank."""
    vocab: int | None
    """Vocabulary rows per rank, padding included."""

    @property
    def padded_vocab(self) -> int | None:
        """The vocabulary padded to a multiple of tp (what the ranks hold together)."""
        return None if self.vocab is None else self.vocab * self.tp


def split_for_tp(
    tp: int,
    heads: int,
    kv_heads: int | None = None,
    ffn: int | None = None,
    vocab: int | None = None,
    *,
    replicate_kv: bool = True,
    pad_vocab: bool = True,
    ffn_name: str = NAMES["ffn"],
) -> TPSplit:
    """The split of a model with these totals over ``tp`` ranks, or :class:`TPSplitError`.

    ``replicate_kv``: fewer kv heads than ranks are replicated (vLLM serving does; Megatron training
    does not). ``pad_vocab``: the vocabulary is padded up to a multiple of tp (else tp must divide it).
    ``ffn_name``: the FFN size's name in messages (an MoE model's experts: ``moe_ffn_hidden_size``).
    """
    names = {**NAMES, "ffn": ffn_name}
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TPSplitError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    kv = heads if kv_heads is None else kv_heads
    if heads % kv:
        raise TPSplitError(f"{NAMES['kv_heads']}={kv} does not divide {NAMES['heads']}={heads}")
    replicated = replicate_kv and kv < tp
    # attention first, then the rest: each message names every size of its stage that tp does not divide
    for sizes in (
        {"heads": heads, "kv_heads": None if replicated else kv},
        {"ffn": ffn, "vocab": None if pad_vocab else vocab},
    ):
        wrong = [f"{names[k]}={v}" for k, v in sizes.items() if v is not None and v % tp]
        if wrong:
            raise TPSplitError(f"tensor-parallel size {tp} does not divide {', '.join(wrong)}")
    if replicated and tp % kv:
        raise TPSplitError(
            f"{NAMES['kv_heads']}={kv} is below tensor-parallel size {tp} and does not divide it, "
            "so kv heads cannot be replicated evenly"
        )
    return TPSplit(
        tp=tp,
        heads=heads // tp,
        kv_heads=max(kv // tp, 1),
        kv_replicas=max(tp // kv, 1),
        ffn=None if ffn is None else ffn // tp,
        vocab=None if vocab is None else ceil_div(vocab, tp),
    )


def heads_per_rank(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) on each TP rank, kv heads replicated when fewer than tp."""
    split = split_for_tp(tp, num_heads, num_kv_heads)
    return split.heads, split.kv_heads


def serving_split(spec: Any, tp: int) -> TPSplit:
    """What each of ``tp`` vLLM serving ranks keeps of a model (kv heads replicated when fewer than tp)."""
    return split_for_tp(tp, spec.num_attention_heads, spec.num_query_groups, spec.expert_ffn, ffn_name=ffn_name(spec))


def ffn_name(spec: Any) -> str:
    """What the FFN size tensor parallelism splits is called: an MoE model's experts' or the dense MLP's."""
    return "moe_ffn_hidden_size" if getattr(spec, "num_moe_experts", None) else NAMES["ffn"]


def experts_per_rank(num_experts: int | None, ep: int) -> int:
    """Experts each of ``ep`` expert-parallel ranks holds (megatron-core and vLLM split them evenly, in order:
    rank r holds experts ``[r * n, (r + 1) * n)``), or :class:`TPSplitError` naming both numbers."""
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise TPSplitError(f"expert-parallel size must be a positive integer, got {ep!r}")
    if not num_experts:
        if ep > 1:
            raise TPSplitError(f"expert-parallel size {ep} needs experts, but the model is dense (no num_moe_experts)")
        return 0
    if num_experts % ep:
        raise TPSplitError(f"expert-parallel size {ep} does not divide num_moe_experts={num_experts}")
    return num_experts // ep
