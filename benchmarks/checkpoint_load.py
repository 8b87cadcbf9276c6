"""Reading a Megatron checkpoint for serving, and exporting it, against the machine's raw read rate.

Generates a ~1.4 GB fp32 checkpoint with megatron-core's own save code (TP=2, two ranks), in both formats
(torch_dist, and the legacy per-rank ``torch.save`` files of the same model), then, each in a fresh process:
- raw read: every checkpoint file read start to end; raw write: as many bytes written to a new file;
- load one target rank: the parts vLLM's LlamaForCausalLM keeps on rank 0 of TP=2, read slice by slice
  (``rank_parts``), from torch_dist and from legacy;
- export: the whole checkpoint to a Hugging Face folder;
- import: that Hugging Face folder back to a torch_dist checkpoint for TP=2 (``--to megatron``);
- first token (``--ttft``): a vLLM engine started on the Megatron checkpoint (``load_format="megatron"``) and on
  its HF export (stock vLLM, safetensors), TP=1 and TP=2, seconds from ``LLM(...)`` to the first sampled token.
Reads are timed with the page cache warm (each file read once before) and, where this process may drop the
cache (``/proc/sys/vm/drop_caches``, root), cold too.
With ``--moe``: a Mixtral-like checkpoint (8 experts, top-2) saved at EP=2, and also the load of expert-parallel
rank 0 of EP=2 (half the experts, whole: the GPU serving path) beside rank 0 of TP=2 (half of every expert).
Rates are checkpoint bytes / seconds (for the rank load: the bytes it keeps);
opening the checkpoint is timed, importing modules is not.
Peak RSS is the process's high-water mark minus its RSS after imports.
Goals (issue #25): rank load / raw read >= 0.7; first token from Megatron / from HF <= 1.1; export / read-then-
write ceiling >= 0.9; import / ceiling >= 0.7; peak RSS per rank <= its shard + largest tensor + 300 MB.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from parallel_bridge.parallel.launch import context_from_torchrun

sys.path.insert(0, str(Path(__file__).parent))

MB = 1024**2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _save(root: str, sizes: dict, ep: int = 1, legacy: str | None = None) -> None:
    import torch

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist
    from parallel_bridge.spec.model import CONFIG_FILE, GPTConfig

    ctx = context_from_torchrun(tp=2 // ep, ep=ep, timeout_s=600)
    spec = GPTConfig(**sizes)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, 0)
        _, model = megatron.gpt_model(ctx, spec, perform_initialization=False)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        save_torch_dist(ctx, model, root, 1, spec)
        if legacy is not None:  # the same model as Megatron-LM's legacy per-rank files
            folder = Path(legacy) / "iter_0000001" / f"mp_rank_{ctx.tp_rank:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            state = {"checkpoint_version": 3.0, "iteration": 1, "model": model.state_dict_for_save_checkpoint()}
            torch.save(state, folder / "model_optim_rng.pt")
            if ctx.rank == 0:
                (Path(legacy) / CONFIG_FILE).write_text((Path(root) / CONFIG_FILE).read_text())
                (Path(legacy) / "latest_checkpointed_iteration.txt").write_text("1")


def _import_rank(hf: str, out: str) -> dict:
    """One rank of the import under torchrun: its seconds, its shard's bytes and its peak RSS over its base."""
    import safetensors.torch  # noqa: F401 - imports are not part of what is timed
    import torch.distributed.checkpoint  # noqa: F401

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.sharded_import import import_hf_sharded

    megatron.import_megatron()
    base = _rss_mb()
    start = time.perf_counter()
    import_hf_sharded(hf, out, tp=2)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_over_base_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}


def _first_token(model: str, tp: int, megatron_format: bool) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from parallel_bridge.serving.engines import cpu_thread_binding, llm_engine

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tp)
    extra = {"load_format": "megatron", "config_format": "megatron"} if megatron_format else {}
    with llm_engine(model=model, tensor_parallel_size=tp, dtype="float32", max_model_len=128,
                    skip_tokenizer_init=True, **extra) as llm:
        llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])],
                     SamplingParams(max_tokens=1, temperature=0, detokenize=False), use_tqdm=False)


