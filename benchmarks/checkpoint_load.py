"""Reading a Megatron checkpoint for serving, and exporting it, against the machine's raw read rate.

Generates a torch_dist checkpoint of a few hundred MB with megatron-core's own
save code (TP=2, two ranks), then, each in a fresh process:
- raw read: every checkpoint file read start to end (the same bytes, page cache warm
  like the others); raw write: as many bytes written to a new file;
- load one target rank: the parts vLLM's LlamaForCausalLM keeps on rank 0 of TP=2,
  read slice by slice (``rank_parts``);
- export: the whole checkpoint to a Hugging Face folder;
- import: that Hugging Face folder back to a torch_dist checkpoint for TP=2 (``--to megatron``).
With ``--moe``: a Mixtral-like checkpoint (8 experts, top-2) saved at EP=2, and also the load of expert-parallel
rank 0 of EP=2 (half the experts, whole: the GPU serving path) beside rank 0 of TP=2 (half of every expert).
Rates are checkpoint bytes / seconds (for the rank load: the bytes it keeps);
opening the checkpoint is timed, importing modules is not.
Peak RSS is the process's high-water mark minus its RSS after imports.
Targets: load and export >= 50% of the raw rate; peak RSS <= rank shard + largest tensor + 300 MB (the
import holds the model once, as megatron-core's save needs: its budget is the model + largest tensor + 300 MB).
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


def _save(root: str, sizes: dict, ep: int = 1) -> None:
    import torch

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist
    from parallel_bridge.spec.model import GPTConfig

    ctx = context_from_torchrun(tp=2 // ep, ep=ep, timeout_s=600)
    spec = GPTConfig(**sizes)
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, 0)
        _, model = megatron.gpt_model(ctx, spec, perform_initialization=False)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        save_torch_dist(ctx, model, root, 1, spec)


def _measure(kind: str, root: str, out: str, queue) -> None:
    import safetensors.torch  # noqa: F401 - imports are not part of what is timed
    import torch.distributed.checkpoint  # noqa: F401

    from parallel_bridge.checkpoint.hf_export import export_hf
    from parallel_bridge.checkpoint.hf_import import import_hf
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.serving.megatron_format import rank_parts

    base = _rss_mb()
    start = time.perf_counter()
    kept = 0
    if kind == "raw":
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
    elif kind == "load_rank0_of_tp2":
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
    else:
        ckpt = MegatronCheckpoint.open(root)
        export_hf(ckpt, out, shard_bytes=256 * MB)
        kept = ckpt.total_bytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "kind": kind,
            "seconds": seconds,
            "bytes": kept,
            "peak_rss_over_base_mb": peak - base,
            "base_rss_mb": base,
        }
    )


def run(kind: str, root: str, out: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, root, out, queue))
    proc.start()
    result = queue.get(timeout=1200)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--moe", action="store_true", help="a Mixtral-like checkpoint saved at EP=2")
    args = parser.parse_args()
    from _common import report

    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.testing import run_distributed

    h = args.hidden
    sizes = {
        "num_layers": args.layers,
        "hidden_size": h,
        "num_attention_heads": h // 64,
        "num_query_groups": h // 256,
        "ffn_hidden_size": 2816 * h // 1024,
        "vocab_size": 16384,
    }
    if args.moe:
        sizes.update(num_moe_experts=8, moe_router_topk=2, ffn_hidden_size=h)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = str(Path(tmp, "ckpt"))
        start = time.perf_counter()
        run_distributed(_save, 2, root, sizes, 2 if args.moe else 1, timeout_s=1200)
        save_s = time.perf_counter() - start
        ckpt = MegatronCheckpoint.open(root)
        total = ckpt.total_bytes
        largest_mb = max(math.prod(t.shape) * t.dtype.itemsize for t in ckpt.tensors.values()) / MB
        kinds = ("raw", "raw_write", "load_rank0_of_tp2", "export_hf")
        results = [run(kind, root, str(Path(tmp, "hf"))) for kind in kinds]
        results.append(run("import_megatron", str(Path(tmp, "hf")), str(Path(tmp, "imported"))))
        if args.moe:
            results.append(run("load_ep_rank0_of_ep2", root, ""))
    raw = results[0]["bytes"] / results[0]["seconds"]
    rows = []
    for r in results:
        rate = r["bytes"] / r["seconds"]
        rows.append(
            {
                "step": r["kind"],
                "seconds": r["seconds"],
                "MB": r["bytes"] / MB,
                "GB_per_s": rate / 1e9,
                "vs_raw": rate / raw,
                "peak_rss_mb": r["peak_rss_over_base_mb"],
            }
        )
    write = results[1]["bytes"] / results[1]["seconds"]
    ceiling = 1 / (1 / raw + 1 / write)  # export reads and writes every byte once
    rows[3]["vs_read_then_write"] = (results[3]["bytes"] / results[3]["seconds"]) / ceiling
    rows[4]["vs_read_then_write"] = (results[4]["bytes"] / results[4]["seconds"]) / ceiling
    shard_mb = results[2]["bytes"] / MB
    budget = shard_mb + largest_mb + 300
    print(
        f"checkpoint {total / MB:.0f} MB (saved in {save_s:.1f} s), rank-0 shard {shard_mb:.0f} MB, "
        f"largest tensor {largest_mb:.0f} MB -> RSS budget {budget:.0f} MB"
    )
    report(
        "checkpoint_load_moe" if args.moe else "checkpoint_load",
        rows,
        {
            "checkpoint_mb": total / MB,
            "rank_shard_mb": shard_mb,
            "largest_tensor_mb": largest_mb,
            "rss_budget_mb": budget,
            "import_rss_budget_mb": total / MB + largest_mb + 300,
            "targets": {"vs_raw": 0.5, "peak_rss_mb": "<= shard + largest + 300"},
            "sizes": sizes,
        },
    )


if __name__ == "__main__":
    main()
