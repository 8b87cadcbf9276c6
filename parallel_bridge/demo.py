"""The end-to-end demo, run under torchrun by ``parallel-bridge demo``.

Trains a small megatron-core GPT (built through the Megatron adapter) at TP=N on
arithmetic sentences it generates itself (``12+7=19``), with a character
tokenizer it builds and saves in Hugging Face format, then checks how many sums
the trained model completes correctly. Everything lands in one output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel_bridge import ParallelContext

logger = logging.getLogger("parallel_bridge.demo")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+=")


@dataclass(frozen=True)
class DemoModel:
    """Sizes of the demo model (head_dim 32: a size vLLM's CPU attention supports)."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 256
    vocab_size: int = 32  # 16 symbols, padded so that any TP up to 32 divides it
    max_sequence_length: int = 16


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


def encode_batch(tokenizer, rng: random.Random, batch: int, seq: int, limit: int) -> torch.Tensor:
    """``batch`` rows of ``<s>a+b=c</s>`` sentences, packed and cut to ``seq + 1`` tokens."""
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq + 1:
            prompt, answer = make_sum(rng, limit)
            ids += [tokenizer.bos_token_id, *tokenizer.encode(prompt + answer), tokenizer.eos_token_id]
        rows.append(ids[: seq + 1])
    return torch.tensor(rows)


@torch.no_grad()
def greedy_complete(ctx, model, tokenizer, prompts: list[str], max_new: int, vocab: int):
    """Greedy continuations with the training-mode forward (no KV cache), and each step's logprob."""
    from parallel_bridge.adapters import megatron as pm

    outs, logprobs = [], []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt)]
        new, lps = [], []
        for _ in range(max_new):
            x = torch.tensor([ids])
            pos = torch.arange(x.shape[1]).unsqueeze(0)
            logits = pm.gather_vocab_logits(ctx, model(x, pos, attention_mask=None))[0, -1, :vocab]
            lp = torch.log_softmax(logits.float(), dim=-1)
            nxt = int(lp.argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            lps.append(float(lp[nxt]))
            ids.append(nxt)
        outs.append(tokenizer.decode(new))
        logprobs.append(lps)
    return outs, logprobs


def train(args, ctx: ParallelContext, out: Path, rank0: bool) -> dict:
    from tqdm import tqdm

    from parallel_bridge.adapters import megatron as pm

    sizes = DemoModel()
    tokenizer = build_tokenizer(out / "tokenizer") if rank0 else None
    dist.barrier()
    if not rank0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    limit = 10
    rng = random.Random(0)  # the same batches on every TP rank
    with pm.cpu_compat(), pm.bind_parallel_state(ctx):
        pm.model_parallel_manual_seed(ctx, 1234)
        config = pm.transformer_config(
            ctx,
            **{k: v for k, v in asdict(sizes).items() if k not in ("vocab_size", "max_sequence_length")},
            vocab_size=sizes.vocab_size,
            init_method_std=0.02,
        )
        model = pm.build_gpt_model(
            ctx, config, vocab_size=sizes.vocab_size, max_sequence_length=sizes.max_sequence_length
        )
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        seq = sizes.max_sequence_length
        pos = torch.arange(seq).unsqueeze(0).expand(args.batch, -1)
        losses = []
        bar = tqdm(range(args.steps), desc="train", disable=not rank0, ncols=80, mininterval=2.0)
        start = time.perf_counter()
        for _ in bar:
            batch = encode_batch(tokenizer, rng, args.batch, seq, limit)
            loss = model(batch[:, :-1], pos, attention_mask=None, labels=batch[:, 1:]).float().mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_s = time.perf_counter() - start
        model.eval()
        eval_rng = random.Random(1)
        cases = [make_sum(eval_rng, limit) for _ in range(args.eval)]
        outs, lps = greedy_complete(ctx, model, tokenizer, [p for p, _ in cases], 4, len(SPECIALS + CHARS))
    correct = sum(o == a for o, (_, a) in zip(outs, cases))
    return {
        "model": asdict(sizes),
        "first_loss": sum(losses[:10]) / min(10, len(losses)),
        "last_loss": sum(losses[-10:]) / min(10, len(losses)),
        "train_seconds": train_s,
        "steps": args.steps,
        "cases": [{"prompt": p, "answer": a, "train_output": o} for (p, a), o in zip(cases, outs)],
        "train_logprobs": lps,
        "correct": correct,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parallel_bridge.demo", description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval", type=int, default=12, help="number of sums to check")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("parallel_bridge").setLevel(logging.INFO)
    torch.set_num_threads(1)
    ctx = ParallelContext.from_torchrun(
        tp=int(__import__("os").environ.get("WORLD_SIZE", "1")), timeout_s=300
    )
    rank0 = ctx.rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank0:
        print(f"[1/2] training a megatron-core GPT at TP={ctx.tp} on generated sums ({args.steps} steps)")
    result = train(args, ctx, out, rank0)
    if rank0:
        print(
            f"      loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} "
            f"in {result['train_seconds']:.1f} s"
        )
        print(
            f"[2/2] greedy answers of the trained model ({result['correct']}/{len(result['cases'])} correct)"
        )
        print(f"      {'prompt':<10}{'expected':<10}{'model':<10}")
        for c in result["cases"]:
            mark = "ok" if c["train_output"] == c["answer"] else "--"
            print(f"      {c['prompt']:<10}{c['answer']:<10}{c['train_output']:<10}{mark}")
        (out / "report.json").write_text(json.dumps(result, indent=2))
        print(f"report: {out / 'report.json'}")
    dist.barrier()
    dist.destroy_process_group()
    if result["last_loss"] >= result["first_loss"]:
        logger.error("the loss did not fall: %.3f -> %.3f", result["first_loss"], result["last_loss"])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
