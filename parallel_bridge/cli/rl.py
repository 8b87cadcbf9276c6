"""``parallel-bridge rl`` (or ``demo --rl``): vLLM samples, Megatron trains, weights sync every step.

Run under torchrun (TP = processes) by the CLI. On sums of two numbers below 10
(``7+5=12``), with a fixed set of held-out pairs never trained on:

1. warm-up: a short supervised run of the demo's megatron-core GPT (stopped early);
2. a vLLM engine in trainer rank 0's process (its engine core and TP workers in
   their own processes) serves the policy, started from random weights and filled
   by the first weight push;
3. each step: vLLM samples ``--samples`` completions for each of ``--prompts-per-step``
   prompts (temperature 1, seeded); reward 1 for the exact answer, else 0; a
   REINFORCE update with a group baseline (GRPO-style advantages: each completion's
   reward minus its prompt group's mean, over the group's standard deviation; one
   on-policy step per batch, so no ratio clipping is needed; Adam at a small rate:
   a fresh Adam moves every weight by about the rate from the first step) on the
   Megatron model at TP=N; then ``WeightSync.push()`` into the running engine;
4. right after the push: the train/serve gap (max and mean |trainer log-prob -
   engine log-prob| over the sampled completion tokens, the engine's from
   ``prompt_logprobs``), held-out greedy accuracy through the engine, push seconds
   and bytes.

Writes ``report.json`` and ``rl.png`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel_bridge import ParallelContext
from parallel_bridge.cli import rl_report
from parallel_bridge.cli.demo import MODEL as DEMO_MODEL
from parallel_bridge.cli.demo import build_model, build_tokenizer, encode_batch
from parallel_bridge.numerics.machine import machine_kernels
from parallel_bridge.parallel.launch import context_from_torchrun

logger = logging.getLogger("parallel_bridge.cli.rl")

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


def sample(llm, tokenizer, batch: list[tuple[int, int]], samples: int, seed: int):
    """``samples`` completions per prompt: (sequences, completion starts, rewards, groups)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seqs, starts, rewards, groups = [], [], [], []
    for g, (a, b) in enumerate(batch):
        params = SamplingParams(
            n=samples, temperature=1.0, max_tokens=MAX_NEW, seed=seed * 1000 + g,
            stop_token_ids=[tokenizer.eos_token_id], detokenize=False,
        )
        prompt = prompt_ids(tokenizer, a, b)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        for c in out.outputs:
            seqs.append(prompt + list(c.token_ids))
            starts.append(len(prompt))
            rewards.append(1.0 if is_correct(tokenizer, c.token_ids, a, b) else 0.0)
            groups.append(g)
    return seqs, starts, rewards, groups


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


def engine(out: Path, tokenizer_dir: Path, serve_tp: int):
    """The rollout engine (a ``with`` scope): random weights until the first push, float32 checked."""
    from vllm.config import WeightTransferConfig

    from parallel_bridge.serving.engines import llm_engine
    from parallel_bridge.sync import BACKEND

    folder = out / "engine"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL.to_hf(), indent=2))
    return llm_engine(
        model=str(folder),
        tokenizer=str(tokenizer_dir),
        load_format="dummy",  # random until the first push fills it
        dtype="float32",
        max_model_len=MODEL.max_position_embeddings,
        enforce_eager=True,
        tensor_parallel_size=serve_tp,
        seed=0,
        weight_transfer_config=WeightTransferConfig(backend=BACKEND),
    )


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


@torch.no_grad()
def measure(ctx: ParallelContext, model, llm, tokenizer, held, seqs, starts) -> dict:
    """Right after a push: the train/serve gap on the sampled tokens against the parity rule's bound, and
    held-out greedy accuracy through the engine (rank 0's; the forward passes are collective)."""
    from parallel_bridge.numerics import parity
    logp, _ = token_logprobs(model, seqs, starts)
    zmax = max_abs_logit(ctx, model, seqs)
    if llm is None:
        return {}
    served = serve_logprobs(llm, seqs, starts)
    trained = [[float(logp[i, starts[i] - 1 + j]) for j in range(len(lps))] for i, lps in enumerate(served)]
    gap = parity.Gap.between(trained, served)
    bound = parity.bound_for(MODEL, zmax, MODEL.max_position_embeddings)
    flat = [(a, b) for t, s in zip(trained, served) for a, b in zip(t, s)]
    worst = max(flat, key=lambda ab: abs(ab[0] - ab[1]))
    return {
        "worst_token_logprob": worst[0],
        "heldout_acc": greedy_accuracy(llm, tokenizer, held),
        "mismatch_max": gap.max,
        "mismatch_mean": gap.mean,
        "max_abs_logit": zmax,
        "bound_max": bound.max,
        "bound_mean": bound.mean,
        "weights_version": int(llm.get_weight_version()),
    }


