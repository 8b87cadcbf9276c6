"""``parallel-bridge rl --moe``: the RL loop with a Mixtral-like policy, and routing replay (R3).

The policy is the dense one's sizes with every MLP an MoE layer (8 experts, top-2, softmax over the chosen),
trained by megatron-core at EP=2 (each expert-parallel rank holds 4 experts; every rank feeds the same batch),
served by vLLM's own ``MixtralForCausalLM``. Per step:

1. the engine samples; for every token it was fed (prompt and completion, all but the last) it files the
   experts it routed it to in each layer (:mod:`parallel_bridge.adapters.vllm_routing`), and the log-prob of
   every token it sampled;
2. the trainer runs its forward with its own router, recording its top-k: the fraction of (token, layer)
   routes where it chose other experts than the engine did, and the train/serve gap with its own routing;
3. the loss's forward: with ``--routing-replay on`` every token goes to the experts the engine chose
   (megatron-core's ``RouterReplay``, :mod:`parallel_bridge.adapters.megatron_routing`), so the trainer's
   log-probs, and the gradient, are those of the policy that sampled; ``off`` keeps the trainer's own routing.
   The gap of that forward is the step's ``mismatch``;
4. REINFORCE update, push, held-out greedy accuracy through the engine.

Why the engine's routing: the samples, their rewards and their log-probs came from it; an importance ratio
or an on-policy gradient is only right for the routes that produced them. Replay changes which experts run,
not the router's scores: the router still learns from the gathered scores of the replayed experts.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch

from parallel_bridge import ParallelContext
from parallel_bridge.cli import rl_task as rl

MODEL = rl.MODEL.replace(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128)
"""The MoE policy: the dense policy's attention and sizes, each MLP 8 SwiGLU experts of 128 columns, top-2."""

MODES = {"off": ("off",), "on": ("on",), "both": ("off", "on")}
"""``--routing-replay`` -> the loops run, in order, each from the same warm-up and seed."""


def build(ctx: ParallelContext, seed: int) -> Any:
    """The MoE policy's megatron-core GPTModel, its routers able to record and replay routes."""
    from parallel_bridge.adapters import megatron

    megatron.model_parallel_manual_seed(ctx, seed)
    return megatron.gpt_model(ctx, MODEL, init_method_std=0.02, moe_enable_routing_replay=True)[1]


def sample(llm, tokenizer, batch, samples: int, seed: int) -> rl.Drawn:
    """:func:`rl.sample` with the routes the engine took for every token it was fed."""
    from parallel_bridge.adapters.vllm_routing import captured_routes

    with captured_routes(llm) as box:
        drawn = rl.sample(llm, tokenizer, batch, samples, seed)
    drawn.routes = [box[0].of(s) for s in drawn.seqs]
    return drawn


def _engine_routes(own: torch.Tensor, drawn: rl.Drawn) -> tuple[torch.Tensor, torch.Tensor]:
    """(the engine's routes laid over the trainer's own ``[batch, seq, layers, k]``, the positions they
    cover): padding keeps the trainer's routes."""
    given, real = own.clone(), torch.zeros(own.shape[:2], dtype=torch.bool)
    for i, r in enumerate(drawn.routes):
        given[i, : len(r)] = torch.as_tensor(r)
        real[i, : len(r)] = True
    return given, real


def _gap(logp: torch.Tensor, drawn: rl.Drawn) -> Any:
    """The parity rule's gap between the trainer's log-probs of the sampled tokens and the engine's."""
    from parallel_bridge.numerics import parity

    trained = [[float(logp[i, start - 1 + j]) for j in range(len(lps))]
               for i, (start, lps) in enumerate(zip(drawn.starts, drawn.served))]
    return parity.Gap.between(trained, drawn.served)


def step_fn(mode: str) -> Callable[..., tuple[rl.Drawn, dict]]:
    """One RL step of the MoE policy with routing replay ``mode`` (``on``/``off``)."""

    def step(args, ctx: ParallelContext, model, optim, llm, tokenizer, batch, step: int) -> tuple[rl.Drawn, dict]:
        from parallel_bridge.adapters import megatron_routing as routing
        from parallel_bridge.numerics import parity

        drawn = rl.shared(llm, lambda: sample(llm, tokenizer, batch, args.samples, args.seed * 100003 + step))
        with torch.no_grad(), routing.recorded_routes(model, len(drawn.seqs)) as box:
            own_logp, _ = rl.token_logprobs(model, drawn.seqs, drawn.starts)
        given, real = _engine_routes(box[0], drawn)
        differ, compared = routing.disagreement(box[0], given, real)
        zmax = rl.max_abs_logit(ctx, model, drawn.seqs)
        with routing.replayed_routes(model, given) if mode == "on" else contextlib.nullcontext():
            logp, mask = rl.token_logprobs(model, drawn.seqs, drawn.starts)
        gap, own_gap = _gap(logp.detach(), drawn), _gap(own_logp, drawn)
        rl.reinforce(model, optim, drawn, logp, mask, expert_scale=1 / ctx.ep)
        bound = parity.bound_for(MODEL, zmax, MODEL.max_position_embeddings, getattr(torch, args.serve_dtype))
        return drawn, {
            "reward": sum(drawn.rewards) / len(drawn.rewards), "routing_replay": mode,
            "mismatch_max": gap.max, "mismatch_mean": gap.mean,
            "own_routing_mismatch_max": own_gap.max, "own_routing_mismatch_mean": own_gap.mean,
            "routes_differ": differ, "routes_compared": compared, "route_disagreement": differ / compared,
            "max_abs_logit": zmax, "bound_max": bound.max, "bound_mean": bound.mean,
        }

    return step


def after_push(ctx: ParallelContext, model, llm, tokenizer, held, drawn: rl.Drawn) -> dict:
    """Right after the push: held-out greedy accuracy and the engine's weight version (the gap was measured
    in the step, on the weights the engine sampled with)."""
    if llm is None:
        return {}
    return {"heldout_acc": rl.greedy_accuracy(llm, tokenizer, held), "weights_version": int(llm.get_weight_version())}


def check_args(args: argparse.Namespace, experts: int = MODEL.num_moe_experts) -> str | None:
    """The first problem with the MoE options (None when there is none), as one line."""
    if args.routing_replay != "off" and not args.moe:
        return f"--routing-replay {args.routing_replay} needs an MoE policy (--moe): the dense policy has no router"
    if args.train_ep != 1 and not args.moe:
        return f"--train-ep {args.train_ep} needs an MoE policy (--moe): the dense policy has no experts"
    if args.serve_dtype != "float32" and not args.moe:
        return f"--serve-dtype {args.serve_dtype} is for the MoE routing study (--moe); the dense loop serves float32"
    if args.moe and experts % args.train_ep:
        return (f"--train-ep {args.train_ep} does not divide the MoE policy's {experts} experts (each expert-parallel "
                f"rank holds the same number of whole experts)")
    return None


