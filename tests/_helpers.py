"""Helpers the test modules share: greedy generation through a real vLLM engine, the parity comparison
against a reference (the bound is :mod:`parallel_bridge.numerics.parity`'s rule), and one forward/backward step
through a pipeline stage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.numerics import parity

KERNEL_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "PARALLEL_BRIDGE_KERNEL_CAP": "avx2",
}
"""The caps of ``make test-avx2`` (tests/test_kernels.py checks the Makefile holds the same and that every
library honours them)."""


INDUCTOR_CACHE_AVX2 = Path(__file__).resolve().parents[1] / ".cache" / "inductor-avx2"
"""torch.compile's cache for AVX2-capped processes: its keys miss ATEN_CPU_CAPABILITY, and an AVX2 process that
reused kernels an AVX-512 process had cached computed garbage (vLLM's vocabulary mask at TP=2: an IndexError)."""


def kernel_env(env: dict[str, str], capped: bool) -> dict[str, str]:
    """``env`` on the machine's best kernels, or capped at AVX2 (the caps, and vLLM's AVX2 kernel library
    through tests/kernel_caps/sitecustomize.py on PYTHONPATH)."""
    import os

    out = {k: v for k, v in env.items() if k not in KERNEL_CAPS and k != "TORCHINDUCTOR_CACHE_DIR"}
    caps_dir = str(Path(__file__).resolve().parent / "kernel_caps")
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != caps_dir]
    if capped:
        out.update(KERNEL_CAPS)
        out["TORCHINDUCTOR_CACHE_DIR"] = str(INDUCTOR_CACHE_AVX2)
        paths.insert(0, caps_dir)
    out["PYTHONPATH"] = os.pathsep.join(paths)
    return out


class OnDemand(dict):
    """A dict whose missing entries ``make(key)`` computes once, when first asked: a module's fixtures write only
    the checkpoints the selected tests read (the AVX2-capped run selects a few)."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> Any:
        self[key] = value = self.make(key)
        return value


def greedy(model, tp, prompts, max_tokens, *, logprobs=0, in_process=True, **engine_kwargs):
    """Per prompt: vLLM's greedy tokens and, per step, the logprobs it returned ({token: logprob}; the chosen
    token's with ``logprobs=0``, the top ``logprobs`` otherwise). ``in_process``: a TP=1 engine runs in this
    process; otherwise vLLM's own processes build the model (the plugin must register it there)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from parallel_bridge.serving.engines import in_process_engine, llm_engine

    engine_kwargs.setdefault("max_logprobs", max(logprobs, 20))
    with in_process_engine(tp if in_process else 0), llm_engine(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=64,
        enforce_eager=True,
        tensor_parallel_size=tp,
        **engine_kwargs,
    ) as llm:
        # ignore_eos: the reference decodes a fixed number of steps, whatever token comes
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, logprobs=logprobs, detokenize=False, ignore_eos=True
        )
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [
            (list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs
        ]


def first_step_and_tokens(model, tp, vocab, prompts, steps, **engine_kwargs):
    """Per prompt: vLLM's greedy tokens and its full first-step log-softmax over ``vocab`` tokens."""
    served = greedy(model, tp, prompts, steps, logprobs=vocab, **engine_kwargs)
    return [(tokens, [steps_[0][t] for t in range(vocab)]) for tokens, steps_ in served]


def hf_decode(model, prompts, steps, vocab):
    """transformers' forward: per prompt, greedy tokens, the first-step log-softmax over ``vocab`` tokens and
    the largest |logit| at any position (the parity rule's scale)."""
    out = []
    for prompt in prompts:
        ids, first, zmax = list(prompt), None, 0.0
        for step in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :, :vocab].double()
            zmax = max(zmax, logits.abs().max().item())
            lp = torch.log_softmax(logits[-1], -1)
            first = lp if step == 0 else first
            ids.append(int(lp.argmax()))
        out.append((ids[len(prompt) :], first.tolist(), zmax))
    return out


def compare(served, reference, label: str, length: int) -> parity.Gap:
    """Assert equal greedy tokens prompt by prompt, and logprob values within the parity rule's bound (max and
    mean) for ``length`` summed terms per logit, scaled by the reference's largest |logit|; return the gap.

    ``served``: (tokens, values, ...) per prompt; ``reference``: (tokens, values, largest |logit|) per prompt, values
    compared element by element.
    """
    for row, ref in zip(served, reference, strict=True):
        assert row[0] == ref[0], (label, row[0], ref[0])
    gap = parity.Gap.between([row[1] for row in served], [ref[1] for ref in reference])
    bound = parity.logprob_bound(max(r[2] for r in reference), length)
    print(f"\n[{label}] greedy tokens equal; |d logprob| max {gap.max:.2e} mean {gap.mean:.2e} "
          f"(rule: {bound.describe()})")
    return bound.check(gap, label)


def pipeline_step(
    ctx,
    first_input: torch.Tensor | None,
    input_shape: tuple[int, ...],
    stage: Callable[[torch.Tensor | None], torch.Tensor],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor | None:
    """One forward and backward through this rank's pipeline stage over the context's pp group: receive
    the activation (``input_shape``) from the previous stage (the first takes ``first_input``), run ``stage``,
    send its output on, and send the input's gradient back. Returns the loss on the last stage."""
    pp = ctx.comm("pp")
    x = first_input if pp.is_first else pp.recv_prev(torch.empty(input_shape)).requires_grad_(True)
    out = stage(x)
    loss = None
    if pp.is_last:
        loss = loss_of(out)
        loss.backward()
    else:
        pp.send_next(out.detach())
        out.backward(pp.recv_next(torch.empty_like(out)))
    if not pp.is_first:
        pp.send_prev(x.grad)
    return loss
