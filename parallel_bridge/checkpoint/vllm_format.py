"""vLLM ``--load-format megatron`` and ``--config-format megatron``: serve a Megatron checkpoint directly.

Registered in every vLLM process by the package's plugin, so these work:

    vllm serve CKPT --load-format megatron --config-format megatron --tokenizer TOK --tensor-parallel-size N
    LLM(model=CKPT, load_format="megatron", config_format="megatron", tokenizer=TOK)

The config parser turns the checkpoint's Megatron-LM ``args`` (or
``megatron_gpt_config.json``) into a Llama config. The loader fills the model:

- vLLM's own ``LlamaForCausalLM`` (the default architecture, the fast path):
  each rank reads only the rows/columns of each tensor it keeps (its query and
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
from collections.abc import Iterator
from typing import Any

import torch

from parallel_bridge.checkpoint.megatron_reader import CheckpointError, MegatronCheckpoint
from parallel_bridge.tp_split import TPSplit, TPSplitError, split_for_tp

logger = logging.getLogger(__name__)

FORMAT = "megatron"
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")
"""vLLM's vocabulary-parallel parameters: real rows first, vLLM's own padding after them."""
DEFAULT_ARCHITECTURE = "LlamaForCausalLM"
"""The architecture the config parser names; serve another with ``hf_overrides={"architectures": [name]}``."""


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, n in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


def qkv_rows_for_rank(heads: int, groups: int, d: int, tp: int, rank: int) -> list[tuple[int, int]]:
    """Row ranges of Megatron's grouped ``linear_qkv`` that form vLLM's per-rank ``qkv_proj``
    (``[q heads of this rank ; k ; v]``), kv heads replicated when fewer than tp."""
    per = heads // groups
    q_local = heads // tp
    if groups >= tp:
        kv_heads = list(range(rank * groups // tp, (rank + 1) * groups // tp))
    else:
        kv_heads = [rank * groups // tp]
    q_rows = []
    for j in range(rank * q_local, (rank + 1) * q_local):
        g, i = divmod(j, per)
        q_rows.append(((g * (per + 2) + i) * d, d))
    k_rows = [((g * (per + 2) + per) * d, d) for g in kv_heads]
    v_rows = [((g * (per + 2) + per + 1) * d, d) for g in kv_heads]
    return _merge_ranges(q_rows) + _merge_ranges(k_rows) + _merge_ranges(v_rows)


def check_serving_tp(cfg: Any, tp: int) -> TPSplit:
    """What each of ``tp`` serving ranks keeps of the checkpoint's model (kv heads replicated when fewer
    than tp), or a CheckpointError naming the sizes ``tp`` does not split."""
    try:
        return split_for_tp(tp, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size)
    except TPSplitError as e:
        raise CheckpointError(str(e)) from None


def rank_parts(
    ckpt: MegatronCheckpoint, tp: int, rank: int, vocab_range: tuple[int, int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors vLLM's LlamaForCausalLM keeps on TP rank ``rank``, under vLLM's names, read
    slice by slice: only what the rank keeps is read. ``vocab_range`` is the rank's
    [start, end) of real vocabulary rows (vLLM pads the vocabulary its own way)."""
    cfg = ckpt.config
    split = check_serving_tp(cfg, tp)
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    if vocab_range is None:
        per = -(-cfg.vocab_size // tp)
        vocab_range = (min(rank * per, cfg.vocab_size), min((rank + 1) * per, cfg.vocab_size))
    start, end = vocab_range
    vocab = [("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if not cfg.tie_embeddings:
        vocab.append(("output_layer.weight", "lm_head.weight"))
    for src, dst in vocab:
        yield dst, ckpt.read(src, 0, start, end - start)
    yield "model.norm.weight", ckpt.read("decoder.final_layernorm.weight")
    f_local, q_cols = split.ffn, split.heads * d
    for i in range(cfg.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield q + "input_layernorm.weight", ckpt.read(p + "input_layernorm.weight")
        yield q + "post_attention_layernorm.weight", ckpt.read(p + "pre_mlp_layernorm.weight")
        yield (
            q + "self_attn.qkv_proj.weight",
            ckpt.read_rows(
                p + "self_attention.linear_qkv.weight", qkv_rows_for_rank(heads, groups, d, tp, rank)
            ),
        )
        yield (
            q + "self_attn.o_proj.weight",
            ckpt.read(p + "self_attention.linear_proj.weight", 1, rank * q_cols, q_cols),
        )
        yield (
            q + "mlp.gate_up_proj.weight",
            ckpt.read_rows(
                p + "mlp.linear_fc1.weight",
                [(rank * f_local, f_local), (cfg.ffn_hidden_size + rank * f_local, f_local)],
            ),
        )
        yield q + "mlp.down_proj.weight", ckpt.read(p + "mlp.linear_fc2.weight", 1, rank * f_local, f_local)


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


def load_into_vllm_llama(model: Any, ckpt: MegatronCheckpoint) -> None:
    """Fill vLLM's LlamaForCausalLM on this TP rank, reading only this rank's parts."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    idx = model.model.embed_tokens.shard_indices
    parts = rank_parts(
        ckpt,
        get_tensor_model_parallel_world_size(),
        get_tensor_model_parallel_rank(),
        (idx.org_vocab_start_index, idx.org_vocab_end_index),
    )
    fill_parameters(dict(model.named_parameters()), parts, f"{ckpt.path}", type(model).__name__)


def register_vllm_formats() -> None:
    """Register the ``megatron`` load format and config format with vLLM (idempotent)."""
    from transformers import LlamaConfig
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.transformers_utils.config import register_config_parser
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    @register_config_parser(FORMAT)
    class MegatronConfigParser(ConfigParserBase):
        """config.json from the Megatron checkpoint's own args (or megatron_gpt_config.json)."""

        def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
            config_dict = MegatronCheckpoint.opened(model).config.to_hf_llama(DEFAULT_ARCHITECTURE)
            return config_dict, LlamaConfig(**config_dict)

    @register_model_loader(FORMAT)
    class MegatronModelLoader(BaseModelLoader):
        """Reads a Megatron checkpoint (torch_dist or legacy, any source TP/PP) into the model."""

        def download_model(self, model_config) -> None:
            MegatronCheckpoint.opened(model_config.model)

        def load_weights(self, model, model_config) -> None:
            from vllm.model_executor.models.llama import LlamaForCausalLM

            ckpt = MegatronCheckpoint.opened(model_config.model)
            if isinstance(model, LlamaForCausalLM):
                load_into_vllm_llama(model, ckpt)
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
