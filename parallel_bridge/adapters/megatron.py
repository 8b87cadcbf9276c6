"""Megatron adapter: ParallelContext -> megatron-core configs and process groups.

- :func:`model_parallel_config` / :func:`transformer_config`: configs whose
  degrees come from the context, checked before any layer is built.
- :func:`process_groups`: a ``ProcessGroupCollection`` for code that takes
  explicit groups (megatron-core >= 0.15: ``pg_collection=``, ``tp_group=``).
- :func:`bind_parallel_state`: for code that reads ``megatron.core.parallel_state``
  globals, points them at the context's groups (which may belong to vLLM or to
  the user) and restores them afterwards.
- :func:`context_from_megatron`: the context an initialized ``parallel_state``
  describes, with its groups adopted.
- :func:`cpu_compat` and :func:`model_parallel_manual_seed`: the opt-in minimal
  layer that lets Megatron's tensor-parallel code run on CPU under gloo.

Supported: megatron-core 0.16.1 (Python 3.11) and 0.19.x. The only differences
this adapter touches are which ``parallel_state`` globals exist (0.19 adds the
``*_GTP_*`` groups, 0.16 has ``_DATA_PARALLEL_GROUP_WITH_CP_AG``); they are
handled in ``_STATE_GLOBALS`` by setting only the globals the installed version has.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from parallel_bridge.context import ParallelContext
from parallel_bridge.layout import AXES

logger = logging.getLogger(__name__)

# context group name -> (parallel_state group global, its rank-list global or None).
_STATE_GLOBALS: dict[str, tuple[str, str | None]] = {
    "tp": ("_TENSOR_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS"),
    "pp": ("_PIPELINE_MODEL_PARALLEL_GROUP", "_PIPELINE_GLOBAL_RANKS"),
    "mp": ("_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GLOBAL_RANKS"),
    "dp": ("_DATA_PARALLEL_GROUP", "_DATA_PARALLEL_GLOBAL_RANKS"),
    "dp_cp": ("_DATA_PARALLEL_GROUP_WITH_CP", "_DATA_PARALLEL_GLOBAL_RANKS_WITH_CP"),
    "cp": ("_CONTEXT_PARALLEL_GROUP", "_CONTEXT_PARALLEL_GLOBAL_RANKS"),
    "tp_cp": ("_TENSOR_AND_CONTEXT_PARALLEL_GROUP", None),
    "tp_dp": ("_TENSOR_AND_DATA_PARALLEL_GROUP", None),
    "tp_dp_cp": ("_TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP", None),
    "embd": ("_EMBEDDING_GROUP", "_EMBEDDING_GLOBAL_RANKS"),
    "pos_embd": ("_POSITION_EMBEDDING_GROUP", "_POSITION_EMBEDDING_GLOBAL_RANKS"),
    "ep": ("_EXPERT_MODEL_PARALLEL_GROUP", "_EXPERT_MODEL_PARALLEL_RANKS"),
    "expt_tp": ("_EXPERT_TENSOR_PARALLEL_GROUP", None),
    "expt_dp": ("_EXPERT_DATA_PARALLEL_GROUP", None),
    "tp_ep": ("_EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP", None),
    "tp_ep_pp": ("_EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP", None),
}
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


def import_megatron():
    """``megatron.core``, or an ImportError that says which extra to install."""
    try:
        import megatron.core as mcore
    except ImportError as e:
        raise ImportError(
            "megatron-core is not installed: install the extra with "
            f"`pip install parallel-bridge[megatron]` (megatron-core>=0.16.1) ({e})"
        ) from e
    return mcore


# ------------------------------------------------------------------- configs
def _cpu_defaults() -> dict[str, Any]:
    """Settings without which megatron-core's layers need CUDA or fused kernels."""
    on_gpu = torch.cuda.is_available()
    return {
        "use_cpu_initialization": not on_gpu,
        "gradient_accumulation_fusion": False,
    }


def check_divisibility(ctx: ParallelContext, **sizes: int | None) -> None:
    """Raise ValueError naming each model size that the tensor-parallel degree does not divide."""
    problems = []
    for name, value in sizes.items():
        if value is not None and value % ctx.tp:
            problems.append(f"{name}={value}")
    if problems:
        raise ValueError(
            f"tensor-parallel size {ctx.tp} does not divide {', '.join(problems)}; "
            f"choose a tp that divides each, or resize the model"
        )


