"""Live weight sync: a TP=2 trainer (torchrun-like ranks) pushes into a running vLLM engine (TP=1 and 2).

The engine starts from random (dummy) weights, so before the first push its
next-token log-softmax differs from the trainer's; after each push it must equal
the trainer's own forward within the parity rule's bound (``parallel_bridge.numerics.parity``,
max and mean: vLLM's paged attention and our SDPA sum in different orders). Failure
cases leave the engine serving the previous weights: greedy tokens and logprobs unchanged.
"""

import contextlib
import json
import os

import pytest
import torch

from parallel_bridge import ParallelContext
from parallel_bridge.models.hybrid_llama import HybridLlama
from parallel_bridge.numerics import parity
from parallel_bridge.parallel.launch import context_from_torchrun
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")

CFG = GPTConfig(
    num_layers=2,
    hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=256,
    vocab_size=90,  # padded to 90/92 by the trainer, to 128 rows by vLLM: padding rows must be dropped
    max_position_embeddings=128,
)
PROMPTS = [[3, 17, 5], [10, 11, 12, 13, 40], [50]]
LENGTH = parity.reduction_length(
    hidden=CFG.hidden_size, ffn=CFG.ffn_hidden_size, layers=CFG.num_layers, vocab=CFG.vocab_size,
    heads=CFG.num_attention_heads, head_dim=CFG.hidden_size // CFG.num_attention_heads,
    seq_len=max(map(len, PROMPTS)),
)


@contextlib.contextmanager
def _serving(active, folder, serve_tp, vocab=CFG.vocab_size):
    """A vLLM engine on random weights with the sync backend (on trainer rank 0 only), shut down on exit."""
    if not active:
        yield None
        return
    from vllm.config import WeightTransferConfig

    from parallel_bridge.serving.engines import llm_engine
    from parallel_bridge.sync import BACKEND

    with llm_engine(
        model=str(folder),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=64,
        enforce_eager=True,
        tensor_parallel_size=serve_tp,
        max_logprobs=vocab,
        weight_transfer_config=WeightTransferConfig(backend=BACKEND),
    ) as llm:
        yield llm


def served_logprobs(llm):
    """Full next-token log-softmax after each prompt, from the engine: [prompts, vocab]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0, logprobs=CFG.vocab_size, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    rows = []
    for o in outs:
        lp = o.outputs[0].logprobs[0]
        rows.append(torch.tensor([lp[t].logprob for t in range(CFG.vocab_size)], dtype=torch.float64))
    return torch.stack(rows)


@torch.no_grad()
def trainer_logprobs(model):
    """The trainer's next-token log-softmax after each prompt ([prompts, vocab]) and its largest |logit|."""
    rows, zmax = [], 0.0
    for p in PROMPTS:
        logits = model.compute_logits(model(torch.tensor(p), torch.arange(len(p))))
        zmax = max(zmax, logits.abs().max().item())
        rows.append(torch.log_softmax(logits[-1].double(), -1))
    return torch.stack(rows), zmax


def parity_of(got, reference):
    """(gap, bound) of the engine's log-softmax against the trainer's (rows, largest |logit|)."""
    rows, zmax = reference
    return parity.Gap.between(got, rows), parity.logprob_bound(zmax, LENGTH)


def assert_parity(result, label):
    gap, bound = result
    print(f"\n[{label}] |d logprob| max {gap.max:.2e} mean {gap.mean:.2e} (rule: {bound.describe()})")
    bound.check(gap, label)