def _measure(kind: str, root: str, out: str, queue) -> None:
    import safetensors.torch  # noqa: F401 - imports are not part of what is timed
    import torch.distributed.checkpoint  # noqa: F401

    from parallel_bridge.checkpoint.hf_export import export_hf
    from parallel_bridge.checkpoint.hf_import import import_hf
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.serving.megatron_format import rank_parts

    if kind.startswith("first_token"):
        import vllm  # noqa: F401
    base = _rss_mb()
    start = time.perf_counter()
    kept = 0
    if kind.startswith("raw_read"):
        for f in sorted(Path(root).rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while chunk := fh.read(64 * MB):
                        kept += len(chunk)
    elif kind == "raw_write":
        total = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
        block = bytes(64 * MB)
        with open(out + ".raw", "wb", buffering=0) as fh:
            while kept < total:
                kept += fh.write(block[: min(len(block), total - kept)])
        os.unlink(out + ".raw")
    elif kind.startswith("load_rank0_of_tp2"):
        ckpt = MegatronCheckpoint.open(root)
        for _, tensor in rank_parts(ckpt, 2, 0):
            kept += tensor.numel() * tensor.element_size()
            del tensor
    elif kind == "load_ep_rank0_of_ep2":
        ckpt = MegatronCheckpoint.open(root)
        for _, tensor in rank_parts(ckpt, 1, 0, None, (2, 0)):
            kept += tensor.numel() * tensor.element_size()
            del tensor
    elif kind == "import_megatron":
        import_hf(root, out, tp=2)
        kept = sum(f.stat().st_size for f in Path(root).glob("*.safetensors"))
    elif kind.startswith("first_token"):
        tp = int(kind.rsplit("tp", 1)[1])
        _first_token(root, tp, "megatron" in kind)
        kept = 0
    else:
        ckpt = MegatronCheckpoint.open(root)
        export_hf(ckpt, out, shard_bytes=256 * MB)
        kept = ckpt.total_bytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"kind": kind, "seconds": seconds, "bytes": kept, "peak_rss_over_base_mb": peak - base,
               "base_rss_mb": base})


