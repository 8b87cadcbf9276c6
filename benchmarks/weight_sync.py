"""Live weight sync: a ~400 MB fp32 model pushed from a TP=2 trainer into a running vLLM engine (TP=2, TP=1).

Per push: seconds, GB/s (bytes the trainer ranks publish), bytes each serving rank
received / the bytes of its own shard (1.0 = no full gathers). Measured in the
same run: the raw transport ceiling (the same bytes through the same shared-memory
path without the framework: each trainer rank copies its shard into a mapped
/dev/shm file, then each serving rank's share of the bytes is copied out, the two
phases run concurrently across ranks as in a push) and a checkpoint round trip
(gather, save safetensors to disk, and vLLM's own ``reload_weights`` from it).
Goals: >= 0.7 of the ceiling; >= 5x faster than save+reload; ratio 1.0. ``apply_s`` is vLLM's own
CPU kernel repack of the new weights (``process_weights_after_loading``), which any update path into
vLLM's CPU GEMMs pays; ``transport_vs_ceiling`` leaves it (and the RPCs) out.

``--backend parallel_bridge_dist``: the same over the torch.distributed backend (gloo over TCP on this host's
loopback, in-process engines); its ceiling is the same bytes sent with plain ``send``/``recv`` between two
trainer ranks over gloo. Results: ``results/weight_sync_dist.json``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.spec.model import GPTConfig

CFG = GPTConfig(
    num_layers=6,
    hidden_size=1024,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=2816,
    vocab_size=16000,
    max_position_embeddings=256,
)
PUSHES = 3


def _hf_state(model):
    """Full Hugging Face tensors (gathered over TP: the checkpoint path's cost) on every rank."""
    from parallel_bridge.spec.schema import to_hf

    cfg = GPTConfig.of_model(model)
    out = {}
    for name, t in model.full_state_dict().items():
        for hf, part in to_hf(name, t, cfg):
            out[hf] = part.contiguous()
    return out


def _raw_ceiling(nbytes_write: int, nbytes_read: int, root: Path) -> float:
    """Seconds to copy ``nbytes_write`` into a mapped shm file, then ``nbytes_read`` out of it into
    memory already touched (best of 5, warm: the push reuses its mappings and buffers too)."""
    path = root / f"raw_{os.getpid()}.bin"
    size = max(nbytes_write, nbytes_read)
    with open(path, "wb") as f:
        f.truncate(size)
    buf = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    src = torch.randint(0, 255, (nbytes_write,), dtype=torch.uint8)
    out = torch.empty(nbytes_read, dtype=torch.uint8)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf[:nbytes_write].copy_(src)
        out.copy_(buf[:nbytes_read])
        best = min(best, time.perf_counter() - start)
    del out, buf
    path.unlink()
    return best


def _raw_send_ceiling(nbytes: int) -> float:
    """Seconds for trainer rank 1 to send ``nbytes`` to rank 0 with plain ``send``/``recv`` over gloo (TCP on this
    host, as the dist backend's group): the transport's ceiling without planning, hashing or staging."""
    import torch.distributed as dist

    buf = torch.empty(max(nbytes // 4, 16), dtype=torch.float32)
    dist.barrier()
    start = time.perf_counter()
    if dist.get_rank() == 1:
        dist.send(buf, 0)
    elif dist.get_rank() == 0:
        dist.recv(buf, 1)
    dist.barrier()
    return time.perf_counter() - start


def _run(folder: str, serve_tp: int, backend: str = "parallel_bridge_shm") -> dict:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from parallel_bridge.adapters import megatron
    from parallel_bridge.models.hybrid_llama import HybridLlama
    from parallel_bridge.serving import llm_engine
    from parallel_bridge.sync import BACKEND, WeightSync

    ctx = context_from_torchrun(tp=2, timeout_s=600)
    cfg = CFG
    torch.manual_seed(0)
    out = {}
    with megatron.cpu_compat():
        model = HybridLlama(cfg, ctx)
        state = _hf_state(model)
        ckpt = Path(folder) / "ckpt"
        if ctx.rank == 0:
            import json

            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "config.json").write_text(json.dumps(cfg.to_hf("LlamaForCausalLM")))
            save_file(state, str(ckpt / "model.safetensors"))
        del state
        dist.barrier()
        engine = contextlib.nullcontext()
        if ctx.rank == 0:
            from vllm.config import WeightTransferConfig

            engine = llm_engine(model=str(ckpt), tensor_parallel_size=serve_tp, skip_tokenizer_init=True,
                                dtype="float32", max_model_len=128, enforce_eager=True,
                                weight_transfer_config=WeightTransferConfig(backend=backend))
        with engine as llm:
            from parallel_bridge.testing import free_port

            address = f"127.0.0.1:{free_port()}" if backend != BACKEND else None
            sync = WeightSync(ctx, model, llm, timeout_s=600, backend=backend, address=address)
            shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            pushes = []
            for _ in range(PUSHES):
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1.0001)
                dist.barrier()
                pushes.append(sync.push())
            best = min(pushes, key=lambda r: r.seconds)
            # the raw ceiling: each trainer rank writes its share, then a serving rank's share is read out
            sent = best.sent_bytes.get(ctx.rank, 0)
            received = max(best.received_bytes.values())
            dist.barrier()
            if backend == BACKEND:
                raw = _raw_ceiling(max(sent, 64), received, Path(sync.sender.root))
            else:
                raw = _raw_send_ceiling(received)
            raws = [None] * ctx.world_size
            dist.all_gather_object(raws, raw)
            # the checkpoint round trip: gather, save to disk, vLLM's reload_weights from the folder
            dist.barrier()
            start = time.perf_counter()
            state = _hf_state(model)
            if ctx.rank == 0:
                second = Path(folder) / "ckpt2"
                second.mkdir(exist_ok=True)
                save_file(state, str(second / "model.safetensors"))
                os.sync()
                llm.collective_rpc("reload_weights", kwargs={"weights_path": str(second)})
                llm.reset_prefix_cache()
            del state
            dist.barrier()
            save_reload = time.perf_counter() - start
            sync.close()
            if ctx.rank == 0:
                full = sum(best.sent_bytes.values())
                # a serving rank's own shard: its share of the full model plus replicated tensors
                out = {
                    "serve_tp": serve_tp,
                    "model_MB": full / 1e6,
                    "push_s": best.seconds,
                    "push_GB_s": full / best.seconds / 1e9,
                    "publish_s": best.publish_seconds,
                    "engine_s": best.engine_seconds,
                    "stage_s": best.stage_seconds,
                    "apply_s": best.apply_seconds,
                    "raw_ceiling_s": max(raws),
                    "vs_ceiling": max(raws) / best.seconds,
                    "transport_vs_ceiling": max(raws) / (best.publish_seconds + best.stage_seconds),
                    "save_reload_s": save_reload,
                    "speedup_vs_save_reload": save_reload / best.seconds,
                    "recv_bytes_per_rank": dict(best.received_bytes),
                    "trainer_shard_bytes": shard_bytes,
                }

    return out


def _serving_shard_bytes(serve_tp: int) -> int:
    """Bytes of serving rank 0's parameters, as vLLM holds them (vocabulary unpadded): its rank parts."""
    from parallel_bridge.spec.slices import ShapeStore, rank_parts

    return sum(t.numel() * 4 for _, t in rank_parts(ShapeStore(CFG), serve_tp, 0))


def main() -> None:
    import argparse

    from parallel_bridge.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="parallel_bridge_shm", choices=["parallel_bridge_shm", "parallel_bridge_dist"])
    backend = parser.parse_args().backend

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = []
    for serve_tp in (2, 1):
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1" if serve_tp == 2 else "auto"}
        with tempfile.TemporaryDirectory() as tmp:
            r = run_distributed(_run, 2, tmp, serve_tp, backend, timeout_s=900, env=env, threads=1)[0]
        own = _serving_shard_bytes(serve_tp)
        rows.append(
            {
                "backend": backend.removeprefix("parallel_bridge_"),
                "trainer": "tp2",
                "engine": f"tp{serve_tp}",
                "model_MB": r["model_MB"],
                "push_s": r["push_s"],
                "push_GB_s": r["push_GB_s"],
                "publish_s": r["publish_s"],
                "engine_s": r["engine_s"],
                "stage_s": r["stage_s"],
                "apply_s": r["apply_s"],
                "raw_ceiling_s": r["raw_ceiling_s"],
                "vs_ceiling": r["vs_ceiling"],
                "transport_vs_ceiling": r["transport_vs_ceiling"],
                "save_reload_s": r["save_reload_s"],
                "speedup": r["speedup_vs_save_reload"],
                "recv/own_shard": max(r["recv_bytes_per_rank"].values()) / own,
            }
        )
    report("weight_sync" if backend == "parallel_bridge_shm" else "weight_sync_dist", rows, {"goals": {"vs_ceiling": 0.7, "speedup": 5.0, "recv/own_shard": 1.0}})


if __name__ == "__main__":
    main()
