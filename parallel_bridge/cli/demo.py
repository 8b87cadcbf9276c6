"""The end-to-end demo behind ``parallel-bridge demo``: train -> Megatron checkpoint -> vLLM.

1. Train (under torchrun, TP=N, gloo): a small megatron-core GPT built through the
   Megatron adapter learns arithmetic sentences the demo generates (``7+5=12``),
   with a character tokenizer it builds and saves in Hugging Face format.
2. Save with megatron-core's own ``dist_checkpointing`` (torch_dist format).
3. Serve the checkpoint with vLLM through the ``megatron`` load format at another
   TP, and generate answers for the same prompts.
4. Report the answers, how many are right, and whether training-mode and served
   greedy tokens and logprobs agree.
Everything lands in one output folder: ``tokenizer/``, ``checkpoint/``, ``report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel_bridge import ParallelContext
from parallel_bridge.numerics.machine import machine_kernels
from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.spec.model import GPTConfig

logger = logging.getLogger("parallel_bridge.cli.demo")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+=")


MODEL = GPTConfig(
    num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
    vocab_size=len(SPECIALS) + len(CHARS), padded_vocab_size=32, max_position_embeddings=16,
)
"""The demo's model: head_dim 32 (a size vLLM's CPU attention supports); its 16 symbols padded to 32 rows so
that any TP up to 32 divides them."""


def build_tokenizer(folder: Path):
    """A character-level tokenizer over the demo's symbols, saved in Hugging Face format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def make_sum(rng: random.Random, limit: int) -> tuple[str, str]:
    """A prompt ``a+b=`` and its answer ``a+b``."""
    a, b = rng.randrange(limit), rng.randrange(limit)
    return f"{a}+{b}=", str(a + b)


def encode_batch(
    tokenizer, rng: random.Random, batch: int, seq: int, limit: int, pairs: list[tuple[int, int]] | None = None
) -> torch.Tensor:
    """``batch`` rows of ``<s>a+b=c</s>`` sentences, packed and cut to ``seq + 1`` tokens; operands
    below ``limit``, or drawn from ``pairs`` when given."""
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq + 1:
            if pairs is None:
                prompt, answer = make_sum(rng, limit)
            else:
                a, b = rng.choice(pairs)
                prompt, answer = f"{a}+{b}=", str(a + b)
            ids += [tokenizer.bos_token_id, *tokenizer.encode(prompt + answer), tokenizer.eos_token_id]
        rows.append(ids[: seq + 1])
    return torch.tensor(rows)


