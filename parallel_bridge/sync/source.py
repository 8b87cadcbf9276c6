"""The trainer's weights as vLLM's ``WeightSource``: a megatron-core model at any TP x PP (x DP).

:class:`MegatronWeightSource` knows, on each trainer rank, which tensors the rank
holds (its TP shard of each, under the global megatron-core name; PP stages their
own layers; only data-parallel rank 0 publishes, and only TP rank 0 publishes
replicated tensors) and publishes them into a :class:`~parallel_bridge.sync.shards.ShardWriter`.
Models: megatron-core ``GPTModel`` (local or Transformer Engine names),
:class:`~parallel_bridge.models.hybrid_llama.HybridLlama`, either wrapped by
DeepSpeed (ZeRO 0-3; ZeRO-3 parameters are gathered one at a time) or DDP.

As a vLLM ``WeightSource`` (for backends that move full tensors, e.g. vLLM's
``nccl`` on GPUs) ``metadata()`` lists Hugging Face names and full shapes and
iterating publishes the round and yields full tensors on trainer rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from parallel_bridge.checkpoint.megatron_files import canonical
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec import megatron_args as ma
from parallel_bridge.spec import megatron_layout as ml
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.schema import expected_shapes, to_hf
from parallel_bridge.sync.shards import LocalTensor, RoundError, RoundReader, ShardWriter


def unwrap(model: Any) -> torch.nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def config_of(model: torch.nn.Module, vocab_size: int | None = None) -> GPTConfig:
    """The model's shape as the readers know it, from a HybridLlama or a megatron-core GPTModel."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "intermediate_size"):  # HybridLlama
        return GPTConfig(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_key_value_heads,
            ffn_hidden_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            padded_vocab_size=model.padded_vocab,
            max_position_embeddings=cfg.max_position_embeddings,
            rotary_base=cfg.rope_theta,
            norm_epsilon=cfg.rms_norm_eps,
            tie_embeddings=cfg.tie_word_embeddings,
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "vocab_size"):
        raise TypeError(
            f"{type(model).__name__} is neither a megatron-core GPTModel nor a HybridLlama; pass config= "
            "(a parallel_bridge GPTConfig) to describe it"
        )
    from parallel_bridge.checkpoint.megatron_save import gpt_config_of

    if getattr(model, "rotary_scaling", False):
        raise ValueError(
            "the GPTModel uses rope scaling, whose factor megatron-core does not keep on the model; pass "
            "config=GPTConfig(..., rope_scaling_factor=F) to describe it"
        )
    attrs = {"position_embedding_type": getattr(model, "position_embedding_type", "rope")}
    changed = ma.refused_features(lambda k, d: attrs[k] if k in attrs else getattr(config, k, d))
    changed += ma.unclassified_changes(config)
    if changed:
        raise ValueError(
            f"the model uses {', '.join(changed)}, which vLLM's LlamaForCausalLM does not compute; "
            "syncing it would serve different numbers, so it is refused"
        )
    return gpt_config_of(
        config,
        vocab_size or model.vocab_size,
        model.vocab_size,
        model.max_sequence_length,
        model.share_embeddings_and_output_weights,
        rotary_base=getattr(model, "rotary_base", 10000.0),
    )


