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

Writes ``report.json`` and ``rl.png`` into ``--out`` and prints a table. ``--moe``: an MoE policy at expert
parallelism, its step with routing replay (``--routing-replay off|on|both``), in :mod:`parallel_bridge.cli.rl_moe`.
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
from parallel_bridge.cli import rl_moe, rl_report
from parallel_bridge.cli.demo import build_model
from parallel_bridge.cli.rl_task import (
    LIMIT,
    MODEL,
    Drawn,
    greedy_accuracy,
    max_abs_logit,
    pairs,
    reinforce,
    sample,
    serve_logprobs,
    shared,
    shared_tokenizer,
    token_logprobs,
    warm_up,
)
from parallel_bridge.numerics.machine import machine_kernels
from parallel_bridge.parallel.launch import context_from_torchrun

logger = logging.getLogger("parallel_bridge.cli.rl")


def engine(out: Path, tokenizer_dir: Path, serve_tp: int, spec=MODEL, routes: bool = False, dtype: str = "float32"):
    """The rollout engine (a ``with`` scope): random weights until the first push, float32 checked;
    ``routes``: its workers can capture the experts they route to."""
    from vllm.config import WeightTransferConfig

    from parallel_bridge.adapters import vllm_numerics, vllm_routing
    from parallel_bridge.serving.engines import llm_engine
    from parallel_bridge.sync import BACKEND

    folder = out / "engine"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(spec.to_hf(), indent=2))
    return llm_engine(
        model=str(folder),
        tokenizer=str(tokenizer_dir),
        load_format="dummy",  # random until the first push fills it
        dtype=dtype,
        max_model_len=spec.max_position_embeddings,
        enforce_eager=True,
        tensor_parallel_size=serve_tp,
        seed=0,
        weight_transfer_config=WeightTransferConfig(backend=BACKEND),
        worker_extension_cls=vllm_routing.EXTENSION if routes else vllm_numerics.EXTENSION,
    )


@torch.no_grad()
def measure(ctx: ParallelContext, model, llm, tokenizer, held, drawn: Drawn) -> dict:
    """Right after a push: the train/serve gap on the sampled tokens against the parity rule's bound, and
    held-out greedy accuracy through the engine (rank 0's; the forward passes are collective)."""
    from parallel_bridge.numerics import parity

    seqs, starts = drawn.seqs, drawn.starts
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


def rl_step(args, ctx: ParallelContext, model, optim, llm, tokenizer, batch, step: int) -> tuple[Drawn, dict]:
    """Sample on rank 0, share the samples, one REINFORCE update: (the samples, the row's fields so far)."""
    drawn = shared(llm, lambda: sample(llm, tokenizer, batch, args.samples, args.seed * 100003 + step))
    logp, mask = token_logprobs(model, drawn.seqs, drawn.starts)
    reinforce(model, optim, drawn, logp, mask)
    return drawn, {"reward": sum(drawn.rewards) / len(drawn.rewards)}


def rl_loop(args, ctx: ParallelContext, model, sync, llm, tokenizer, train_pairs, held, step_fn=rl_step,
            after_push=measure, label: str = "rl") -> list[dict]:
    """``args.steps`` RL steps (``step_fn``), each followed by a push and ``after_push``; one row per step."""
    from tqdm import tqdm

    prompts_rng = random.Random(args.seed)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows: list[dict] = []
    bar = tqdm(range(1, args.steps + 1), desc=f"{label:>8}", disable=llm is None, ncols=80, mininterval=1.0)
    for step in bar:
        batch = [prompts_rng.choice(train_pairs) for _ in range(args.prompts_per_step)]
        start = time.perf_counter()
        drawn, fields = step_fn(args, ctx, model, optim, llm, tokenizer, batch, step)
        step_s = time.perf_counter() - start
        report = sync.push()
        row = {"step": step, **fields, **after_push(ctx, model, llm, tokenizer, held, drawn)}
        if llm is not None:
            row.update(step_s=step_s, push_s=report.seconds, push_bytes=report.total_sent)
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['heldout_acc']:.2f}", refresh=False)
        rows.append(row)
    return rows