def _train(model, steps, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        ids = torch.randint(0, CFG.vocab_size, (24,), generator=g)
        loss = model.loss(ids, torch.arange(24), torch.roll(ids, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _folder(root, tie=False, kv=CFG.num_query_groups):
    cfg = CFG.replace(tie_embeddings=tie, num_query_groups=kv)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(cfg.to_hf("LlamaForCausalLM"), f)
    return cfg


def _serving_rank_bytes(model, serve_tp):
    """Bytes of what each serving rank keeps: its slices of every tensor and its real vocabulary rows
    (vLLM pads the vocabulary to a multiple of 64 and splits that evenly)."""
    from parallel_bridge.spec.slices import ShapeStore, rank_parts
    cfg = GPTConfig.of_model(model)
    per = -(-cfg.vocab_size // 64) * 64 // serve_tp
    return {
        r: sum(
            t.numel() * 4
            for _, t in rank_parts(
                ShapeStore(cfg), serve_tp, r, (min(r * per, cfg.vocab_size), min((r + 1) * per, cfg.vocab_size))
            )
        )
        for r in range(serve_tp)
    }


def _push_and_compare(root, serve_tp, tie, train_tp=2, kv=CFG.num_query_groups):
    from parallel_bridge.adapters import megatron
    from parallel_bridge.sync import WeightSync

    ctx = context_from_torchrun(tp=train_tp, timeout_s=120)
    if ctx.rank == 0:
        _folder(root, tie, kv)
    cfg = CFG.replace(tie_embeddings=tie, num_query_groups=kv)
    torch.manual_seed(0)
    out = {}
    with megatron.cpu_compat():
        model = HybridLlama(cfg, ctx)
        with _serving(ctx.rank == 0, root, serve_tp) as llm:
            sync = WeightSync(ctx, model, llm, timeout_s=60)
            before = served_logprobs(llm) if llm else None
            reports = []
            for step in range(2):
                if step:
                    _train(model, 3, seed=step)
                reports.append(sync.push())
                ref = trainer_logprobs(model)
                if llm:
                    got = served_logprobs(llm)
                    out[f"diff{step}"] = parity_of(got, ref)
                    out[f"version{step}"] = llm.get_weight_version()
                    if step == 0:
                        out["before"] = float((before - ref[0]).abs().max())
            out["reports"] = reports
            out["own_bytes"] = _serving_rank_bytes(model, serve_tp)
            sync.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "serve_tp,tie,train_tp,kv",
    [pytest.param(1, False, 2, 2, marks=pytest.mark.parity), (2, True, 2, 2), (2, False, 1, 1)],
    ids=["tp2-to-tp1", "tp2-to-tp2-tied", "tp1-to-tp2-kv-replicated"],
)
def test_push_matches_trainer(tmp_path, monkeypatch, serve_tp, tie, train_tp, kv):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1" if serve_tp == 2 else "auto")
    res = run_distributed(
        _push_and_compare, train_tp, str(tmp_path / "m"), serve_tp, tie, train_tp, kv, timeout_s=400
    )
    r0 = res[0]
    label = f"trainer tp{train_tp} -> engine tp{serve_tp}, tied={tie}, kv heads {kv}"
    print(f"\n[{label}] before push {r0['before']:.2e}")
    assert r0["before"] > 1e-2  # dummy weights: the push has something to prove
    assert_parity(r0["diff0"], f"{label}: after push 1")
    assert_parity(r0["diff1"], f"{label}: after train + push 2")
    assert (r0["version0"], r0["version1"]) == ("1", "2")
    for rep in r0["reports"]:
        assert rep.pieces_verified > 0
        assert rep.received_bytes == r0["own_bytes"]  # each serving rank received exactly its slices
    # trainer side: every rank holds the same report of what each rank sent
    assert all(r["reports"][0].sent_bytes == res[0]["reports"][0].sent_bytes for r in res)


def _expect_sync_error(fn, *needles):
    from parallel_bridge.sync import SyncError

    try:
        fn()
    except SyncError as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        return msg if not missing else f"MISSING {missing} IN: {msg}"
    return "NO ERROR"


def _failures(root):
    from parallel_bridge.adapters import megatron
    from parallel_bridge.sync import WeightSync
    from parallel_bridge.sync.shards import ShardWriter

    ctx = context_from_torchrun(tp=2, timeout_s=120)
    if ctx.rank == 0:
        _folder(root)
    torch.manual_seed(0)
    out, unchanged = {}, []
    with megatron.cpu_compat():
        model = HybridLlama(CFG, ctx)
        with _serving(ctx.rank == 0, root, 1) as llm:
            sync = WeightSync(ctx, model, llm, timeout_s=8)
            sync.push()
            baseline = served_logprobs(llm) if llm else None
            _train(model, 2, seed=7)  # the trainer moves on; failed pushes must not reach the engine

            def still_baseline():
                if llm:
                    unchanged.append(bool(torch.equal(served_logprobs(llm), baseline)))

            # 1. bytes flipped in shared memory after publishing (rank 1's shard)
            commit = ShardWriter.commit

            def corrupting_commit(self, version, meta):
                commit(self, version, meta)
                if self.tp_rank == 1:
                    self._buf[100] ^= 0x10

            ShardWriter.commit = corrupting_commit
            out["checksum"] = _expect_sync_error(sync.push, "checksum mismatch", "keeps serving version 1")
            ShardWriter.commit = commit
            still_baseline()

            # 2. a tensor the trainer did not write this round (stale bytes with valid old hashes)
            write = ShardWriter.write

            def skipping_write(self, name, tensor):
                return 0 if name.endswith("layers.1.mlp.linear_fc2.weight") else write(self, name, tensor)

            ShardWriter.write = skipping_write
            out["stale"] = _expect_sync_error(sync.push, "layers.1.mlp.linear_fc2.weight", "was not written")
            ShardWriter.write = write
            still_baseline()

            # 3. a push while one is running (re-entered from the engine client on rank 0)
            if llm:
                client = sync.sender.client[0]
                start = client.start_weight_update
                client.start_weight_update = lambda: sync.push()
            out["busy"] = _expect_sync_error(sync.push, "already in progress")
            if llm:
                client.start_weight_update = start
            still_baseline()

            # 4. unknown backend: refused on every rank before anything is set up
            out["backend"] = _expect_sync_error(
                lambda: WeightSync(ctx, model, llm, backend="nope"), "'nope'", "parallel_bridge_shm"
            )

            # 5. a model of other sizes: refused at init, naming the tensor and both shapes
            other = HybridLlama(CFG.replace(ffn_hidden_size=384), ctx)
            out["shape"] = _expect_sync_error(
                lambda: WeightSync(ctx, other, llm), "mlp.gate_up_proj.weight", "(768, 128)", "(512, 128)"
            )
            still_baseline()

            # 6. the good sync still works after all that
            sync.push()
            ref = trainer_logprobs(model)
            recovered = served_logprobs(llm) if llm else None
            if llm:
                out["recovered"] = parity_of(recovered, ref)

            # 7. a trainer rank that never joins the round (dead or hung): rank 0 times out
            if ctx.rank == 0:
                with torch.no_grad():  # a replicated weight rank 0 publishes: the push would change it
                    model.decoder.final_layernorm.weight.mul_(1.5)
                out["dead"] = _expect_sync_error(sync.push, "did not all publish")
                out["after_dead"] = bool(torch.equal(served_logprobs(llm), recovered))
    # 8. an engine that is shut down (collective: both trainer ranks set up a new sync)
    out["shutdown"] = _expect_sync_error(lambda: WeightSync(ctx, model, llm, timeout_s=30), "vLLM engine")
    out["unchanged"] = unchanged
    return out


@pytest.mark.slow
def test_failed_rounds_keep_the_old_weights(tmp_path):
    res = run_distributed(_failures, 2, str(tmp_path / "m"), timeout_s=400)
    r0, r1 = res
    for case in ("checksum", "stale", "busy", "backend", "shape"):
        print(f"\n[{case}] {r0[case]}")
        assert not r0[case].startswith(("NO ERROR", "MISSING")), r0[case]
        assert not r1[case].startswith(("NO ERROR", "MISSING")), r1[case]  # every trainer rank raises
    assert r0["unchanged"] == [True] * 4
    assert_parity(r0["recovered"], "good push after the failures")
    print(f"[dead] {r0['dead']}")
    assert "did not all publish" in r0["dead"]
    assert r0["after_dead"]  # still serving the last good push
    print(f"[shutdown] {r0['shutdown']}")
    assert not r0["shutdown"].startswith(("NO ERROR", "MISSING")), r0["shutdown"]


PP_VARIANT = {"groups": 2, "tied": False, "vocab": 100, "padded": 128, "seed": 4}


def _pp_push(root):
    """A megatron-core GPTModel at TP=2 x PP=2 (4 ranks) saved with dist_checkpointing and pushed to
    an engine at TP=2; returns the engine's first-step log-softmax for the checkpoint tests' prompts."""
    import _megatron_ckpt as mc
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist
    from parallel_bridge.sync import WeightSync

    v = PP_VARIANT
    ctx = context_from_torchrun(tp=2, pp=2, timeout_s=120)
    out = {}
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, v["seed"])
        _, model = mc.build(ctx, v)
        gpt = mc.spec_of(v)
        save_torch_dist(ctx, model, os.path.join(root, "ckpt"), 10, gpt)
        if ctx.rank == 0:
            os.makedirs(os.path.join(root, "serve"))
            with open(os.path.join(root, "serve", "config.json"), "w") as f:
                json.dump(gpt.to_hf(), f)
        with _serving(ctx.rank == 0, os.path.join(root, "serve"), 2, vocab=v["vocab"]) as llm:
            sync = WeightSync(ctx, model, llm, vocab_size=v["vocab"], timeout_s=60)
            report = sync.push()
            if llm:
                params = SamplingParams(max_tokens=1, temperature=0, logprobs=v["vocab"], detokenize=False)
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in mc.PROMPTS], params, use_tqdm=False)
                out["served"] = [
                    [o.outputs[0].logprobs[0][t].logprob for t in range(v["vocab"])] for o in outs
                ]
                out["report"] = report
            sync.close()
    return out


