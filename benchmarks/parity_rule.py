"""Calibration of the parity rule (parallel_bridge/numerics/parity.py): one fp32 implementation's log-prob error.

For tiny Llamas (transformers' own class, random and briefly trained weights) of every size the suite
uses and beyond it (hidden 64-512, 1-8 layers, vocabularies 16-1024, init std 0.02-0.3, 4-64 tokens), the
fp32 forward's full log-softmax is compared with the same model in fp64, sequence by sequence. Each row
gives the error's max and mean over every position and token in units of ``u * Z * sqrt(K)`` (``u`` = 2^-24, ``Z``
the sequence's largest |logit| at any position, ``K`` the reduction length), the worst sequence's. The rule's ``SINGLE_MAX`` and ``SINGLE_MEAN`` must sit above every row's
ratio; the run fails if one does not. The machine's kernels (ATen's capability, oneDNN's ISA) go in the JSON.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from parallel_bridge.numerics import parity  # noqa: E402

BASE = dict(hidden=128, layers=2, vocab=128, std=0.2, seq=16, heads=4, kv=2)
VARIANTS = [
    {},
    {"hidden": 64}, {"hidden": 256}, {"hidden": 512, "std": 0.1},
    {"layers": 1}, {"layers": 4}, {"layers": 8},
    {"vocab": 16}, {"vocab": 1024},
    {"std": 0.02}, {"std": 0.1}, {"std": 0.3},
    {"seq": 4}, {"seq": 64},
    {"kv": 4}, {"kv": 1},
    {"trained": 150}, {"trained": 150, "vocab": 16}, {"trained": 150, "layers": 4},
]
SEEDS = 3


def _model(v: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=v["hidden"], intermediate_size=2 * v["hidden"], num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"], num_key_value_heads=v["kv"], vocab_size=v["vocab"],
        max_position_embeddings=128, initializer_range=v["std"], tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if v.get("trained"):
        _train(model, v, seed)
    return model.eval()


def _train(model, v: dict, seed: int) -> None:
    """A short fit of a periodic token pattern, so logits grow peaked as a trained model's do."""
    g = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    period = torch.randint(0, v["vocab"], (7,), generator=g)
    for _ in range(v["trained"]):
        start = torch.randint(0, 7, (16,), generator=g)
        ids = period[(start[:, None] + torch.arange(v["seq"] + 1)[None]) % 7]
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        optim.zero_grad()
        loss.backward()
        optim.step()


def measure(v: dict, seed: int) -> dict:
    model = _model(v, seed)
    ids = torch.randint(0, v["vocab"], (4, v["seq"]), generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        z32 = model(ids).logits.double()
        z64 = model.double()(ids).logits
    err = (torch.log_softmax(z32, -1) - torch.log_softmax(z64, -1)).abs().flatten(1)  # [sequences, positions x vocab]
    head_dim = v["hidden"] // v["heads"]
    k = parity.reduction_length(hidden=v["hidden"], ffn=2 * v["hidden"], layers=v["layers"], vocab=v["vocab"],
                                heads=v["heads"], head_dim=head_dim, seq_len=v["seq"])
    z = z64.abs().flatten(1).amax(-1)  # each sequence's largest |logit|, over its positions
    unit = parity.UNIT_ROUNDOFF[torch.float32] * z * math.sqrt(k)
    return {"max_err": err.max().item(), "mean_err": err.mean().item(), "Z": z.max().item(), "K": k,
            "max_ratio": (err.amax(-1) / unit).max().item(), "mean_ratio": (err.mean(-1) / unit).max().item()}


def kernels() -> dict:
    import os

    return {"aten_capability": torch.backends.cpu.get_cpu_capability(),
            "caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                     if k in os.environ}}


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    for change, seed in itertools.product(VARIANTS, range(SEEDS)):
        v = {**BASE, **change}
        r = measure(v, seed)
        rows.append({"variant": ",".join(f"{k}={x}" for k, x in change.items()) or "base", "seed": seed, **r})
    worst_max = max(r["max_ratio"] for r in rows)
    worst_mean = max(r["mean_ratio"] for r in rows)
    summary = {"worst_max_ratio": worst_max, "worst_mean_ratio": worst_mean,
               "SINGLE_MAX": parity.SINGLE_MAX, "SINGLE_MEAN": parity.SINGLE_MEAN, "kernels": kernels()}
    report("parity_rule", rows, summary)
    print(f"worst max ratio {worst_max:.3f} (rule {parity.SINGLE_MAX}); worst mean ratio {worst_mean:.3f} "
          f"(rule {parity.SINGLE_MEAN})")
    return 0 if worst_max <= parity.SINGLE_MAX and worst_mean <= parity.SINGLE_MEAN else 1


if __name__ == "__main__":
    raise SystemExit(main())
