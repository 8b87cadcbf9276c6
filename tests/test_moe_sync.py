"""Live weight sync of an MoE trainer: megatron-core's Mixtral-like GPTModel at EP=2 (and TP=2 x EP=2, expert
TP 2) pushes into a running vLLM engine (its own MixtralForCausalLM, CPU fused-MoE kernel) at TP=1 and TP=2.

Each expert-parallel rank publishes its own experts under their global index; each serving rank receives its
slices of every expert. The engine starts from dummy weights; after each push, and after the weights move and a
second push (the second load is where vLLM #42821 corrupted MoE models), its first-step log-softmax matches
megatron-core's forward within the parity rule's bound and the greedy tokens are equal; every serving rank
received exactly its slices (bytes), every piece hash-verified.
"""

import json
import zlib

import pytest
import torch

from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import compare  # noqa: E402
from test_moe import FAMILIES  # noqa: E402

VARIANT = FAMILIES["mixtral"]


def _engine(folder, serve_tp):
    from vllm.config import WeightTransferConfig

    from parallel_bridge.serving.engines import llm_engine
    from parallel_bridge.sync import BACKEND

    return llm_engine(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="float32",
                      max_model_len=64, enforce_eager=True, tensor_parallel_size=serve_tp,
                      max_logprobs=VARIANT["vocab"], weight_transfer_config=WeightTransferConfig(backend=BACKEND))


def _served(llm):
    """(greedy tokens, first-step log-softmax over the vocabulary) per prompt from the engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=mc.STEPS, temperature=0, logprobs=VARIANT["vocab"], detokenize=False,
                            ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in mc.PROMPTS], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [o.outputs[0].logprobs[0][t].logprob for t in range(VARIANT["vocab"])])
            for o in outs]


@torch.no_grad()
def _move(ctx, model):
    """A training step's worth of change, the same on every replica of a tensor: noise seeded by the tensor's
    global name and its shard (each expert, each TP shard its own)."""
    from parallel_bridge.spec import moe, schema
    from parallel_bridge.spec.tp_split import experts_per_rank

    per_rank = experts_per_rank(VARIANT["config"]["num_moe_experts"], ctx.ep)
    for name, p in model.named_parameters():
        name = moe.global_expert_name(name, ctx.ep_rank, per_rank)
        split = schema.sharding_of(name).dim is not None  # a replicated tensor: the same on every rank
        shard = (ctx.etp_rank if moe.is_expert(name) else ctx.tp_rank) if split else 0
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shard}".encode()))
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def _push_twice(root, tp, ep, serve_tp):
    from parallel_bridge.adapters import megatron
    from parallel_bridge.parallel.launch import context_from_torchrun
    from parallel_bridge.spec.slices import ShapeStore, rank_parts
    from parallel_bridge.sync import WeightSync

    ctx = context_from_torchrun(tp=tp, ep=ep, timeout_s=120)
    spec = mc.spec_of(VARIANT)
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.json").write_text(json.dumps(spec.to_hf()))
    out = {}
    with megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        megatron.model_parallel_manual_seed(ctx, VARIANT["seed"])
        _, model = mc.build(ctx, VARIANT)
        engine = _engine(root, serve_tp) if ctx.rank == 0 else None
        llm = engine.__enter__() if engine else None
        try:
            sync = WeightSync(ctx, model, llm, config=spec, timeout_s=120)
            for step in range(2):
                if step:
                    _move(ctx, model)
                report = sync.push()
                reference = mc.megatron_decode(ctx, model, VARIANT["vocab"])
                if llm:
                    out[step] = {"served": _served(llm), "reference": reference, "report": report,
                                 "version": llm.get_weight_version()}
            sync.close()
        finally:
            if engine:
                engine.__exit__(None, None, None)
    per = -(-spec.vocab_size // serve_tp)
    out["own_bytes"] = {r: sum(t.numel() * 4 for _, t in rank_parts(ShapeStore(spec), serve_tp, r, (
        min(r * per, spec.vocab_size), min((r + 1) * per, spec.vocab_size)))) for r in range(serve_tp)}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep,serve_tp", [(1, 2, 1), (2, 2, 2)], ids=["ep2-to-tp1", "tp2ep2-to-tp2"])
def test_moe_trainer_pushes_twice(tmp_path, monkeypatch, tp, ep, serve_tp):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1" if serve_tp == 2 else "auto")
    r0 = run_distributed(_push_twice, tp * ep, tmp_path / "m", tp, ep, serve_tp, timeout_s=500)[0]
    for step in range(2):
        got = r0[step]
        compare(got["served"], got["reference"], f"MoE trainer tp{tp} ep{ep} -> engine tp{serve_tp}, push {step + 1}",
                mc.length(VARIANT))
        assert got["version"] == str(step + 1)
        assert got["report"].pieces_verified > 0
        assert got["report"].received_bytes == r0["own_bytes"], (got["report"].received_bytes, r0["own_bytes"])
    assert r0[0]["reference"] != r0[1]["reference"]  # the second push had something new to deliver
