"""DeepSpeed adapter: ParallelContext -> DeepSpeed ``mpu``, DeepSpeed's groups, engines.

- :func:`make_mpu`: the duck-typed ``mpu`` that ``deepspeed.initialize(mpu=...)``
  reads its data/model/tensor/pipeline (and, with context parallelism,
  sequence) groups from, answering from the context's groups.
- :func:`expert_groups`: a scope in which the context's expert-parallel and
  expert-data-parallel groups are where ``deepspeed.utils.groups`` keeps them, so MoE
  layers find them instead of building their own (restored on exit).
- :func:`initialize`: ``deepspeed.initialize`` with the mpu, after checking the
  config's batch sizes against the data-parallel size.
- :func:`context_from_deepspeed`: the context DeepSpeed's own groups describe.

On CPU set ``DS_ACCELERATOR=cpu``; DeepSpeed then compiles a shared-memory
communication extension on first use (cached in ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from parallel_bridge.errors import (
    ConfigError,
    DistributedError,
    IntegrationError,
    MissingDependencyError,
    WrongTypeError,
)
from parallel_bridge.parallel.context import ParallelContext, context_matching

logger = logging.getLogger(__name__)


def import_deepspeed():
    """``deepspeed``, or an ImportError that says which extra to install."""
    try:
        import deepspeed
    except ImportError as e:
        raise MissingDependencyError(
            "deepspeed is not installed: install the extra with `pip install parallel-bridge[deepspeed]` "
            f"(DS_BUILD_OPS=0 pip install deepspeed>=0.19.8) ({e})"
        ) from e
    return deepspeed


def _getters(group: str) -> tuple[Callable[[Any], Any], Callable[[Any], int], Callable[[Any], int]]:
    """DeepSpeed's (process group, world size, rank) getters for the context group ``group``."""
    return (
        lambda self: self.ctx.group(group),
        lambda self: self.ctx.comm(group).size,
        lambda self: self.ctx.comm(group).rank_in_group,
    )


