"""megatron-core's ``parallel_state`` globals and the ParallelContext: bind the context's groups to them
for a scope (restored after), read a context back from them, and Megatron's activation buffer.

Supported: megatron-core 0.16.1 (Python 3.11) and 0.19.x. The only differences
this touches are which ``parallel_state`` globals exist (0.19 adds the
``*_GTP_*`` groups, 0.16 has ``_DATA_PARALLEL_GROUP_WITH_CP_AG``); they are
handled in ``STATE_GLOBALS`` by setting only the globals the installed version has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from parallel_bridge.errors import IntegrationError, MissingDependencyError, UnknownNameError
from parallel_bridge.parallel.context import ParallelContext, context_matching
from parallel_bridge.parallel.layout import AXES


def import_megatron():
    """``megatron.core``, or an ImportError that says which extra to install."""
    try:
        import megatron.core as mcore
    except ImportError as e:
        raise MissingDependencyError(
            "megatron-core is not installed: install the extra with "
            f"`pip install parallel-bridge[megatron]` (megatron-core>=0.16.1) ({e})"
        ) from e
    return mcore


_STATE_TABLE = """
tp        _TENSOR_MODEL_PARALLEL_GROUP                    _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS
pp        _PIPELINE_MODEL_PARALLEL_GROUP                  _PIPELINE_GLOBAL_RANKS
mp        _MODEL_PARALLEL_GROUP                           _MODEL_PARALLEL_GLOBAL_RANKS
dp        _DATA_PARALLEL_GROUP                            _DATA_PARALLEL_GLOBAL_RANKS
dp_cp     _DATA_PARALLEL_GROUP_WITH_CP                    _DATA_PARALLEL_GLOBAL_RANKS_WITH_CP
cp        _CONTEXT_PARALLEL_GROUP                         _CONTEXT_PARALLEL_GLOBAL_RANKS
tp_cp     _TENSOR_AND_CONTEXT_PARALLEL_GROUP              -
tp_dp     _TENSOR_AND_DATA_PARALLEL_GROUP                 -
tp_dp_cp  _TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP         -
embd      _EMBEDDING_GROUP                                _EMBEDDING_GLOBAL_RANKS
pos_embd  _POSITION_EMBEDDING_GROUP                       _POSITION_EMBEDDING_GLOBAL_RANKS
ep        _EXPERT_MODEL_PARALLEL_GROUP                    _EXPERT_MODEL_PARALLEL_RANKS
expt_tp   _EXPERT_TENSOR_PARALLEL_GROUP                   -
expt_dp   _EXPERT_DATA_PARALLEL_GROUP                     -
tp_ep     _EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP         -
tp_ep_pp  _EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP    -
"""
STATE_GLOBALS: dict[str, tuple[str, str | None]] = {
    name: (group, None if ranks == "-" else ranks)
    for name, group, ranks in (row.split() for row in _STATE_TABLE.strip().splitlines())
}
"""Context group name -> (its ``parallel_state`` group global, its rank-list global or None)."""
# Cached sizes/ranks that would shadow the bound groups; cleared while bound.
_STATE_OVERRIDES = (
    "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
    "_MPU_TENSOR_MODEL_PARALLEL_RANK",
    "_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE",
    "_MPU_PIPELINE_MODEL_PARALLEL_RANK",
    "_MPU_DATA_PARALLEL_WORLD_SIZE",
    "_MPU_DATA_PARALLEL_RANK",
    "_MPU_EXPERT_MODEL_PARALLEL_WORLD_SIZE",
    "_MPU_EXPERT_MODEL_PARALLEL_RANK",
    "_MPU_EXPERT_TENSOR_PARALLEL_WORLD_SIZE",
    "_MPU_EXPERT_TENSOR_PARALLEL_RANK",
    "_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK",
    "_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE",
)


@contextlib.contextmanager
def bind_parallel_state(
    ctx: ParallelContext, names: Sequence[str] | None = None
) -> Iterator[ParallelContext]:
    """Point ``megatron.core.parallel_state``'s globals at the context's groups, then restore them.

    Only the named groups are bound (default: all; tp, pp and dp always, since
    megatron-core treats its state as uninitialized without them); groups the context adopted
    (vLLM's, a DeviceMesh's, the user's) are used as they are. Unbound groups read
    as uninitialized, as in a fresh process.
    """
    import_megatron()
    from megatron.core import parallel_state as mps

    # parallel_state counts as initialized only with tp, pp and dp set.
    names = tuple(dict.fromkeys(("tp", "pp", "dp", *(names or STATE_GLOBALS))))
    unknown = [n for n in names if n not in STATE_GLOBALS]
    if unknown:
        raise UnknownNameError(f"cannot bind {unknown}; bindable groups are {list(STATE_GLOBALS)}")
    touched = [g for pair in STATE_GLOBALS.values() for g in pair if g] + list(_STATE_OVERRIDES)
    saved = {g: getattr(mps, g) for g in touched if hasattr(mps, g)}
    try:
        for g in saved:
            setattr(mps, g, None)
        for name in names:
            group_global, ranks_global = STATE_GLOBALS[name]
            setattr(mps, group_global, ctx.group(name))
            if ranks_global and hasattr(mps, ranks_global):
                setattr(mps, ranks_global, ctx.ranks(name))
        with memory_buffer():
            yield ctx
    finally:
        for g, value in saved.items():
            setattr(mps, g, value)


@contextlib.contextmanager
def memory_buffer() -> Iterator[None]:
    """Megatron's global activation buffer (core attention, sequence parallelism) for a scope.

    ``initialize_model_parallel`` makes it; with explicit groups nobody does. Made
    here only if missing, and removed on exit if made here, so a later
    ``initialize_model_parallel`` still succeeds.
    """
    from megatron.core import parallel_state as mps

    if getattr(mps, "_GLOBAL_MEMORY_BUFFER", None) is not None:
        yield
        return
    mps._set_global_memory_buffer()
    try:
        yield
    finally:
        mps._GLOBAL_MEMORY_BUFFER = None


def context_from_megatron(timeout_s: float = 600.0) -> ParallelContext:
    """The context an initialized ``megatron.core.parallel_state`` describes, its groups adopted.

    The rank order is recovered by matching this rank's groups against every
    order of the axes in use.
    """
    import_megatron()
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    if not mps.model_parallel_is_initialized():
        raise IntegrationError(
            "megatron.core.parallel_state is not initialized: call "
            "parallel_state.initialize_model_parallel(...) first, or build the context with "
            "context_from_torchrun() and use bind_parallel_state()"
        )
    degrees = {
        "tp": mps.get_tensor_model_parallel_world_size(),
        "pp": mps.get_pipeline_model_parallel_world_size(),
        "cp": mps.get_context_parallel_world_size(),
        "dp": mps.get_data_parallel_world_size(),
        "ep": mps.get_expert_model_parallel_world_size(),
        "etp": mps.get_expert_tensor_parallel_world_size(),
    }
    actual = {
        name: dist.get_process_group_ranks(getattr(mps, STATE_GLOBALS[name][0]))
        for name in ("tp", "pp", "dp", "cp", "ep", "expt_tp")
    }
    used = [a for a in AXES if degrees[a] > 1] or ["tp"]
    ctx = context_matching(degrees, dist.get_rank(), actual, used, timeout_s)
    if ctx is not None:
        return ctx.with_groups(
            {n: getattr(mps, g) for n, (g, _) in STATE_GLOBALS.items() if getattr(mps, g) is not None}
        )
    raise IntegrationError(f"megatron's groups {actual} match no rank order of the axes {used}")