@pytest.mark.slow
def test_pipeline_parallel_trainer_pushes_its_stages(tmp_path, monkeypatch):
    """Each PP stage publishes its own layers (global indices); the engine equals Megatron's own forward."""
    import _megatron_ckpt as mc

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    res = run_distributed(_pp_push, 4, str(tmp_path), timeout_s=400)
    reference = run_distributed(mc.reference_from_dist, 1, str(tmp_path / "ckpt"), PP_VARIANT)[0]
    gap = parity.Gap.between(res[0]["served"], [r[1] for r in reference])
    assert_parity((gap, parity.logprob_bound(max(r[2] for r in reference), mc.length(PP_VARIANT))),
                  "trainer tp2 x pp2 -> engine tp2, vs Megatron's forward")
    report = res[0]["report"]
    # every trainer rank of the 4 (2 TP x 2 PP, one DP replica) published, each once
    assert sorted(report.sent_bytes) == [0, 1, 2, 3]
    assert len(report.received_bytes) == 2


def _deepspeed_push(root):
    """TP=1 x DP=2 DeepSpeed trainers: ZeRO-3 (parameters partitioned, gathered one at a time) pushes
    its initial weights; ZeRO-1 trains two steps and pushes. Only DP rank 0 publishes."""
    import deepspeed

    from parallel_bridge.adapters import deepspeed as pds
    from parallel_bridge.adapters import megatron
    from parallel_bridge.sync import WeightSync

    deepspeed.init_distributed(dist_backend="gloo")
    ctx = context_from_torchrun(tp=1, timeout_s=120)
    if ctx.rank == 0:
        _folder(root)
    out = {}
    with megatron.cpu_compat():
        with _serving(ctx.rank == 0, root, 1) as llm:
            for stage, seed in ((3, 1), (2, 3), (1, 2)):
                torch.manual_seed(seed)
                model = HybridLlama(CFG, ctx)
                ref = trainer_logprobs(model) if stage == 3 else None
                config = {
                    "train_micro_batch_size_per_gpu": 1,
                    "gradient_accumulation_steps": 1,
                    "gradient_clipping": 0.0,
                    "zero_optimization": {"stage": stage},
                    "zero_allow_untested_optimizer": True,
                }
                opt = torch.optim.SGD(model.parameters(), lr=0.2)
                engine, *_ = pds.initialize(ctx, model, config, optimizer=opt)
                if stage in (1, 2):  # ZeRO-1/2: train two steps first
                    g = torch.Generator().manual_seed(ctx.dp_rank)
                    for _ in range(2):
                        ids = torch.randint(0, CFG.vocab_size, (24,), generator=g)
                        engine.backward(engine.module.loss(ids, torch.arange(24), torch.roll(ids, -1)))
                        engine.step()
                    ref = trainer_logprobs(engine.module)
                sync = WeightSync(ctx, engine, llm, timeout_s=60)
                report = sync.push()
                if llm:
                    out[stage] = {
                        "diff": parity_of(served_logprobs(llm), ref),
                        "sent": report.sent_bytes,
                        "bytes": sum(p.numel() * p.element_size() for p in model.parameters())
                        if stage == 1
                        else None,
                    }
                sync.close()
                engine.destroy()
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_cpu_extension")
def test_deepspeed_zero_trainers_push(tmp_path):
    pytest.importorskip("deepspeed")
    r0 = run_distributed(_deepspeed_push, 2, str(tmp_path / "m"), timeout_s=400)[0]
    for stage in (3, 2, 1):
        assert_parity(r0[stage]["diff"], f"deepspeed zero-{stage} tp1 x dp2 -> engine tp1")
        assert list(r0[stage]["sent"]) == [0]  # the DP replica did not send twice
    assert r0[1]["sent"][0] == r0[1]["bytes"]  # the whole model, once