def _drop_cache() -> bool:
    """Empty the page cache (root only): what a cold read finds."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _warm(root: str) -> None:
    for f in Path(root).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 * MB):
                    pass


def run(kind: str, root: str, out: str, cold: bool = False) -> dict | None:
    """One measurement in a fresh process; ``cold``: the page cache dropped first (None where it cannot be)."""
    if cold and not _drop_cache():
        return None
    if not cold:
        _warm(root)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind.removesuffix("_cold"), root, out, queue))
    proc.start()
    result = queue.get(timeout=1200)
    proc.join()
    result["kind"] = kind
    return result


def _rows(results: list[dict], ceiling: float, raw: dict[str, float]) -> list[dict]:
    rows = []
    for r in results:
        rate = r["bytes"] / r["seconds"]
        row = {"step": r["kind"], "seconds": r["seconds"], "MB": r["bytes"] / MB, "GB_per_s": rate / 1e9,
               "peak_rss_mb": r["peak_rss_over_base_mb"]}
        if r["kind"].startswith("load"):
            row["vs_raw"] = rate / raw["cold" if r["kind"].endswith("_cold") else "warm"]
        if r["kind"] in ("export_hf", "import_megatron", "import_megatron_2_ranks"):
            row["vs_read_then_write"] = rate / ceiling
        rows.append(row)
    return rows


def _measure_all(args: argparse.Namespace, sizes: dict) -> tuple[list, int, float, float]:
    """Save the checkpoint (both formats unless MoE) and run every measurement: (results, checkpoint bytes,
    largest tensor MB, save seconds)."""
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.testing import run_distributed

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root, legacy, hf = (str(Path(tmp, n)) for n in ("ckpt", "legacy", "hf"))
        start = time.perf_counter()
        run_distributed(_save, 2, root, sizes, 2 if args.moe else 1, None if args.moe else legacy, timeout_s=1200)
        save_s = time.perf_counter() - start
        ckpt = MegatronCheckpoint.open(root)
        total = ckpt.total_bytes
        largest_mb = max(math.prod(t.shape) * t.dtype.itemsize for t in ckpt.tensors.values()) / MB
        measured = [run("raw_read", root, ""), run("raw_read_cold", root, "", cold=True),
                    run("raw_write", root, str(Path(tmp, "w"))),
                    run("load_rank0_of_tp2", root, ""), run("load_rank0_of_tp2_cold", root, "", cold=True)]
        if not args.moe:
            measured += [run("load_rank0_of_tp2_legacy", legacy, ""),
                         run("load_rank0_of_tp2_legacy_cold", legacy, "", cold=True)]
        measured += [run("export_hf", root, hf), run("import_megatron", hf, str(Path(tmp, "imported")))]
        _warm(hf)
        ranks = run_distributed(_import_rank, 2, hf, str(Path(tmp, "imported2")), timeout_s=1200)
        measured.append({"kind": "import_megatron_2_ranks", "seconds": max(r["seconds"] for r in ranks),
                         "bytes": measured[-1]["bytes"],
                         "peak_rss_over_base_mb": max(r["peak_rss_over_base_mb"] for r in ranks)})
        if args.moe:
            measured.append(run("load_ep_rank0_of_ep2", root, ""))
        if args.ttft and not args.moe:
            measured += [run(f"first_token_{src}_tp{tp}", path, "") for tp in (1, 2)
                         for src, path in (("megatron", root), ("hf", hf))]
    return measured, total, largest_mb, save_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--moe", action="store_true", help="a Mixtral-like checkpoint saved at EP=2")
    parser.add_argument("--ttft", action="store_true", help="also time the first served token (4 engines)")
    args = parser.parse_args()
    from _common import report

    h = args.hidden
    sizes = {"num_layers": args.layers, "hidden_size": h, "num_attention_heads": h // 64,
             "num_query_groups": h // 256, "ffn_hidden_size": 2816 * h // 1024, "vocab_size": 16384}
    if args.moe:
        sizes.update(num_moe_experts=8, moe_router_topk=2, ffn_hidden_size=h)
    measured, total, largest_mb, save_s = _measure_all(args, sizes)
    results = [r for r in measured if r is not None]
    by_kind = {r["kind"]: r for r in results}
    rate = {k: r["bytes"] / r["seconds"] for k, r in by_kind.items() if r["bytes"]}
    raw = {"warm": rate["raw_read"], "cold": rate.get("raw_read_cold", rate["raw_read"])}
    ceiling = 1 / (1 / raw["warm"] + 1 / rate["raw_write"])  # export and import read and write every byte once
    rows = _rows(results, ceiling, raw)
    first_token = {f"tp{tp}": by_kind[f"first_token_megatron_tp{tp}"]["seconds"]
                   / by_kind[f"first_token_hf_tp{tp}"]["seconds"]
                   for tp in (1, 2) if f"first_token_hf_tp{tp}" in by_kind}
    shard_mb = by_kind["load_rank0_of_tp2"]["bytes"] / MB
    budget = shard_mb + largest_mb + 300
    print(f"checkpoint {total / MB:.0f} MB (saved in {save_s:.1f} s), rank-0 shard {shard_mb:.0f} MB, largest "
          f"tensor {largest_mb:.0f} MB -> RSS budget {budget:.0f} MB; cold cache: "
          f"{'measured' if 'raw_read_cold' in by_kind else 'not measured (drop_caches needs root)'}")
    if first_token:
        print("first token, Megatron checkpoint / stock vLLM on its HF export: "
              + ", ".join(f"{k} {v:.2f}" for k, v in first_token.items()))
    report("checkpoint_load_moe" if args.moe else "checkpoint_load", rows, {
        "checkpoint_mb": total / MB, "rank_shard_mb": shard_mb, "largest_tensor_mb": largest_mb,
        "rss_budget_mb": budget, "import_rss_budget_mb": total / MB + largest_mb + 300,
        "import_rank_rss_budget_mb_2_ranks": total / MB / 2 + largest_mb + 300,
        "first_token_megatron_vs_hf": first_token,
        "goals": {"load_vs_raw": 0.7, "first_token_vs_hf": 1.1, "export_vs_read_then_write": 0.9,
                  "import_vs_read_then_write": 0.7, "peak_rss_mb": "<= shard + largest + 300"},
        "sizes": sizes,
    })


if __name__ == "__main__":
    main()