@contextlib.contextmanager
def _gathered(param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
    """The parameter's local (TP) data; ZeRO-3 parameters are gathered over data parallelism first."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param.data
    else:
        yield param.data


class MegatronWeightSource(WeightSource):
    """This trainer rank's share of a megatron-core model, named and laid out as a Megatron checkpoint."""

    def __init__(
        self, ctx: ParallelContext, model: Any, config: GPTConfig | None = None, vocab_size: int | None = None
    ) -> None:
        self.ctx = ctx
        self.module = unwrap(model)
        self.config = config or config_of(self.module, vocab_size)
        self.config.check_supported()
        self.publishes = ctx.dp_rank == 0 and ctx.cp_rank == 0
        self._params = self._local_params()
        self.layout = [
            LocalTensor(name, tuple(shape), p.dtype) for name, p, shape, keep in self._params if keep
        ]

    def _local_params(self) -> list[tuple[str, torch.nn.Parameter, tuple[int, ...], bool]]:
        """(global name, parameter, local shape, published by this rank) for every parameter."""
        cfg, ctx = self.config, self.ctx
        offset = ml.layer_offset(cfg.num_layers, ctx.pp, ctx.pp_rank)
        expected = expected_shapes(cfg)
        out = []
        for local, p in self.module.named_parameters():
            name = canonical(ml.to_global_name(local, offset))
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if cfg.tie_embeddings and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            if name not in expected:
                raise RoundError(
                    f"parameter {local} (global name {name}) has no place in the Llama-family schema "
                    f"(biases, MoE, MLA and other architectures are not synced yet)"
                )
            kind = ml.split_kind(name)
            full = list(shape)
            if ml.split_dim(kind) is not None:
                full[ml.split_dim(kind)] *= ctx.tp
            if tuple(full) != expected[name]:
                raise RoundError(
                    f"tensor {name}: trainer rank {ctx.rank} holds {shape} (full {tuple(full)} at tp={ctx.tp}) "
                    f"but the model config implies {expected[name]}"
                )
            keep = self.publishes and (kind != "replicated" or ctx.tp_rank == 0)
            out.append((name, p, shape, keep))
        held = {n for n, *_ in out}
        mine = {n for n in expected if offset <= _layer(n) < offset + cfg.num_layers // ctx.pp}
        missing = sorted(mine - held)
        if missing:
            raise RoundError(f"trainer rank {ctx.rank} (pp stage {ctx.pp_rank}) lacks tensors {missing[:4]}")
        return out

    def publish(self, writer: ShardWriter | None) -> int:
        """Write this rank's tensors into ``writer`` (None on ranks that do not publish); returns bytes.

        Collective under ZeRO-3 (each parameter is gathered over data parallelism in turn).
        """
        sent = 0
        with torch.no_grad():
            for name, p, _, keep in self._params:
                with _gathered(p) as data:
                    if keep and writer is not None:
                        sent += writer.write(name, data)
        return sent

    # ------------------------------------------------------------ vLLM WeightSource
    def metadata(self) -> list[ParamMeta]:
        """Hugging Face names and full shapes of everything iteration yields (no transfer)."""
        dtype = self.layout[0].dtype if self.layout else torch.float32
        out = []
        for name, shape in expected_shapes(self.config).items():
            for hf, t in to_hf(name, torch.empty(shape, device="meta"), self.config):
                out.append(ParamMeta(hf, dtype, tuple(t.shape)))
        return out

    def round_meta(self) -> dict:
        """What every shard index of a round records: the source layout and the model config."""
        return {"source_tp": self.ctx.tp, "source_pp": self.ctx.pp, "config": dataclasses.asdict(self.config)}

    published: tuple[str, int] | None = None
    """(folder, version) of the last round this rank's engine published."""

    def publish_local(self, root: str) -> tuple[str, int]:
        """Publish this rank's shards under ``root`` for full-tensor iteration on trainer rank 0
        (vLLM's ``nccl`` backend); collective over the trainer ranks, one host."""
        import torch.distributed as dist

        version = (self.published[1] if self.published else 0) + 1
        if self.publishes:
            writer = getattr(self, "_writer", None)
            if writer is None or str(writer.root) != str(root):
                writer = self._writer = ShardWriter(root, self.ctx.tp_rank, self.ctx.pp_rank, self.layout)
            self.publish(writer)
            writer.commit(version, self.round_meta())
        else:
            self.publish(None)
        dist.barrier()
        self.published = (str(root), version)
        return self.published

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Hugging Face tensors, on trainer rank 0, of the last published round; nothing elsewhere."""
        if self.published is None:
            raise RuntimeError("publish a round first (WeightSync.publish) before iterating the source")
        if self.ctx.rank != 0:
            return
        reader = RoundReader(self.published[0], self.published[1], self.ctx.tp, self.ctx.pp)
        for name in expected_shapes(self.config):
            yield from to_hf(name, reader.read(name), self.config)


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("decoder.layers.") else -1

