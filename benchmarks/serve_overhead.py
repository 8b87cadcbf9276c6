"""Serving throughput of the hybrid model through the bridge vs vLLM's own LlamaForCausalLM.

Same sizes and weights: a HybridLlama (megatron-core layers + TrainableAttention)
is saved with random weights, converted to a Hugging Face Llama folder, and both
are served by vLLM (CPU build, TP=1, fp32, default multiprocessing) one after
the other, generating the same greedy batch. Prints tokens/s and the ratio
(target >= 0.97 on CPU) and checks both produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from parallel_bridge.parallel.launch import context_from_torchrun

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _save_hybrid(folder: str, sizes: dict) -> None:
    import torch

    from parallel_bridge.models.hybrid_llama import HybridLlama
    from parallel_bridge.spec.model import GPTConfig

    torch.manual_seed(0)
    HybridLlama(GPTConfig(**sizes), context_from_torchrun()).save_pretrained(folder)


def convert_to_hf(src: Path, dst: Path) -> None:
    """The hybrid folder as a stock Llama folder (HF names, LlamaForCausalLM)."""
    from safetensors.torch import load_file, save_file

    from parallel_bridge.spec.model import GPTConfig
    from parallel_bridge.spec.schema import to_hf

    cfg = json.loads((src / "config.json").read_text())
    spec = GPTConfig.from_hf(cfg)
    out = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        out.update({k: v.contiguous() for k, v in to_hf(name, tensor, spec)})
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"))
    cfg["architectures"] = ["LlamaForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))


def throughput(folder: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, list]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from parallel_bridge.serving.engines import llm_engine

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    with llm_engine(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", max_model_len=256, enforce_eager=True
    ) as llm:
        outs = llm.generate(batch, params, use_tqdm=False)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return len(prompts) * new_tokens / best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="engine starts per model, alternating")
    args = parser.parse_args()
    from _common import report

    from parallel_bridge.testing import run_distributed

    sizes = {
        "vocab_size": 4096,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_query_groups": args.hidden // 128,
        "ffn_hidden_size": 3 * args.hidden,
        "max_position_embeddings": 256,
    }
    with tempfile.TemporaryDirectory() as tmp:
        hybrid, llama = Path(tmp, "hybrid"), Path(tmp, "llama")
        run_distributed(_save_hybrid, 1, str(hybrid), sizes, timeout_s=300)
        convert_to_hf(hybrid, llama)
        prompts = [[(7 * i + j) % sizes["vocab_size"] for j in range(16)] for i in range(args.batch)]
        # alternate the two engines, best of each: the machine's drift hits both alike
        runs = {"bridge": [], "vllm": []}
        for round_ in range(args.rounds):
            order = [("bridge", hybrid), ("vllm", llama)][:: 1 if round_ % 2 == 0 else -1]
            for name, folder in order:
                runs[name].append(throughput(folder, prompts, args.new_tokens, args.repeats))
        tps_bridge, tok_bridge = max(runs["bridge"], key=lambda r: r[0])
        tps_vllm, tok_vllm = max(runs["vllm"], key=lambda r: r[0])
    ratio = tps_bridge / tps_vllm
    same = sum(a == b for a, b in zip(tok_bridge, tok_vllm))
    rows = [
        {"model": "bridge HybridLlama", "tokens_per_s": tps_bridge, "ratio": ratio},
        {"model": "vLLM LlamaForCausalLM", "tokens_per_s": tps_vllm, "ratio": 1.0},
    ]
    print(
        f"bridge / vLLM Llama = {ratio:.3f} (target >= 0.97); identical greedy outputs: {same}/{len(prompts)}"
    )
    report(
        "serve_overhead",
        rows,
        {
            "bridge_over_vllm": ratio,
            "target": 0.97,
            "identical_outputs": same,
            "prompts": len(prompts),
            "sizes": sizes,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "tokens_per_s_each_round": {k: [r[0] for r in v] for k, v in runs.items()},
        },
    )


if __name__ == "__main__":
    main()