def model_parallel_config(ctx: ParallelContext, **overrides: Any):
    """A ``ModelParallelConfig`` with the context's degrees (user ``overrides`` win).

    Checks the layout-level errors Megatron would raise later, with the numbers.
    """
    import_megatron()
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(**_parallel_kwargs(ctx, overrides))


def _parallel_kwargs(ctx: ParallelContext, overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "tensor_model_parallel_size": ctx.tp,
        "pipeline_model_parallel_size": ctx.pp,
        "context_parallel_size": ctx.cp,
        "expert_model_parallel_size": ctx.ep,
        "expert_tensor_parallel_size": ctx.etp,
        "params_dtype": torch.float32,
        **_cpu_defaults(),
    }
    for degree, field in (
        ("tp", "tensor_model_parallel_size"),
        ("pp", "pipeline_model_parallel_size"),
        ("cp", "context_parallel_size"),
        ("ep", "expert_model_parallel_size"),
    ):
        if field in overrides and overrides[field] != getattr(ctx, degree):
            raise ValueError(
                f"{field}={overrides[field]} disagrees with the context's {degree}={getattr(ctx, degree)}; "
                f"change the ParallelContext instead"
            )
    kwargs.update(overrides)
    if kwargs.get("sequence_parallel") and ctx.tp == 1:
        raise ValueError("sequence_parallel=True needs tensor parallelism, but the context has tp=1")
    if ctx.pp > 1 and kwargs.get("pipeline_dtype") is None:
        raise ValueError(
            f"pipeline parallelism (pp={ctx.pp}) needs pipeline_dtype (the dtype sent between "
            f"stages), e.g. pipeline_dtype=torch.float32"
        )
    return kwargs


def transformer_config(
    ctx: ParallelContext,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
    vocab_size: int | None = None,
    **overrides: Any,
):
    """A Llama-style ``TransformerConfig`` (RMSNorm, SwiGLU, no biases, no dropout) for the context.

    ``vocab_size`` is only checked (Megatron takes it in the model, not the config).
    Raises before anything is built when tp does not divide heads, query groups,
    FFN size or vocabulary.
    """
    import_megatron()
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    ffn = ffn_hidden_size if ffn_hidden_size is not None else 4 * hidden_size
    check_divisibility(
        ctx,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn,
        vocab_size=vocab_size,
    )
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} does not divide hidden_size={hidden_size}"
        )
    if num_query_groups is not None and num_attention_heads % num_query_groups:
        raise ValueError(
            f"num_query_groups={num_query_groups} does not divide num_attention_heads={num_attention_heads}"
        )
    kwargs: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_query_groups": num_query_groups,
        "ffn_hidden_size": ffn,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
    }
    kwargs.update(_parallel_kwargs(ctx, overrides))
    return TransformerConfig(**kwargs)


# ------------------------------------------------------------ process groups
def process_groups(ctx: ParallelContext, names: Sequence[str] | None = None):
    """A megatron-core ``ProcessGroupCollection`` holding the context's groups.

    Its field names are the context's group names; by default every field the
    installed version defines that the context knows. Collective when it must
    create groups the context has not adopted yet.
    """
    import dataclasses

    import_megatron()
    from megatron.core.process_groups_config import ProcessGroupCollection

    if names is None:
        fields = {f.name for f in dataclasses.fields(ProcessGroupCollection)}
        names = [n for n in _STATE_GLOBALS if n in fields]
    return ProcessGroupCollection(**{n: ctx.group(n) for n in names})


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
    names = tuple(dict.fromkeys(("tp", "pp", "dp", *(names or _STATE_GLOBALS))))
    unknown = [n for n in names if n not in _STATE_GLOBALS]
    if unknown:
        raise KeyError(f"cannot bind {unknown}; bindable groups are {list(_STATE_GLOBALS)}")
    touched = [g for pair in _STATE_GLOBALS.values() for g in pair if g] + list(_STATE_OVERRIDES)
    saved = {g: getattr(mps, g) for g in touched if hasattr(mps, g)}
    try:
        for g in saved:
            setattr(mps, g, None)
        for name in names:
            group_global, ranks_global = _STATE_GLOBALS[name]
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
        raise RuntimeError(
            "megatron.core.parallel_state is not initialized: call "
            "parallel_state.initialize_model_parallel(...) first, or build the context with "
            "ParallelContext.from_torchrun() and use bind_parallel_state()"
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
        name: dist.get_process_group_ranks(getattr(mps, _STATE_GLOBALS[name][0]))
        for name in ("tp", "pp", "dp", "cp", "ep", "expt_tp")
    }
    used = [a for a in AXES if degrees[a] > 1] or ["tp"]
    for perm in itertools.permutations(used):
        order = "-".join(perm)
        try:
            ctx = ParallelContext(**degrees, rank=dist.get_rank(), order=order, timeout_s=timeout_s)
        except ValueError:
            continue
        if all(ctx.ranks(n) == r for n, r in actual.items()):
            return ctx.with_groups(
                {n: getattr(mps, g) for n, (g, _) in _STATE_GLOBALS.items() if getattr(mps, g) is not None}
            )
    raise RuntimeError(f"megatron's groups {actual} match no rank order of the axes {used}")