def rl_step(args, ctx: ParallelContext, model, optim, llm, tokenizer, batch, step: int):
    """Sample on rank 0, share the samples, one REINFORCE update: (sequences, starts, mean reward)."""
    drawn = sample(llm, tokenizer, batch, args.samples, args.seed * 100003 + step) if llm is not None else None
    box = [drawn]
    dist.broadcast_object_list(box, src=0)
    seqs, starts, rewards, groups = box[0]
    adv = advantages(rewards, groups)
    logp, mask = token_logprobs(model, seqs, starts)
    loss = -((logp * mask).sum(1) * adv).sum() / mask.sum()
    optim.zero_grad()
    loss.backward()
    optim.step()
    return seqs, starts, sum(rewards) / len(rewards)


def rl_loop(args, ctx: ParallelContext, model, sync, llm, tokenizer, train_pairs, held) -> list[dict]:
    """``args.steps`` RL steps, each followed by a push and :func:`measure`; one row per step."""
    from tqdm import tqdm

    prompts_rng = random.Random(args.seed)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows: list[dict] = []
    bar = tqdm(range(1, args.steps + 1), desc="      rl", disable=llm is None, ncols=80, mininterval=1.0)
    for step in bar:
        batch = [prompts_rng.choice(train_pairs) for _ in range(args.prompts_per_step)]
        seqs, starts, reward = rl_step(args, ctx, model, optim, llm, tokenizer, batch, step)
        report = sync.push()
        row = {"step": step, "reward": reward, **measure(ctx, model, llm, tokenizer, held, seqs, starts)}
        if llm is not None:
            row.update(push_s=report.seconds, push_bytes=report.total_sent)
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['heldout_acc']:.2f}", refresh=False)
        rows.append(row)
    return rows


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


def run(args, ctx: ParallelContext, out: Path) -> dict | None:
    from parallel_bridge.adapters import megatron
    from parallel_bridge.serving.engines import describe_engine
    from parallel_bridge.sync import WeightSync

    rank0 = ctx.rank == 0
    tok_dir = out / "tokenizer"
    tokenizer = shared_tokenizer(ctx, tok_dir)
    train_pairs, held = pairs()
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        model = build_model(ctx, MODEL, seed=args.seed)
        if rank0:
            print(f"[1/3] warm-up: {args.warmup} supervised steps at TP={ctx.tp} (stopped early on purpose)")
        losses = warm_up(model, tokenizer, train_pairs, args.warmup, args.seed)
        if rank0:
            print(f"[2/3] vLLM engine at TP={args.serve_tp}; first weight push")
            (tok_dir / "config.json").write_text(json.dumps(MODEL.to_hf(), indent=2))
        with engine(out, tok_dir, args.serve_tp) if rank0 else contextlib.nullcontext() as llm:
            sync = WeightSync(ctx, model, llm, vocab_size=len(tokenizer), timeout_s=120)
            first = sync.push()
            start_acc = greedy_accuracy(llm, tokenizer, held) if rank0 else None
            if rank0:
                print(f"      {describe_engine(llm)}")
                print(f"[3/3] {args.steps} RL steps: {args.prompts_per_step} prompts x {args.samples} samples")
            start = time.perf_counter()
            rows = rl_loop(args, ctx, model, sync, llm, tokenizer, train_pairs, held)
            rl_s = time.perf_counter() - start
            sync.close()
    if not rank0:
        return None
    return {
        "task": f"a+b=c with a, b < {LIMIT}; {len(held)} held-out pairs never trained on",
        "algorithm": "REINFORCE with a group baseline (GRPO-style normalized advantages), one on-policy step",
        "train_tp": ctx.tp,
        "serve_tp": args.serve_tp,
        "seed": args.seed,
        "machine": machine_kernels(),
        "warmup_steps": args.warmup,
        "warmup_loss": [losses[0], losses[-1]] if losses else None,
        "first_push_s": first.seconds,
        "heldout_acc_start": start_acc,
        "heldout_acc_end": rows[-1]["heldout_acc"] if rows else start_acc,
        "rl_seconds": rl_s,
        "steps": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parallel_bridge.cli.rl", description=__doc__)
    parser.add_argument("--out", default="out/rl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--serve-tp", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = context_from_torchrun(tp=world, timeout_s=300)
    out = Path(args.out)
    report = run(args, ctx, out)
    code = 0
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        rl_report.plot(report, out / "rl.png")
        rl_report.print_table(report)
        rl_report.summarize(report, out)
        bad = rl_report.beyond_rounding(report)
        if bad:
            logger.error("steps %s: the train/serve gap exceeds what fp32 rounding allows (the weights in the engine "
                         "are not the trainer's)", [r["step"] for r in bad])
            code = 1
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