def one_run(args, ctx, model, sync, llm, tokenizer, data, mode: str | None) -> dict:
    """A push of the current weights, then the RL loop (dense, or MoE with routing replay ``mode``)."""
    train_pairs, held = data
    first = sync.push()
    start_acc = greedy_accuracy(llm, tokenizer, held) if llm is not None else None
    if llm is not None:
        what = "[3/3] " if mode is None else f"      routing replay {mode}: "
        print(f"{what}{args.steps} RL steps: {args.prompts_per_step} prompts x {args.samples} samples")
    loop = {} if mode is None else {"step_fn": rl_moe.step_fn(mode), "after_push": rl_moe.after_push,
                                    "label": f"replay {mode}"}
    start = time.perf_counter()
    rows = rl_loop(args, ctx, model, sync, llm, tokenizer, train_pairs, held, **loop)
    return {
        "first_push_s": first.seconds,
        "heldout_acc_start": start_acc,
        "heldout_acc_end": rows[-1]["heldout_acc"] if rows and llm is not None else start_acc,
        "rl_seconds": time.perf_counter() - start,
        "steps": rows,
    }


def run(args, ctx: ParallelContext, out: Path) -> dict | None:
    from parallel_bridge.adapters import megatron
    from parallel_bridge.serving.engines import describe_engine
    from parallel_bridge.sync import WeightSync

    rank0, spec = ctx.rank == 0, rl_moe.MODEL if args.moe else MODEL
    tok_dir = out / "tokenizer"
    tokenizer = shared_tokenizer(ctx, tok_dir)
    data = pairs()
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        model = rl_moe.build(ctx, args.seed) if args.moe else build_model(ctx, MODEL, seed=args.seed)
        if rank0:
            print(f"[1/3] warm-up: {args.warmup} supervised steps at TP={ctx.tp} EP={ctx.ep} (stopped early on purpose)")
        losses = warm_up(model, tokenizer, data[0], args.warmup, args.seed)
        start_state = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        if rank0:
            print(f"[2/3] vLLM engine at TP={args.serve_tp}; weights pushed before each loop and after every step")
            (tok_dir / "config.json").write_text(json.dumps(spec.to_hf(), indent=2))
        rollout = engine(out, tok_dir, args.serve_tp, spec, args.moe, args.serve_dtype) if rank0 else None
        with rollout or contextlib.nullcontext() as llm:
            sync = WeightSync(ctx, model, llm, config=spec, vocab_size=len(tokenizer), timeout_s=120)
            if rank0:
                print(f"      {describe_engine(llm)}")
            if rank0 and args.moe:
                print(f"[3/3] RL with the MoE policy, routing replay {args.routing_replay}")
            runs = {}
            for mode in rl_moe.MODES[args.routing_replay] if args.moe else (None,):
                model.load_state_dict(start_state, strict=False)  # every loop from the same warm-up
                runs[mode] = one_run(args, ctx, model, sync, llm, tokenizer, data, mode)
            sync.close()
    if not rank0:
        return None
    common = {
        "task": f"a+b=c with a, b < {LIMIT}; {len(data[1])} held-out pairs never trained on",
        "algorithm": "REINFORCE with a group baseline (GRPO-style normalized advantages), one on-policy step",
        "policy": "moe" if args.moe else "dense",
        "train_tp": ctx.tp,
        "train_ep": ctx.ep,
        "serve_tp": args.serve_tp,
        "serve_dtype": args.serve_dtype,
        "seed": args.seed,
        "machine": machine_kernels(),
        "warmup_steps": args.warmup,
        "warmup_loss": [losses[0], losses[-1]] if losses else None,
    }
    if not args.moe:
        return {**common, **runs[None]}
    return {**common, "model": spec.to_hf(), "routing_replay": args.routing_replay, "runs": runs}


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
    parser.add_argument("--moe", action="store_true")
    parser.add_argument("--routing-replay", choices=sorted(rl_moe.MODES), default="off")
    parser.add_argument("--train-ep", type=int, default=1)
    parser.add_argument("--serve-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = context_from_torchrun(tp=world // args.train_ep, ep=args.train_ep, timeout_s=300)
    out = Path(args.out)
    report = run(args, ctx, out)
    code = 0
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        code = rl_report.show(report, out)
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
