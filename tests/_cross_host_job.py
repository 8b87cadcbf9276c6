"""The trainer job of the cross-host weight-sync tests, run inside the trainer's network namespace:
``python _cross_host_job.py OUT PHASE ENGINE_URL[,URL] TRAINER_IP LINK_DEV``. Two trainer ranks (TP=2); rank 0
writes what it saw to OUT/PHASE.json (the test asserts). The test and the job meet through files in OUT."""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_weight_sync import (
    CFG,
    PROMPTS,
    _http_logprobs,
    _serving_rank_bytes,
    _train,
    parity_of,
    trainer_logprobs,
)

from parallel_bridge.models.hybrid_llama import HybridLlama
from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.testing import free_port, run_distributed


def served(urls):
    return [torch.stack([_http_logprobs(u, p, CFG.vocab_size) for p in PROMPTS]) for u in urls]


def _error(fn):
    from parallel_bridge.sync import SyncError

    start = time.monotonic()
    try:
        fn()
    except SyncError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - an unexpected kind fails the test, with its text
        return {"error": f"NOT A SyncError: {type(e).__name__}: {e}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def main_phase(out, urls, ip, dev):
    from parallel_bridge.adapters import megatron
    from parallel_bridge.sync import DIST_BACKEND, ServerClient, WeightSync, dist_sender

    ctx = context_from_torchrun(tp=2, timeout_s=120)
    torch.manual_seed(0)
    res = {"rank": ctx.rank}
    with megatron.cpu_compat():
        model = HybridLlama(CFG, ctx)
        clients = [ServerClient(u, timeout_s=20) for u in urls] if ctx.rank == 0 else None
        sync = WeightSync(ctx, model, clients, backend=DIST_BACKEND, address=f"{ip}:{free_port()}", timeout_s=15)
        before = served(urls) if ctx.rank == 0 else None
        res["pushes"] = []
        for step in range(3):
            if step:
                _train(model, 3, seed=step)
            rep = sync.push()
            ref = trainer_logprobs(model)
            if ctx.rank == 0:
                got = served(urls)
                gaps = [parity_of(g, ref) for g in got]
                res["pushes"].append({
                    "version": rep.version, "max": [g.max for g, _ in gaps], "bound": [b.max for _, b in gaps],
                    "received": [dict(r) for r in rep.received], "sent": rep.sent_bytes, "seconds": rep.seconds,
                    "before": [float((b - ref[0]).abs().max()) for b in before] if step == 0 else None,
                })
        res["sent"] = rep.sent_bytes
        res["own"] = [_serving_rank_bytes(model, tp) for tp in (1, 2)]
        baseline = served(urls) if ctx.rank == 0 else None
        _train(model, 2, seed=9)

        def unchanged(which=(0, 1)):
            if ctx.rank == 0:
                now = served([urls[i] for i in which])
                res.setdefault("unchanged", []).append(all(torch.equal(a, baseline[i]) for a, i in zip(now, which)))

        # a non-finite weight (rank 1's shard)
        p = dict(model.named_parameters())["decoder.layers.1.mlp.linear_fc2.weight"]
        if ctx.rank == 1:
            keep = p.data[0, :3].clone()
            p.data[0, :3] = float("nan")
        res["nonfinite"] = _error(sync.push)
        if ctx.rank == 1:
            p.data[0, :3] = keep
        unchanged()
        # a corrupted piece: rank 1's hashes of one tensor do not match its bytes
        real = dist_sender.shard_hash
        if ctx.rank == 1:
            dist_sender.shard_hash = lambda t, along: real(t, along) + (1 if t.dim() == 2 else 0)
        res["corrupt"] = _error(sync.push)
        dist_sender.shard_hash = real
        unchanged()
        res["recovered"] = _error(sync.push)  # the group formed again under a new session
        res["version_recovered"] = sync.version
        baseline = served(urls) if ctx.rank == 0 else None
        # one of the two engines gone
        if ctx.rank == 0:
            (out / "kill-engine-1").write_text("")
            while not (out / "engine-1-dead").exists():
                time.sleep(0.2)
        torch.distributed.barrier()
        _train(model, 1, seed=11)
        res["engine_gone"] = _error(sync.push)
        unchanged((0,))
        res["version_end"] = sync.version
        if ctx.rank == 0:
            (out / "main.json").write_text(json.dumps(res))
    return res


def takeover_phase(out, urls, ip, dev):
    """A new trainer attaches to an engine the last one (now gone) held; a second trainer is refused; an
    address nobody listens on is named."""
    from parallel_bridge.adapters import megatron
    from parallel_bridge.sync import DIST_BACKEND, ServerClient, WeightSync

    ctx = context_from_torchrun(tp=2, timeout_s=120)
    torch.manual_seed(0)
    res = {}
    with megatron.cpu_compat():
        model = HybridLlama(CFG, ctx)
        client = [ServerClient(urls[0], timeout_s=60)] if ctx.rank == 0 else None
        res["nobody"] = _error(lambda: WeightSync(ctx, model, client, backend=DIST_BACKEND,
                                                  address=f"10.213.254.9:{free_port()}", timeout_s=5))
        sync = WeightSync(ctx, model, client, backend=DIST_BACKEND, address=f"{ip}:{free_port()}", timeout_s=15)
        res["attached_at"] = sync.version
        res["push"] = sync.push().version
        res["second"] = _error(lambda: WeightSync(ctx, model, client, backend=DIST_BACKEND,
                                                  address=f"{ip}:{free_port()}", timeout_s=15))
        ref = trainer_logprobs(model)
        if ctx.rank == 0:
            g, b = parity_of(served(urls[:1])[0], ref)
            res["max"], res["bound"] = g.max, b.max
            (out / "takeover.json").write_text(json.dumps(res))
        sync.close()
    return res


if __name__ == "__main__":
    out, phase, urls, ip, dev = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4], sys.argv[5]
    fn = {"main": main_phase, "takeover": takeover_phase}[phase]
    run_distributed(fn, 2, out, urls, ip, dev, timeout_s=600)
