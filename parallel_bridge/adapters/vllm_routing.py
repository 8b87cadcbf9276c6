"""The experts a running vLLM engine routed each token to, captured in its workers (routing replay, R3).

vLLM 0.32 returns routed experts only through its model runner V2 (``enable_return_routed_experts``): on the
CPU build, ``LLM(enable_return_routed_experts=True)`` fails in ``VllmConfig`` validation ("AuxOutput Connector
requires Model Runner V2"), and V2 needs Triton, which the CPU build has not. This module is the missing half,
on vLLM's own hook: each MoE layer's router (``BaseRouter.set_capture_fn``, the callback vLLM's capturer uses)
hands over its top-k expert ids inside the forward, and a forward hook on the model files each row under the
token prefix it was computed for (the request's token ids up to its position, from the runner's batch). A
causal model's route at position ``p`` depends on tokens ``0..p`` only, so a prefix names it whatever the
request, its sample index or a prefix-cache hit. Capture runs only between :func:`captured_routes`'s enter
and exit, in every worker; worker 0's record is returned (TP workers route identically).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from parallel_bridge.adapters.vllm_numerics import NumericsExtension
from parallel_bridge.errors import BridgeError

EXTENSION = "parallel_bridge.adapters.vllm_routing.RoutingExtension"
"""The ``worker_extension_cls`` of an engine whose routes are captured (also carries the float32 check)."""


class RoutingError(BridgeError):
    """Routes could not be captured or do not cover the tokens asked for; the message says which."""


class _Recorder:
    """One worker's capture: the step's top-k ids per MoE layer, filed by token prefix after the forward."""

    def __init__(self, worker: Any, layers: int) -> None:
        self.runner = worker.model_runner
        self.layers = layers
        self.step: dict[int, Any] = {}
        self.inputs: tuple[Any, Any] | None = None
        self.routes: dict[tuple[int, ...], np.ndarray] = {}
        self.problem: str | None = None

    def capture(self, layer: int, topk_ids: Any) -> None:
        self.step[layer] = topk_ids.detach().to("cpu").numpy().copy()

    def begin(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.inputs = (None if ids is None else ids.to("cpu").numpy(), positions.to("cpu").numpy())
        self.step = {}

    def end(self, *_: Any) -> None:
        if not self.step or self.inputs is None:
            return
        if sorted(self.step) != list(range(self.layers)):
            self.problem = f"a forward routed in layers {sorted(self.step)}, the model has {self.layers} MoE layers"
            return
        ids, positions = self.inputs
        batch = self.runner.input_batch
        starts = self.runner.query_start_loc.np[: batch.num_reqs + 1]
        stacked = np.stack([self.step[layer] for layer in range(self.layers)], axis=1)  # [rows, layers, k]
        for i in range(batch.num_reqs):
            for row in range(int(starts[i]), int(starts[i + 1])):
                p = int(positions[row])
                prefix = batch.token_ids_cpu[i, : p + 1]
                if ids is not None and int(prefix[-1]) != int(ids[row]):
                    self.problem = f"row {row} of a forward holds token {int(ids[row])}, its request {int(prefix[-1])}"
                    return
                self.routes[tuple(int(t) for t in prefix)] = np.sort(stacked[row], axis=-1)


def _moe_runners(model: Any) -> list[Any]:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    runners = [m for m in model.modules() if isinstance(m, MoERunner)]
    if not runners:
        raise RoutingError("the engine's model has no MoE layer: routing replay needs an MoE policy")
    for r in runners:
        if r.is_monolithic or not isinstance(r.router, BaseRouter):
            raise RoutingError(f"MoE layer {r.layer_id} routes inside a monolithic kernel "
                               f"({type(r.router).__name__}): its top-k ids cannot be captured")
    return runners


class RoutingExtension(NumericsExtension):
    """Mixed into vLLM's worker class by ``worker_extension_cls``: start, take and stop route capture."""

    def parallel_bridge_capture_routes(self) -> None:
        runners = _moe_runners(self.model_runner.model)
        recorder = _Recorder(self, len(runners))
        for layer, runner in enumerate(sorted(runners, key=lambda r: r.layer_id)):
            runner.router.set_capture_fn(functools.partial(recorder.capture, layer))
        model = self.model_runner.model
        hooks = [model.register_forward_pre_hook(recorder.begin, with_kwargs=True),
                 model.register_forward_hook(recorder.end)]
        self._parallel_bridge_routes = (recorder, runners, hooks)

    def parallel_bridge_take_routes(self) -> tuple[str | None, list[list[int]], list[list[list[int]]]]:
        """Stop capturing; (problem or None, prefixes, their routes [layers][k]) recorded since the start."""
        recorder, runners, hooks = self._parallel_bridge_routes
        for runner in runners:
            runner.router.set_capture_fn(None)
        for h in hooks:
            h.remove()
        del self._parallel_bridge_routes
        if getattr(self, "rank", 0) != 0:  # TP workers route alike; worker 0 answers
            return recorder.problem, [], []
        keys = list(recorder.routes)
        return recorder.problem, [list(k) for k in keys], [recorder.routes[k].tolist() for k in keys]


class Routes:
    """The engine's routes by token prefix: ``of(seq)`` is ``[len(seq) - 1, layers, k]`` expert ids (sorted per
    token), the route of each position whose token was fed to the model (every one but the last)."""

    def __init__(self, prefixes: Sequence[Sequence[int]], routes: Sequence[Any]) -> None:
        self.by_prefix = {tuple(p): np.asarray(r, dtype=np.int64) for p, r in zip(prefixes, routes, strict=True)}

    def __len__(self) -> int:
        return len(self.by_prefix)

    def of(self, seq: Sequence[int]) -> np.ndarray:
        seq = tuple(int(t) for t in seq)
        try:
            return np.stack([self.by_prefix[seq[: p + 1]] for p in range(len(seq) - 1)])
        except KeyError:
            missing = next(p for p in range(len(seq) - 1) if seq[: p + 1] not in self.by_prefix)
            raise RoutingError(f"the engine recorded no route for position {missing} of {list(seq)}: it was not "
                               f"computed while routes were captured") from None


@contextlib.contextmanager
def captured_routes(llm: Any) -> Iterator[list[Routes]]:
    """A scope in which every forward of ``llm`` (built with ``worker_extension_cls=EXTENSION``) files its
    routes; on exit the list given holds one :class:`Routes` and every worker's routers are unhooked. The
    prefix cache is emptied on entry, so every token generated inside is computed (and routed) inside."""
    box: list[Routes] = []
    llm.reset_prefix_cache()  # a block cached before the scope would be reused without a route recorded
    llm.collective_rpc("parallel_bridge_capture_routes")
    try:
        yield box
    finally:
        taken = llm.collective_rpc("parallel_bridge_take_routes")
    problems = [p for p, _, _ in taken if p]
    if problems:
        raise RoutingError(f"route capture went wrong in a worker: {problems[0]}")
    _, prefixes, routes = taken[0]
    box.append(Routes(prefixes, routes))