@torch.no_grad()
def greedy_complete(ctx, model, tokenizer, prompts: list[str], max_new: int, vocab: int):
    """Greedy continuations with the training-mode forward (no KV cache), each step's logprob, and the
    largest |logit| any step saw (the scale of the parity rule, :mod:`parallel_bridge.numerics.parity`)."""

    outs, logprobs, zmax = [], [], 0.0
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt)]
        new, lps = [], []
        for _ in range(max_new):
            x = torch.tensor([ids])
            pos = torch.arange(x.shape[1]).unsqueeze(0)
            logits = ctx.comm("tp").all_gather(model(x, pos, attention_mask=None))[0, :, :vocab]
            zmax = max(zmax, logits.abs().max().item())
            lp = torch.log_softmax(logits[-1].float(), dim=-1)
            nxt = int(lp.argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            lps.append(float(lp[nxt]))
            ids.append(nxt)
        outs.append(tokenizer.decode(new))
        logprobs.append(lps)
    return outs, logprobs, zmax


def build_model(ctx: ParallelContext, spec: GPTConfig, seed: int):
    """The megatron-core GPTModel of ``spec`` on the context's groups, seeded; call it inside ``cpu_compat``
    and ``bind_parallel_state``."""
    from parallel_bridge.adapters import megatron

    megatron.model_parallel_manual_seed(ctx, seed)
    return megatron.gpt_model(ctx, spec, init_method_std=0.02)[1]


def train(args, ctx: ParallelContext, out: Path, rank0: bool) -> dict:
    from tqdm import tqdm

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist

    tokenizer = build_tokenizer(out / "tokenizer") if rank0 else None
    dist.barrier()
    if not rank0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    rng = random.Random(0)  # the same batches on every TP rank
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        model = build_model(ctx, MODEL, seed=1234)
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        seq = MODEL.max_position_embeddings
        pos = torch.arange(seq).unsqueeze(0).expand(args.batch, -1)
        losses = []
        bar = tqdm(range(args.steps), desc="      train", disable=not rank0, ncols=80, mininterval=2.0)
        start = time.perf_counter()
        for _ in bar:
            batch = encode_batch(tokenizer, rng, args.batch, seq, LIMIT)
            loss = model(batch[:, :-1], pos, attention_mask=None, labels=batch[:, 1:]).float().mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_s = time.perf_counter() - start
        if rank0:
            print(f"[2/4] saving with megatron-core's dist_checkpointing -> {out / 'checkpoint'}")
        save_torch_dist(ctx, model, out / "checkpoint", args.steps, MODEL)
        if rank0:  # a config.json makes the tokenizer folder one vLLM and transformers read without complaint
            (out / "tokenizer" / "config.json").write_text(json.dumps(MODEL.to_hf(), indent=2))
        model.eval()
        cases = eval_cases(args.eval)
        outs, lps, zmax = greedy_complete(ctx, model, tokenizer, [p for p, _ in cases], MAX_NEW, len(tokenizer))
    return {
        "model": dataclasses.asdict(MODEL),
        "train_tp": ctx.tp,
        "first_loss": sum(losses[:10]) / min(10, len(losses)),
        "last_loss": sum(losses[-10:]) / min(10, len(losses)),
        "train_seconds": train_s,
        "steps": args.steps,
        "max_abs_logit": zmax,
        "cases": [
            {"prompt": p, "answer": a, "train_output": o, "train_logprobs": lp}
            for (p, a), o, lp in zip(cases, outs, lps)
        ],
    }


LIMIT = 10
MAX_NEW = 4


def eval_cases(n: int) -> list[tuple[str, str]]:
    """The sums the demo asks, the same in training and serving."""
    rng = random.Random(1)
    return [make_sum(rng, LIMIT) for _ in range(n)]


def serve_and_report(out: Path, serve_tp: int) -> dict:
    """Serve ``out/checkpoint`` with vLLM (megatron load format) and compare with training's answers: greedy
    tokens equal, logprobs within the parity rule's bound (:mod:`parallel_bridge.numerics.parity`)."""
    from transformers import AutoTokenizer

    report = json.loads((out / "report.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    print(
        f"[3/4] serving {out / 'checkpoint'} with vLLM at TP={serve_tp} (load format megatron; "
        f"trained at TP={report['train_tp']})"
    )
    start = time.perf_counter()
    outputs, engine_line = serve(out, serve_tp, report, tokenizer)
    report["serve_seconds"] = time.perf_counter() - start
    report["serve_tp"] = serve_tp
    report["serving"] = engine_line
    report["machine"] = machine_kernels()
    score(report, outputs, tokenizer)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    return report


def serve(out: Path, serve_tp: int, report: dict, tokenizer):
    """vLLM's greedy outputs for the report's cases, and the line naming the engine's kernels."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from parallel_bridge.serving.engines import (
        cpu_thread_binding,
        describe_engine,
        environment_defaults,
        in_process_engine,
        llm_engine,
    )

    settings = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}  # small cache, readable report
    if serve_tp > 1:
        settings["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(serve_tp)
    with environment_defaults(settings), in_process_engine(serve_tp), llm_engine(
        model=str(out / "checkpoint"),
        load_format="megatron",
        config_format="megatron",
        tokenizer=str(out / "tokenizer"),
        tensor_parallel_size=serve_tp,
        dtype="float32",
        max_model_len=report["model"]["max_position_embeddings"],
        enforce_eager=True,
    ) as llm:
        line = describe_engine(llm)
        prompts = [
            TokensPrompt(prompt_token_ids=[tokenizer.bos_token_id, *tokenizer.encode(c["prompt"])])
            for c in report["cases"]
        ]
        params = SamplingParams(
            max_tokens=MAX_NEW, temperature=0, logprobs=0, stop_token_ids=[tokenizer.eos_token_id]
        )
        return llm.generate(prompts, params, use_tqdm=False), line


def score(report: dict, outputs, tokenizer) -> None:
    """Served answers into the report's cases; right answers, equal greedy tokens, and the logprob gap
    (cases with equal tokens) against the bound fp32 rounding allows."""
    from parallel_bridge.numerics import parity
    trained, served, same = [], [], 0
    for case, o in zip(report["cases"], outputs):
        ids = [t for t in o.outputs[0].token_ids if t != tokenizer.eos_token_id]
        case["served_output"] = tokenizer.decode(ids)
        case["served_logprobs"] = [o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(ids)]
        case["tokens_equal"] = case["served_output"] == case["train_output"]
        same += case["tokens_equal"]
        if case["tokens_equal"]:
            trained.append(case["train_logprobs"])
            served.append(case["served_logprobs"])
    gap = parity.Gap.between(served, trained) if any(served) else parity.Gap(0.0, 0.0, 0)
    bound = parity.bound_for(MODEL, report["max_abs_logit"], MODEL.max_position_embeddings)
    report.update(
        correct=sum(c["served_output"] == c["answer"] for c in report["cases"]),
        greedy_equal=same,
        max_abs_logprob_diff=gap.max,
        mean_abs_logprob_diff=gap.mean,
        parity_bound={"max": bound.max, "mean": bound.mean, "max_abs_logit": bound.max_abs_logit,
                      "reduction_length": bound.reduction_length},
        within_rounding=bound.holds(gap),
    )


def print_report(report: dict, out: Path) -> None:
    n, bound = len(report["cases"]), report["parity_bound"]
    print(f"      {report['serving']}")
    print(
        f"[4/4] report ({report['correct']}/{n} served answers correct; greedy tokens equal "
        f"{report['greedy_equal']}/{n}; |d logprob| max {report['max_abs_logprob_diff']:.1e} / mean "
        f"{report['mean_abs_logprob_diff']:.1e}, fp32 rounding allows {bound['max']:.1e} / {bound['mean']:.1e})"
    )
    print(f"      {'prompt':<8}{'answer':<8}{'train':<8}{'served':<8}{'right':<7}{'same'}")
    for c in report["cases"]:
        print(
            f"      {c['prompt']:<8}{c['answer']:<8}{c['train_output']:<8}{c['served_output']:<8}"
            f"{'yes' if c['served_output'] == c['answer'] else 'no':<7}{'yes' if c['tokens_equal'] else 'NO'}"
        )
    print(
        f"      loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}; artefacts in {out} "
        f"(try: parallel-bridge inspect {out / 'checkpoint'})"
    )


def main(argv: list[str] | None = None) -> int:
    """The torchrun part: steps 1 and 2 (and the training-mode answers)."""
    parser = argparse.ArgumentParser(prog="parallel_bridge.cli.demo", description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval", type=int, default=12, help="number of sums to check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = context_from_torchrun(tp=world, timeout_s=300)
    rank0 = ctx.rank == 0
    out = Path(args.out)
    if rank0:
        print(f"[1/4] training a megatron-core GPT at TP={ctx.tp} on generated sums ({args.steps} steps)")
    result = train(args, ctx, out, rank0)
    if rank0:
        print(
            f"      loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} in {result['train_seconds']:.1f} s"
        )
        (out / "report.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    if result["last_loss"] >= result["first_loss"]:
        logger.error("the loss did not fall: %.3f -> %.3f", result["first_loss"], result["last_loss"])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