class DeepSpeedMPU:
    """DeepSpeed's model-parallel unit over a ParallelContext.

    "Model parallel" is tensor x pipeline (the ``mp`` group), as in Megatron; the
    slice-parallel methods (Megatron-DeepSpeed's name for tensor parallelism) are
    the tensor-parallel ones, the pipe-parallel ones the pipeline ones.
    """

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.ctx.ranks("dp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ctx.ranks("tp")[0]

    get_data_parallel_group, get_data_parallel_world_size, get_data_parallel_rank = _getters("dp")
    get_model_parallel_group, get_model_parallel_world_size, get_model_parallel_rank = _getters("mp")
    (
        get_tensor_model_parallel_group,
        get_tensor_model_parallel_world_size,
        get_tensor_model_parallel_rank,
    ) = _getters("tp")
    get_slice_parallel_group, get_slice_parallel_world_size, get_slice_parallel_rank = _getters("tp")
    (
        get_pipeline_model_parallel_group,
        get_pipeline_model_parallel_world_size,
        get_pipeline_model_parallel_rank,
    ) = _getters("pp")
    get_pipe_parallel_group, get_pipe_parallel_world_size, get_pipe_parallel_rank = _getters("pp")


class DeepSpeedSequenceParallelMPU(DeepSpeedMPU):
    """The mpu for contexts with context (sequence) parallelism: adds DeepSpeed's sequence methods.

    ZeRO then shards over data x sequence ranks (the ``dp_cp`` group).
    """

    get_sequence_parallel_group, get_sequence_parallel_world_size, get_sequence_parallel_rank = _getters("cp")
    (
        get_sequence_data_parallel_group,
        get_sequence_data_parallel_world_size,
        get_sequence_data_parallel_rank,
    ) = _getters("dp_cp")


class DeepSpeedUlyssesMPU(DeepSpeedSequenceParallelMPU):
    """Sequence parallelism alone (tp = pp = 1): DeepSpeed's Ulysses contract.

    DeepSpeed treats an mpu with ``initialize_sequence_parallel`` as
    sequence-parallel only (no model parallelism), so only this case has it.
    """

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        if sequence_parallel_size != self.ctx.cp:
            raise ConfigError(
                f"DeepSpeed asked for sequence parallel size {sequence_parallel_size}, "
                f"but the context has cp={self.ctx.cp}"
            )


def make_mpu(ctx: ParallelContext) -> DeepSpeedMPU:
    """The mpu for ``deepspeed.initialize(mpu=...)``; sequence methods only when ``ctx.cp > 1``."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() != ctx.world_size:
        raise ConfigError(
            f"the context describes {ctx.world_size} ranks (tp={ctx.tp} x pp={ctx.pp} x dp={ctx.dp} "
            f"x cp={ctx.cp}) but torch.distributed has {dist.get_world_size()}"
        )
    if ctx.cp == 1:
        return DeepSpeedMPU(ctx)
    if ctx.tp * ctx.pp == 1:
        return DeepSpeedUlyssesMPU(ctx)
    return DeepSpeedSequenceParallelMPU(ctx)


_EXPERT_DICTS = (
    ("_EXPERT_PARALLEL_GROUP", "ep", False),
    ("_EXPERT_PARALLEL_GROUP_RANKS", "ep", True),
    ("_EXPERT_DATA_PARALLEL_GROUP", "expt_dp", False),
    ("_EXPERT_DATA_PARALLEL_GROUP_RANKS", "expt_dp", True),
)
"""``deepspeed.utils.groups`` dicts keyed by expert-group name -> (context group, rank list or group)."""


@contextlib.contextmanager
def expert_groups(ctx: ParallelContext) -> Iterator[str]:
    """A scope in which ``deepspeed.utils.groups`` holds the context's expert-parallel and expert-data-parallel
    groups under DeepSpeed's name ``ep_size_{ep}`` (yielded), so MoE layers and the engine use them instead
    of building their own; what was there before is put back on exit. DeepSpeed's engine looks the groups
    up by name while it trains and saves, so keep the scope open for the engine's life.

    The context must use ``etp == tp`` (DeepSpeed has no separate expert TP degree here).
    """
    import_deepspeed()
    from deepspeed.utils import groups

    if ctx.etp != ctx.tp:
        raise ConfigError(
            f"DeepSpeed's expert groups assume etp == tp; the context has etp={ctx.etp}, tp={ctx.tp}"
        )
    name = f"ep_size_{ctx.ep}"
    missing = object()
    saved = {attr: getattr(groups, attr).get(name, missing) for attr, _, _ in _EXPERT_DICTS}
    for attr, group, ranks in _EXPERT_DICTS:
        getattr(groups, attr)[name] = ctx.ranks(group) if ranks else ctx.group(group)
    try:
        yield name
    finally:
        for attr, value in saved.items():
            if value is missing:
                getattr(groups, attr).pop(name, None)
            else:
                getattr(groups, attr)[name] = value


def check_batch_config(ctx: ParallelContext, config: dict[str, Any]) -> None:
    """Raise ValueError naming the numbers when the config's batch sizes don't fit the data-parallel size."""
    if not isinstance(config, dict):
        raise WrongTypeError(f"the DeepSpeed config must be a dict, got {type(config).__name__}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise WrongTypeError(f"DeepSpeed config {key}={value!r} must be an integer, not {type(value).__name__}")
        if value is not None and value < 1:
            raise ConfigError(f"DeepSpeed config {key}={value} must be >= 1")
    dp = ctx.dp * ctx.cp if ctx.cp > 1 else ctx.dp
    train = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    where = f"data-parallel size {dp} (dp={ctx.dp}" + (f" x cp={ctx.cp})" if ctx.cp > 1 else ")")
    if train is not None and micro is not None and accum is not None and train != micro * accum * dp:
        raise ConfigError(
            f"train_batch_size={train} != train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x {where} = {micro * accum * dp}"
        )
    for per_rank, label in (
        (micro, "train_micro_batch_size_per_gpu"),
        (accum, "gradient_accumulation_steps"),
    ):
        if train is not None and per_rank is not None and train % (per_rank * dp):
            raise ConfigError(f"train_batch_size={train} is not divisible by {label}={per_rank} x {where}")
    if train is not None and train % dp:
        raise ConfigError(f"train_batch_size={train} is not divisible by the {where}")
    if train is None and micro is None:
        raise ConfigError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")


def initialize(ctx: ParallelContext, model: Any, config: dict[str, Any], **kwargs: Any):
    """``deepspeed.initialize`` over the context: its mpu, batch sizes checked first.

    Returns what ``deepspeed.initialize`` returns (engine, optimizer, dataloader, scheduler). With expert
    parallelism, call it inside ``with expert_groups(ctx):`` and train inside that scope.
    """
    deepspeed = import_deepspeed()
    check_batch_config(ctx, config)
    if ctx.ep > 1:
        import torch.distributed as dist
        from deepspeed.utils import groups

        installed = groups._EXPERT_PARALLEL_GROUP.get(f"ep_size_{ctx.ep}")
        if installed is None or dist.get_process_group_ranks(installed) != ctx.ranks("ep"):
            raise ConfigError(
                f"the context has ep={ctx.ep}: call initialize and train inside `with expert_groups(ctx):`, "
                "so DeepSpeed's MoE layers use the context's expert groups"
            )
    if "mpu" in kwargs:
        raise ConfigError("pass the layout as the ParallelContext, not an mpu")
    return deepspeed.initialize(model=model, config=config, mpu=make_mpu(ctx), **kwargs)


def context_from_deepspeed(timeout_s: float = 600.0) -> ParallelContext:
    """The context that DeepSpeed's own groups describe (``deepspeed.utils.groups``), groups adopted.

    Without an mpu DeepSpeed is pure data parallel; expert groups set up by
    DeepSpeed (``ep_size_N``) give the expert degree.
    """
    import_deepspeed()
    import torch.distributed as dist
    from deepspeed.utils import bwc, groups

    if not dist.is_initialized():
        raise DistributedError("torch.distributed is not initialized: call deepspeed.init_distributed() first")
    mpu = groups.mpu
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = 1 if mpu is None else bwc.bwc_tensor_model_parallel_world_size(mpu)
    pp = 1 if mpu is None else bwc.bwc_pipeline_parallel_world_size(mpu)
    ep_names = sorted(groups._EXPERT_PARALLEL_GROUP, key=lambda n: int(n.rsplit("_", 1)[1]))
    ep = int(ep_names[-1].rsplit("_", 1)[1]) if ep_names else 1
    actual: dict[str, Any] = {"dp": groups._get_data_parallel_group()}
    if mpu is not None:
        actual["tp"] = bwc.bwc_tensor_model_parallel_group(mpu)
    if ep_names:
        actual["ep"] = groups._get_expert_parallel_group(ep_names[-1])
        actual["expt_dp"] = groups._get_expert_data_parallel_group(ep_names[-1])
    ranks = {n: dist.get_process_group_ranks(g) for n, g in actual.items()}
    sizes = (("tp", tp), ("ep", ep), ("dp", world // (tp * pp)), ("pp", pp))
    used = [a for a, size in sizes if size > 1] or ["dp"]
    degrees = {"tp": tp, "pp": pp, "dp": world // (tp * pp), "ep": ep}
    ctx = context_matching(degrees, rank, ranks, used, timeout_s)
    if ctx is not None:
        return ctx.with_groups(actual)
    raise IntegrationError(f"DeepSpeed's groups {ranks} match no rank order of tp={tp}, pp={pp}, ep={ep}")
