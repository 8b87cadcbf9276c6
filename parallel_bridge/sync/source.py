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
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from parallel_bridge.checkpoint.megatron_files import global_param_name
from parallel_bridge.errors import RoundError, SyncError, UnknownTensorError
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec import moe, schema
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.schema import expected_shapes, to_hf
from parallel_bridge.spec.tp_split import experts_per_rank
from parallel_bridge.sync.pieces import stem
from parallel_bridge.sync.shards import LocalTensor, RoundReader, ShardWriter


def unwrap(model: Any) -> torch.nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


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
        self.config = config or GPTConfig.of_model(self.module, vocab_size)
        self.config.check_supported()
        self.publishes = ctx.dp_rank == 0 and ctx.cp_rank == 0
        self.publishes_experts = bool(self.config.num_moe_experts) and ctx.expert_dp_rank == 0 and ctx.cp_rank == 0
        self._params = self._local_params()
        self.local_tensors = [
            LocalTensor(name, tuple(shape), p.dtype) for name, p, shape, keep in self._params
            if keep and not moe.is_expert(name)
        ]
        self.expert_tensors = [
            LocalTensor(name, tuple(shape), p.dtype) for name, p, shape, keep in self._params if keep and moe.is_expert(name)
        ]

    def _local_params(self) -> list[tuple[str, torch.nn.Parameter, tuple[int, ...], bool]]:
        """(global name, parameter, local shape, published by this rank) for every parameter."""
        cfg, ctx = self.config, self.ctx
        offset = schema.layer_offset(cfg.num_layers, ctx.pp, ctx.pp_rank)
        expected = expected_shapes(cfg)
        per_rank = experts_per_rank(cfg.num_moe_experts, ctx.ep)
        out = []
        for local, p in self.module.named_parameters():
            name = global_param_name(local, offset, ctx.ep_rank, per_rank)
            expert = moe.is_expert(name)
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if cfg.tie_embeddings and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            if name not in expected:
                raise UnknownTensorError(
                    f"parameter {local} (global name {name}) is not a tensor of a {cfg.family.model_type} GPT of "
                    f"this config: no tensor kind declares it, so it cannot be synced"
                )
            sharding = schema.sharding_of(name)
            split, split_rank = (("etp", ctx.etp), ctx.etp_rank) if expert else (("tp", ctx.tp), ctx.tp_rank)
            full = sharding.full_shape(shape, split[1])
            if full != expected[name]:
                raise RoundError(
                    f"tensor {name}: trainer rank {ctx.rank} holds {shape} (full {full} at {split[0]}={split[1]}) "
                    f"but the model config implies {expected[name]}"
                )
            publishes = self.publishes_experts if expert else self.publishes
            keep = publishes and (sharding.dim is not None or split_rank == 0)
            out.append((name, p, shape, keep))
        held = {n for n, *_ in out}
        stage = range(offset, offset + cfg.num_layers // ctx.pp)
        experts = range(ctx.ep_rank * per_rank, (ctx.ep_rank + 1) * per_rank)
        mine = {n for n in expected if schema.layer_of(n) in stage  # this stage's layers, this EP rank's experts
                and schema.kind_of(n, cfg).expert in (None, *experts)}
        missing = sorted(mine - held)
        if missing:
            raise RoundError(f"trainer rank {ctx.rank} (pp stage {ctx.pp_rank}) lacks tensors {missing[:4]}")
        return out

    def shards(self) -> dict[str, list[LocalTensor]]:
        """The trainer shards this rank publishes, by name: its dense tensors (data-parallel rank 0), its experts
        (expert-data-parallel rank 0 of an MoE model); none on replicas."""
        ctx, out = self.ctx, {}
        if self.publishes:
            out[stem(ctx.tp_rank, ctx.pp_rank)] = self.local_tensors
        if self.publishes_experts:
            out[stem(ctx.etp_rank, ctx.pp_rank, ctx.ep_rank)] = self.expert_tensors
        return out

    def shard_files(self, root: str | Path) -> list[ShardWriter]:
        """The shared-memory files of :meth:`shards`, a round is published into."""
        ctx, out = self.ctx, []
        if self.publishes:
            out.append(ShardWriter(root, ctx.tp_rank, ctx.pp_rank, self.local_tensors))
        if self.publishes_experts:
            out.append(ShardWriter(root, ctx.etp_rank, ctx.pp_rank, self.expert_tensors, ep_rank=ctx.ep_rank))
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, bool, bool]]:
        """(name, this rank's data, published by this rank, a ZeRO-3 gather) of every parameter, in order;
        collective under ZeRO-3 (each parameter is gathered over data parallelism in turn and released when the
        caller asks for the next)."""
        with torch.no_grad():
            for name, p, _, keep in self._params:
                with _gathered(p) as data:
                    yield name, data, keep, hasattr(p, "ds_id")

    def nonfinite(self) -> list[tuple[str, int]]:
        """(name, count) of every tensor this rank holds with NaN or Inf values (ZeRO-3: its partition)."""
        out = []
        with torch.no_grad():
            for name, p, _, keep in self._params:
                data = p.ds_tensor if hasattr(p, "ds_tensor") else (p.data if keep else None)
                if data is not None and data.is_floating_point() and data.numel():
                    bad = data.numel() - int(torch.isfinite(data).sum())
                    if bad:
                        out.append((name, bad))
        return out

    def publish(self, writers: list[ShardWriter]) -> int:
        """Write this rank's tensors into its ``writers`` (:meth:`shard_files`; none on ranks that do not publish);
        returns bytes.

        Collective under ZeRO-3 (each parameter is gathered over data parallelism in turn).
        """
        sent = 0
        into = {name: w for w in writers for name in w.tensors}
        for name, data, keep, _ in self.tensors():
            if keep and name in into:
                sent += into[name].write(name, data)
        return sent

    # ------------------------------------------------------------ vLLM WeightSource
    def metadata(self) -> list[ParamMeta]:
        """Hugging Face names and full shapes of everything iteration yields (no transfer)."""
        dtype = self.local_tensors[0].dtype if self.local_tensors else torch.float32
        out = []
        for name, shape in expected_shapes(self.config).items():
            for hf, t in to_hf(name, torch.empty(shape, device="meta"), self.config):
                out.append(ParamMeta(hf, dtype, tuple(t.shape)))
        return out

    def round_meta(self) -> dict:
        """What every shard index of a round records: the source layout and the model config."""
        return {"source_tp": self.ctx.tp, "source_pp": self.ctx.pp, "experts": self.experts,
                "config": dataclasses.asdict(self.config)}

    @property
    def experts(self) -> tuple[int, int] | None:
        """(EP, expert TP) the experts are published at (their own shard files), or None for a dense model."""
        return (self.ctx.ep, self.ctx.etp) if self.config.num_moe_experts else None

    published: tuple[str, int] | None = None
    """(folder, version) of the last round this source published."""

    def publish_local(self, root: str) -> tuple[str, int]:
        """Publish this rank's shards under ``root`` for full-tensor iteration on trainer rank 0
        (vLLM's ``nccl`` backend); collective over the trainer ranks, one host."""
        import torch.distributed as dist

        version = (self.published[1] if self.published else 0) + 1
        writers = getattr(self, "_writers", None)
        if writers is None or any(str(w.root) != str(root) for w in writers):
            writers = self._writers = self.shard_files(root)
        self.publish(writers)
        for writer in writers:
            writer.commit(version, self.round_meta())
        dist.barrier()
        self.published = (str(root), version)
        return self.published

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Hugging Face tensors, on trainer rank 0, of the last published round; nothing elsewhere."""
        if self.published is None:
            raise SyncError("publish a round first (WeightSync.publish) before iterating the source")
        if self.ctx.rank != 0:
            return
        reader = RoundReader(self.published[0], self.published[1], self.ctx.tp, self.ctx.pp, experts=self.experts)
        for name in expected_shapes(self.config):
            yield from to_hf(name, reader.read(name), self.config)