# ------------------------------------------------------------ CPU compatibility
class CpuRNGStatesTracker:
    """Megatron's RNG-states tracker on the CPU generator (named states, ``fork``).

    Stands in for ``CudaRNGStatesTracker`` when there is no GPU, so dropout inside
    tensor-parallel regions and ``get_cuda_rng_tracker().fork()`` work.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added; call model_parallel_manual_seed first")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_device() -> str:
    return "cpu"


def _no_sync(device: Any = None) -> None:
    """``torch.cuda.synchronize`` without CUDA: nothing to wait for (dist_checkpointing's writer calls it)."""


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Let megatron-core's tensor-parallel code run on CPU (opt-in, scoped).

    Creates Megatron's activation buffer if missing. Without a GPU, inside this
    block: ``torch.cuda.current_device()`` (used by the
    gather / reduce-scatter mappings and the sequence-parallel buffer) answers
    ``"cpu"``, ``torch.cuda.synchronize()`` (dist_checkpointing's file writer) does
    nothing, the default causal mask of the unfused softmax is made on the CPU,
    and Megatron's CUDA RNG tracker is a :class:`CpuRNGStatesTracker`
    (seed it with :func:`model_parallel_manual_seed`). With a GPU it does nothing:
    Megatron's own behaviour applies.
    """
    import_megatron()
    if torch.cuda.is_available():
        with memory_buffer():
            yield
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    saved = (
        torch.cuda.synchronize,
        torch.cuda.current_device,
        mrandom._CUDA_RNG_STATE_TRACKER,
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        fused_softmax.get_default_causal_mask,
    )
    torch.cuda.synchronize = _no_sync
    torch.cuda.current_device = _cpu_device
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    try:
        with memory_buffer():
            yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved[0], saved[1]
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved[2], saved[3]
        fused_softmax.get_default_causal_mask = saved[4]


def model_parallel_manual_seed(ctx: ParallelContext, seed: int) -> None:
    """Megatron's ``model_parallel_cuda_manual_seed`` with the context's ranks, on CPU or GPU.

    The same seeds as Megatron: default ``seed``, tensor-parallel ``seed+2718+tp_rank``,
    expert ``seed+1024+100*ep_rank+etp_rank``. On CPU call it inside :func:`cpu_compat`.
    """
    import_megatron()
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(
            seed, tp_rank=ctx.tp_rank, ep_rank=ctx.ep_rank, etp_rank=ctx.etp_rank, force_reset_rng=True
        )
        return
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CpuRNGStatesTracker):
        raise RuntimeError(
            "on CPU, call model_parallel_manual_seed inside parallel_bridge.adapters.megatron.cpu_compat()"
        )
    torch.manual_seed(seed)
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ctx.tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ctx.ep_rank + ctx.etp_rank)


# -------------------------------------------------------------------- models
def build_gpt_model(
    ctx: ParallelContext,
    config: Any,
    *,
    vocab_size: int,
    max_sequence_length: int,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
):
    """A megatron-core ``GPTModel`` (local spec: no Transformer Engine) on the context's groups.

    RoPE positions, this rank's pipeline stage (pre/post-processing) and every
    process group come from the context. Run it inside :func:`cpu_compat` (which
    also provides Megatron's activation buffer) or :func:`bind_parallel_state`;
    megatron-core 0.16's vocab-parallel loss still reads ``parallel_state``, so
    training with labels needs the binding.
    """
    import_megatron()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    check_divisibility(ctx, vocab_size=vocab_size)
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=ctx.is_first_pp_stage,
        post_process=ctx.is_last_pp_stage,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        pg_collection=process_groups(ctx),
    )


def gather_vocab_logits(ctx: ParallelContext, local: Any) -> Any:
    """Full-vocabulary logits from each TP rank's vocabulary shard (last dim); no autograd."""
    import torch.distributed as dist

    if ctx.tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ctx.tp)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)
