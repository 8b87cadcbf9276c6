"""The task of ``parallel-bridge rl`` and its pieces, whatever the policy: sums of two numbers below 10
(``7+5=12``) with a fixed set of held-out pairs, sampling through vLLM, the trainer's log-probs of the same
tokens, rewards and group-normalized advantages, the REINFORCE update, the warm-up."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel_bridge import ParallelContext
from parallel_bridge.cli.demo import MODEL as DEMO_MODEL
from parallel_bridge.cli.demo import build_tokenizer, encode_batch

LIMIT = 10
MAX_NEW = 3
MODEL = DEMO_MODEL.replace(padded_vocab_size=DEMO_MODEL.vocab_size)
"""The demo's model without vocabulary padding: the policy's softmax is over exactly the 16 symbols
vLLM serves (padding rows would hold probability mass the engine never samples: a train/serve gap)."""


def pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs): every a+b with a, b < LIMIT; about 1 in 7 held out."""
    rng = random.Random(7)
    train, held = [], []
    for a in range(LIMIT):
        for b in range(LIMIT):
            (held if rng.random() < 1 / 7 else train).append((a, b))
    return train, held


def prompt_ids(tokenizer, a: int, b: int) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer.encode(f"{a}+{b}=")]


def answer_ids(tokenizer, a: int, b: int) -> list[int]:
    return [*tokenizer.encode(str(a + b)), tokenizer.eos_token_id]


def is_correct(tokenizer, tokens: list[int], a: int, b: int) -> bool:
    """The completion is exactly the sum's digits followed by end-of-sequence."""
    return list(tokens) == answer_ids(tokenizer, a, b)


def token_logprobs(model, seqs: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each sequence's tokens from ``start`` on, under the Megatron model
    (differentiable; vocabulary-parallel cross entropy): ([B, T] log-probs, [B, T] mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, start - 1 : len(s) - 1] = 1.0
    pos = torch.arange(width - 1).unsqueeze(0).expand(len(seqs), -1)
    loss = model(ids[:, :-1], pos, attention_mask=None, labels=ids[:, 1:])  # [B, T]: -log p(token)
    return -loss.float(), mask


def serve_logprobs(llm, seqs: list[list[int]], starts: list[int]) -> list[list[float]]:
    """The engine's log-probabilities of the same tokens (prompt_logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
    return [
        [o.prompt_logprobs[p][s[p]].logprob for p in range(start, len(s))]
        for o, s, start in zip(outs, seqs, starts)
    ]


def greedy_accuracy(llm, tokenizer, cases: list[tuple[int, int]]) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[tokenizer.eos_token_id])
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tokenizer, a, b)) for a, b in cases],
                        params, use_tqdm=False)
    return sum(is_correct(tokenizer, o.outputs[0].token_ids, a, b) for o, (a, b) in zip(outs, cases)) / len(cases)


@dataclasses.dataclass
class Drawn:
    """A step's samples: prompt+completion token ids, where each completion starts, its reward, its prompt's
    group, the engine's log-probability of each completion token when it sampled it, and (MoE, routes
    captured) the experts the engine routed each fed token to, ``[len(seq) - 1, layers, k]`` per sequence."""

    seqs: list[list[int]]
    starts: list[int]
    rewards: list[float]
    groups: list[int]
    served: list[list[float]]
    routes: list[Any] | None = None


def sample(llm, tokenizer, batch: list[tuple[int, int]], samples: int, seed: int) -> Drawn:
    """``samples`` completions per prompt (temperature 1, seeded per prompt), with their sampled log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    drawn = Drawn([], [], [], [], [])
    for g, (a, b) in enumerate(batch):
        params = SamplingParams(
            n=samples, temperature=1.0, max_tokens=MAX_NEW, seed=seed * 1000 + g, logprobs=0,
            stop_token_ids=[tokenizer.eos_token_id], detokenize=False,
        )
        prompt = prompt_ids(tokenizer, a, b)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        for c in out.outputs:
            drawn.seqs.append(prompt + list(c.token_ids))
            drawn.starts.append(len(prompt))
            drawn.rewards.append(1.0 if is_correct(tokenizer, c.token_ids, a, b) else 0.0)
            drawn.groups.append(g)
            drawn.served.append([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
    return drawn


def advantages(rewards: list[float], groups: list[int]) -> torch.Tensor:
    """Each reward minus its group's mean, over the group's standard deviation (0 for a flat group)."""
    r, g = torch.tensor(rewards), torch.tensor(groups)
    adv = torch.zeros_like(r)
    for k in g.unique():
        sel = g == k
        std = r[sel].std(unbiased=False)
        adv[sel] = (r[sel] - r[sel].mean()) / (std + 1e-6) if std > 0 else 0.0
    return adv


def warm_up(model, tokenizer, train_pairs, steps: int, seed: int) -> list[float]:
    """Supervised steps on packed ``<s>a+b=c</s>`` sentences of training pairs only."""
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    seq = MODEL.max_position_embeddings
    pos = torch.arange(seq).unsqueeze(0).expand(32, -1)
    losses = []
    for _ in range(steps):
        batch = encode_batch(tokenizer, rng, 32, seq, LIMIT, pairs=train_pairs)
        loss = model(batch[:, :-1], pos, attention_mask=None, labels=batch[:, 1:]).float().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def max_abs_logit(ctx: ParallelContext, model, seqs: list[list[int]]) -> float:
    """The largest |logit| the trainer computes over the sequences' real positions (every TP rank's
    vocabulary shard): the scale of the parity rule (:mod:`parallel_bridge.numerics.parity`)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    real = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        real[i, : len(s)] = True
    logits = model(ids, torch.arange(width).unsqueeze(0).expand(len(seqs), -1), attention_mask=None)
    local = logits.float().abs().amax(-1)[real].max().reshape(1)
    return float(ctx.comm("tp").all_gather(local).max())


def shared(llm, draw) -> Drawn:
    """Rank 0's ``draw()`` (it holds the engine) on every trainer rank."""
    box = [draw() if llm is not None else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reinforce(model, optim, drawn: Drawn, logp: torch.Tensor, mask: torch.Tensor, expert_scale: float = 1.0) -> None:
    """One REINFORCE update with group-normalized advantages from the completions' log-probs.
    ``expert_scale``: a factor on the experts' gradients (``1 / ep`` when every expert-parallel rank feeds the
    same batch: each expert then sees every token once per rank)."""
    from parallel_bridge.spec import moe

    adv = advantages(drawn.rewards, drawn.groups)
    loss = -((logp * mask).sum(1) * adv).sum() / mask.sum()
    optim.zero_grad()
    loss.backward()
    if expert_scale != 1.0:
        for name, p in model.named_parameters():
            if p.grad is not None and moe.is_expert(name):
                p.grad.mul_(expert_scale)
    optim.step()


def shared_tokenizer(ctx: ParallelContext, folder: Path):
    """The demo's tokenizer, built by rank 0 and read by the others."""
    tokenizer = build_tokenizer(folder) if ctx.rank == 0 else None
    dist.barrier()
    if ctx.rank != 0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) != MODEL.vocab_size:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} symbols, the model {MODEL.vocab_size}")
    return tokenizer
