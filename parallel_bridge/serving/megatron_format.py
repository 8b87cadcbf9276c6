"""vLLM ``--load-format megatron`` and ``--config-format megatron``: serve a Megatron checkpoint directly.

Registered in every vLLM process by the package's plugin, so these work:

    vllm serve CKPT --load-format megatron --config-format megatron --tokenizer TOK --tensor-parallel-size N
    LLM(model=CKPT, load_format="megatron", config_format="megatron", tokenizer=TOK)

The config parser turns the checkpoint's configuration, wherever its producer put it
(:mod:`parallel_bridge.checkpoint.config_sources`: Megatron-LM ``args``, Megatron-Bridge's
``run_config.yaml``, verl's ``huggingface/config.json``, ``megatron_gpt_config.json``), into the Hugging Face
config of its family (Llama, Qwen2 with QKV biases, Qwen3 with QK layernorm, Mistral, Mixtral, Qwen3-MoE;
Llama-3.1 rope scaling).
Overrides travel in vLLM's ``hf_overrides`` under ``megatron.`` keys, the one route vLLM 0.32 passes to both
the config parser and the loader (dict-valued ``hf_overrides`` and ``model_loader_extra_config`` do not reach
the parser)::

    LLM(model=CKPT, load_format="megatron", config_format="megatron",
        hf_overrides={"megatron.rotary_base": 500000, "megatron.hf_config": "/path/config.json"})

The loader fills the model:

- vLLM's own model of the family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM``, ``MixtralForCausalLM``...; the fast path): each rank reads only the rows/columns of
  each tensor it keeps, as each kind's sharding says (:mod:`parallel_bridge.spec.sharding`) (its query and
  kv heads in vLLM's ``qkv_proj`` order, kv heads replicated when fewer than TP,
  its ``[gate | up]`` rows, its input columns of row-parallel weights, its
  vocabulary rows) and copies them into its parameters.
- any other model (for example a bridge-registered hybrid, chosen with
  ``hf_overrides={"architectures": [...]}``): ``model.load_weights`` receives
  full tensors under megatron-core's names (``decoder.layers.0.self_attention.
  linear_qkv.weight``...), one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.checkpoint.progress import byte_progress
from parallel_bridge.errors import CheckpointError, LayoutError
from parallel_bridge.spec.slices import VOCAB_PARAMS, rank_parts
from parallel_bridge.spec.tp_split import TPSplit, TPSplitError, serving_split

logger = logging.getLogger(__name__)

FORMAT = "megatron"


OPTION_PREFIX = "megatron."
"""Keys of vLLM's ``hf_overrides`` this format reads: ``megatron.<GPTConfig field>`` overrides that field,
``megatron.hf_config`` names a Hugging Face config.json, ``megatron.iteration`` the iteration to serve. vLLM
passes flat ``hf_overrides`` values to the config parser and keeps them on the model config the loader sees,
so both read the same ones."""

_OPENED: dict[Path, tuple[tuple, MegatronCheckpoint]] = {}


def serving_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """:meth:`MegatronCheckpoint.open`'s keyword arguments from the ``megatron.*`` keys of vLLM's
    ``hf_overrides`` (the others are vLLM's own): ``megatron.hf_config``, ``megatron.iteration``, and every other
    ``megatron.<field>`` an override of that GPTConfig field."""
    if options is None or callable(options):
        return {"overrides": {}}
    mine = {k[len(OPTION_PREFIX) :]: v for k, v in options.items() if isinstance(k, str) and k.startswith(OPTION_PREFIX)}
    hf_config, iteration = mine.pop("hf_config", None), mine.pop("iteration", None)
    if hf_config is not None and not isinstance(hf_config, str):
        raise CheckpointError(f"hf_overrides {OPTION_PREFIX}hf_config must be a path, got {hf_config!r}")
    return {"overrides": mine, "hf_config": hf_config, "iteration": iteration}


def as_options(
    overrides: Mapping[str, Any] | None, hf_config: str | Path | None = None, iteration: int | None = None
) -> dict[str, Any]:
    """The ``megatron.*`` keys of vLLM's ``hf_overrides`` for :meth:`MegatronCheckpoint.open`'s arguments (the
    inverse of :func:`serving_options`)."""
    options = {OPTION_PREFIX + k: v for k, v in (overrides or {}).items()}
    if hf_config is not None:
        options[OPTION_PREFIX + "hf_config"] = str(Path(hf_config).resolve())
    if iteration is not None:
        options[OPTION_PREFIX + "iteration"] = iteration
    return options


def opened(path: str | Path, options: Mapping[str, Any] | None = None) -> MegatronCheckpoint:
    """The checkpoint at ``path`` opened once per process (vLLM's config parser, ``download_model`` and
    ``load_weights`` all ask for it), with the ``megatron.*`` options of vLLM's ``hf_overrides``: cached by path,
    options and the size and mtime of every file in it, so a checkpoint written again is opened again. vLLM's
    generation-config lookup passes no ``hf_overrides`` (``options=None``): where the checkpoint cannot be opened
    without them, it gets the checkpoint as this process last opened it (the loader passes the engine's own and
    opens again)."""
    root = Path(path).resolve()
    kwargs, stamp = serving_options(options), _stamp(root)
    key = (root, repr(sorted(kwargs.items())), stamp)
    cached = _OPENED.get(root)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        _OPENED[root] = (key, MegatronCheckpoint.open(root, **kwargs))
    except CheckpointError:
        if options is None and cached is not None and cached[0][-1] == stamp:
            return cached[1]  # the generation-config lookup; the loader opens again with the options
        raise
    return _OPENED[root][1]


def _stamp(root: Path) -> tuple:
    """(name, size, mtime) of every file under ``root``: what changes when a checkpoint is rewritten."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def check_serving_tp(spec: Any, tp: int) -> TPSplit:
    """What each of ``tp`` serving ranks keeps of the checkpoint's model (kv heads replicated when fewer
    than tp), or a CheckpointError naming the sizes ``tp`` does not split."""
    try:
        return serving_split(spec, tp)
    except TPSplitError as e:
        raise CheckpointError(str(e)) from None


def fill_parameters(
    params: dict[str, torch.Tensor], parts: Iterator[tuple[str, torch.Tensor]], source: str, model_name: str
) -> None:
    """Copy each ``(name, rank part)`` into its parameter; every parameter must be filled exactly (a
    parameter left unfilled would serve uninitialised memory), vocabulary rows first with vLLM's padding zero."""
    filled = set()
    for name, value in parts:
        if name not in params:
            raise CheckpointError(f"checkpoint tensor {name} has no parameter in vLLM's {model_name}")
        param = params[name]
        filled.add(name)
        if name in VOCAB_PARAMS:  # real rows first, vLLM's padding zero
            if value.shape[1] != param.shape[1] or value.shape[0] > param.shape[0]:
                raise CheckpointError(
                    f"tensor {name}: rows {tuple(value.shape)} do not fit vLLM's {tuple(param.shape)}"
                )
            param.data.zero_()
            param.data[: value.shape[0]].copy_(value)
        elif param.shape != value.shape:
            raise CheckpointError(
                f"tensor {name}: this rank's part has shape {tuple(value.shape)} but vLLM's parameter has "
                f"{tuple(param.shape)}"
            )
        else:
            param.data.copy_(value)
    unfilled = sorted(set(params) - filled)
    if unfilled:  # left as uninitialised memory, it would serve garbage
        raise CheckpointError(
            f"{source}: no checkpoint tensor filled vLLM's parameters {unfilled[:4]}"
            + (f" and {len(unfilled) - 4} more" if len(unfilled) > 4 else "")
        )


def load_into_vllm_model(model: Any, ckpt: MegatronCheckpoint, progress: bool = False) -> None:
    """Fill vLLM's own model of the checkpoint's family on this TP rank, reading only this rank's parts (a bar
    of the bytes on TP rank 0 when ``progress``: vLLM's ``use_tqdm_on_load``)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from parallel_bridge.adapters.vllm import expert_parallel_of

    idx = model.model.embed_tokens.shard_indices
    try:
        ep = expert_parallel_of(model)
    except LayoutError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    parts = rank_parts(
        ckpt,
        get_tensor_model_parallel_world_size(),
        get_tensor_model_parallel_rank(),
        (idx.org_vocab_start_index, idx.org_vocab_end_index),
        ep,
    )
    params = dict(model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in params.values())
    show = progress and get_tensor_model_parallel_rank() == 0
    with byte_progress(total, f"loading {ckpt.format} checkpoint", show) as bar:
        fill_parameters(params, _counted(parts, bar), f"{ckpt.path}", type(model).__name__)


def _counted(parts: Iterator[tuple[str, torch.Tensor]], bar: Any) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in parts:
        yield name, value
        bar.update(value.numel() * value.element_size())


def register_vllm_formats() -> None:
    """Register the ``megatron`` load format and config format with vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.transformers_utils.config import register_config_parser
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    @register_config_parser(FORMAT)
    class MegatronConfigParser(ConfigParserBase):
        """config.json from the Megatron checkpoint's own args (or megatron_gpt_config.json)."""

        def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
            config_dict = opened(model, kwargs.get("hf_overrides")).config.to_hf()
            return config_dict, AutoConfig.for_model(**config_dict)

    @register_model_loader(FORMAT)
    class MegatronModelLoader(BaseModelLoader):
        """Reads a Megatron checkpoint (torch_dist or legacy, any source TP/PP) into the model."""

        def download_model(self, model_config) -> None:
            opened(model_config.model, model_config.hf_overrides)

        def load_weights(self, model, model_config) -> None:
            ckpt = opened(model_config.model, model_config.hf_overrides)
            if type(model).__module__.startswith("vllm.model_executor.models."):  # vLLM's own class
                load_into_vllm_model(model, ckpt, bool(getattr(self.load_config, "use_tqdm_on_load", False)))
            else:
                loaded = model.load_weights(ckpt.iter_full())
                expected = {n for n, _ in model.named_parameters()}
                missing = expected - set(loaded or ())
                if missing:
                    raise CheckpointError(f"{ckpt.path}: no checkpoint tensor filled {sorted(missing)[:4]}")
            logger.info(
                "loaded %s checkpoint %s (source tp=%d pp=%d)",
                ckpt.format,
                ckpt.path,
                ckpt.source_tp,
                ckpt.source_pp,
            )