def _http_logprobs(url, prompt, k):
    import requests

    body = {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": k,
            "return_tokens_as_token_ids": True}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    return torch.tensor([top[f"token_id:{t}"] for t in range(k)], dtype=torch.float64)


def _http_greedy(url, prompt, n):
    import requests

    body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_tokens_as_token_ids": True, "logprobs": 0}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _server_push(url):
    """Trainer TP=2 pushing into a `vllm serve` server; rank 0 keeps requests flowing during a push."""
    import threading

    from parallel_bridge.adapters import megatron
    from parallel_bridge.sync import ServerClient, WeightSync

    ctx = context_from_torchrun(tp=2, timeout_s=120)
    torch.manual_seed(0)
    out = {}
    with megatron.cpu_compat():
        model = HybridLlama(CFG, ctx)
        sync = WeightSync(ctx, model, ServerClient(url) if ctx.rank == 0 else None, timeout_s=60)
        sync.push()
        ref = trainer_logprobs(model)
        if ctx.rank == 0:
            got = torch.stack([_http_logprobs(url, p, CFG.vocab_size) for p in PROMPTS])
            out["diff"] = parity_of(got, ref)
            old = _http_greedy(url, PROMPTS[1], 24)
        _train(model, 3, seed=3)
        seen, stop = [], threading.Event()

        def traffic():
            while not stop.is_set():
                seen.append(_http_greedy(url, PROMPTS[1], 24))

        thread = threading.Thread(target=traffic) if ctx.rank == 0 else None
        if thread:
            thread.start()
            while len(seen) < 2:  # requests are flowing before the round starts
                threading.Event().wait(0.05)
        sync.push()
        if thread:
            threading.Event().wait(1.0)
            stop.set()
            thread.join()
            new = _http_greedy(url, PROMPTS[1], 24)
            out["mixed"] = [s for s in seen if s not in (old, new)]
            out["counts"] = (sum(s == old for s in seen), sum(s == new for s in seen), len(seen))
            out["changed"] = old != new
        sync.close()
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import subprocess
    import sys
    import time

    import requests

    from parallel_bridge.sync import BACKEND
    from parallel_bridge.testing import free_port

    folder = tmp_path_factory.mktemp("served")
    _folder(str(folder))
    port = free_port()
    env = dict(os.environ)
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_CPU_OMP_THREADS_BIND="auto")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", "m", "--load-format", "dummy", "--skip-tokenizer-init",
        "--dtype", "float32", "--max-model-len", "64", "--enforce-eager",
        "--max-logprobs", str(CFG.vocab_size), "--host", "127.0.0.1", "--port", str(port),
        "--weight-transfer-config", json.dumps({"backend": BACKEND}),
    ]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {(folder / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vllm serve did not become healthy in 240 s")
            time.sleep(1)
        yield url
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_push_into_a_vllm_server_while_it_serves(server):
    r0 = run_distributed(_server_push, 2, server, timeout_s=300)[0]
    assert_parity(r0["diff"], "trainer tp2 -> vllm serve")
    print(f"\n[trainer tp2 -> vllm serve] "
          f"completions during the push (old, new, all): {r0['counts']}")
    assert r0["changed"]  # the second push changed what the server answers
    assert r0["mixed"] == []  # every completion ran wholly on the old weights or wholly on the new


def _iterate_source(root):
    from parallel_bridge.spec.schema import to_hf
    from parallel_bridge.sync import MegatronWeightSource

    ctx = context_from_torchrun(tp=2, timeout_s=60)
    torch.manual_seed(0)
    model = HybridLlama(CFG, ctx)
    source = MegatronWeightSource(ctx, model)
    source.publish_local(root)
    meta = [(m.name, m.shape) for m in source.metadata()]
    got = {name: t for name, t in source}
    cfg = GPTConfig.of_model(model)
    want = {}
    for name, t in model.full_state_dict().items():  # the gathered reference
        want.update(dict(to_hf(name, t, cfg)))
    if ctx.rank != 0:
        return got == {}
    return (
        [n for n, _ in meta] == list(got)
        and all(tuple(got[n].shape) == s for n, s in meta)
        and set(got) == set(want)
        and all(torch.equal(got[n], want[n]) for n in want)
    )


@pytest.mark.slow
def test_source_yields_full_hf_tensors_for_vllms_nccl_backend(tmp_path):
    """For vLLM's own full-tensor backends (nccl on GPUs): metadata() and iteration agree, in order,
    and equal the TP-gathered model under Hugging Face names; only trainer rank 0 yields."""
    assert run_distributed(_iterate_source, 2, str(tmp_path / "shm"), timeout_s=120) == [True, True]


def _gpt_model(**fields):
    """What GPTConfig.of_model reads of a megatron-core GPTModel: a Llama-style TransformerConfig with ``fields``."""
    import types

    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False, **fields,
    )
    return types.SimpleNamespace(
        config=config, vocab_size=96, max_sequence_length=64, share_embeddings_and_output_weights=False
    )


@pytest.mark.parametrize("field,value", [("rotary_interleaved", True), ("apply_residual_connection_post_layernorm", True)])
def test_math_changing_megatron_settings_are_refused(field, value):
    """A GPTModel whose config changes the math vLLM's Llama family computes is refused by name, not synced."""
    pytest.importorskip("megatron.core")
    with pytest.raises(ValueError, match=f"{field}=.*refused"):
        GPTConfig.of_model(_gpt_model(**{field: value}))
    assert GPTConfig.of_model(_gpt_model()).num_layers == 2


@pytest.mark.parametrize(
    "field,value,family,mapped",
    [
        ("qk_layernorm", True, "qwen3", {"qk_layernorm": True}),
        ("add_qkv_bias", True, "qwen2", {"add_qkv_bias": True}),
        ("window_size", (63, 0), "mistral", {"sliding_window": 64}),
    ],
)
def test_family_settings_map_to_their_family(field, value, family, mapped):
    """QK layernorm (Qwen3), QKV biases (Qwen2) and a causal sliding window (Mistral) are mapped, so the sync
    serves vLLM's model of that family."""
    pytest.importorskip("megatron.core")
    cfg = GPTConfig.of_model(_gpt_model(**{field: value}))
    assert cfg.family.model_type == family and {k: getattr(cfg, k) for k in mapped} == mapped


def _world_mismatch():
    from parallel_bridge.sync import SyncError, WeightSync

    ctx = context_from_torchrun(tp=2, timeout_s=60)
    model = HybridLlama(CFG, ctx)
    try:  # a four-rank layout in a two-rank job
        WeightSync(ParallelContext(tp=2, dp=2, rank=ctx.rank), model, object())
    except SyncError as e:
        return str(e)
    return "NO ERROR"


@pytest.mark.slow
def test_trainer_world_that_does_not_match_the_context():
    msgs = run_distributed(_world_mismatch, 2, timeout_s=60)
    assert all("torch.distributed world (2 ranks) does not match the context's 4" in m for m in msgs), msgs
