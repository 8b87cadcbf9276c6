"""Import a Hugging Face folder (Llama, Qwen2, Qwen3, Mistral, Mixtral, Qwen3-MoE) as a Megatron checkpoint.

Everything is checked before anything is written: config.json and its family (:meth:`GPTConfig.from_hf`),
that the target TP x PP (x EP) splits heads, query groups, FFN, layers, experts and the padded vocabulary, and that every
safetensors tensor has its place and shape in :mod:`parallel_bridge.spec.schema`. The checkpoint is then written by
megatron-core's own code (``dist_checkpointing.save``, the ``torch_dist`` format, whose tensors are global, so
it loads at the TP x PP asked for and at any other): a megatron-core GPTModel is built on one process, filled
tensor by tensor through safetensors' own ``safe_open`` and saved, into a temporary folder renamed into place.
Memory: the model once (megatron-core saves a whole model), plus the largest tensor being read.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint.outputs import atomic_output, check_output
from parallel_bridge.errors import CheckpointError, ModelConfigError, UnknownTensorError
from parallel_bridge.parallel.layout import round_up
from parallel_bridge.spec import schema
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.tp_split import TPSplitError, experts_per_rank, ffn_name, split_for_tp

logger = logging.getLogger(__name__)

VOCAB_DIVISOR = 128
"""Megatron-LM's ``make_vocab_size_divisible_by``: the vocabulary is padded to a multiple of this times TP."""


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary Megatron-LM trains at ``tp``: padded up to a multiple of 128 x tp."""
    return round_up(vocab_size, VOCAB_DIVISOR * tp)


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face folder, as a dict."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"Hugging Face folder {folder} does not exist")
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; give the folder of a Hugging Face model")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


Plan = dict[str, tuple[schema.Located, list[tuple[str, Path]]]]
"""Megatron tensor name -> (its kind, layer and expert, its Hugging Face parts as (name, safetensors file))."""


def hf_tensor_files(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (the safetensors file that holds it, its shape), from each file's header, read once."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files (only safetensors weights are imported)")
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                where[name] = (f, tuple(handle.get_slice(name).get_shape()))
    return where


def plan_import(folder: Path, tp: int, pp: int, ep: int = 1) -> tuple[GPTConfig, Plan]:
    """The Megatron config at ``tp`` x ``pp`` (x ``ep`` for the experts), and where each Megatron tensor's HF parts
    are; raises naming the first problem, before anything is written."""
    raw = read_hf_config(folder)
    for flag, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{flag} must be a positive integer, got {value!r}")
    try:
        cfg = GPTConfig.from_hf(raw, padded_vocab(int(raw.get("vocab_size") or 1), tp))
    except ModelConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    try:
        split_for_tp(tp, cfg.num_attention_heads, cfg.num_query_groups, cfg.expert_ffn,
                     cfg.padded_vocab_size, replicate_kv=False, pad_vocab=False, ffn_name=ffn_name(cfg))
    except TPSplitError as e:
        raise CheckpointError(f"--tp {tp}: {e}") from None
    try:
        experts_per_rank(cfg.num_moe_experts, ep)
    except TPSplitError as e:
        raise CheckpointError(f"--ep {ep}: {e}") from None
    if cfg.num_layers % pp:
        raise CheckpointError(f"--pp {pp} does not divide num_hidden_layers={cfg.num_layers}")
    where = hf_tensor_files(folder)
    plan: Plan = {}
    for name, kind, layer in schema.tensors(cfg):
        located = schema.kind_of(name, cfg)
        parts = list(kind.name("hf", layer, located.expert))
        missing = [p for p in parts if p not in where]
        if missing:
            raise CheckpointError(f"{folder}: tensors {missing} are missing (config.json implies them)")
        for part, want in zip(parts, schema.hf_shapes(kind, cfg)):
            path, got = where[part]
            if got != want:
                raise CheckpointError(f"{path.name}: tensor {part} has shape {got}, but config.json implies {want}")
        plan[name] = (located, [(p, where[p][0]) for p in parts])
    used = {p for _, parts in plan.values() for p, _ in parts}
    extra = sorted(n for n in where if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if cfg.tie_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # a tied head saved anyway
    if extra:
        raise UnknownTensorError(
            f"{folder}: tensors {extra[:4]} have no place in a {raw['model_type']} model of this config: no tensor "
            "kind declares them, so nothing would be written for them; refused"
        )
    return cfg, plan


def import_hf(
    folder: str | Path, out: str | Path, *, tp: int, pp: int = 1, ep: int = 1, iteration: int = 1,
    overwrite: bool = False, progress: bool = False,
) -> Path:
    """Write the Hugging Face model in ``folder`` as a Megatron ``torch_dist`` checkpoint ``out`` (with
    ``megatron_gpt_config.json``) for training at ``tp`` x ``pp`` (experts at ``ep``); returns ``out``."""
    folder, out = Path(folder), Path(out)
    check_output(out, [folder], overwrite)
    cfg, plan = plan_import(folder, tp, pp, ep)
    with atomic_output(out, str(folder)) as tmp:
        _save_with_megatron(cfg, plan, tmp, iteration, progress)
    logger.info("imported %s -> %s (torch_dist, for tp=%d pp=%d)", folder, out, tp, pp)
    return out


def _save_with_megatron(cfg: GPTConfig, plan: Plan, root: Path, iteration: int, progress: bool) -> None:
    """Build the model with megatron-core on a world of one, fill it (a bar of the bytes read when
    ``progress``), save it with megatron-core's own code."""
    from safetensors import safe_open

    from parallel_bridge.adapters import megatron
    from parallel_bridge.checkpoint.megatron_save import save_torch_dist
    from parallel_bridge.checkpoint.progress import byte_progress
    from parallel_bridge.parallel.launch import single_process_world

    with single_process_world() as ctx, megatron.cpu_compat(), megatron.bind_parallel_state(ctx):
        _, model = megatron.gpt_model(ctx, cfg, perform_initialization=False)
        params = dict(model.named_parameters())
        total = sum(params[name].numel() * params[name].element_size() for name in plan)
        with torch.no_grad(), contextlib.ExitStack() as files, byte_progress(total, "import", progress) as bar:
            handles: dict[Path, Any] = {}  # each safetensors file opened once
            for name, ((kind, layer, expert), parts) in plan.items():
                tensors = []
                for part, path in parts:
                    if path not in handles:
                        handles[path] = files.enter_context(safe_open(str(path), framework="pt"))
                    tensors.append(handles[path].get_tensor(part).to(torch.float32))
                params[name].copy_(schema.from_hf(kind, layer, tensors, cfg, expert))
                bar.update(params[name].numel() * params[name].element_size())
        save_torch_dist(ctx, model, root, iteration, cfg)  # also writes megatron_gpt_config.json
