"""HybridLlama: a Llama-style decoder of megatron-core layers that trains under torchrun and serves in vLLM.

Vocab-parallel embedding and output layer, column/row-parallel QKV/output and
SwiGLU MLP (megatron-core ``tensor_parallel`` layers on the context's TP group),
:class:`~parallel_bridge.models.attention.TrainableAttention`, RMSNorm and RoPE. Its
parameter names are megatron-core GPTModel's (``decoder.layers.0.self_attention.
linear_qkv.weight``...), so a Megatron checkpoint and this model's own saves load
the same way: :meth:`HybridLlama.load_weights` takes full (unsharded) tensors
under those names and keeps this rank's shard, through each parameter's
``weight_loader`` as vLLM's reload paths expect.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel_bridge.adapters import megatron
from parallel_bridge.errors import CheckpointError, LayoutError, ModelConfigError, UnknownTensorError
from parallel_bridge.models.hybrid_layers import Build, Decoder, Embedding
from parallel_bridge.models.kernels import kernels_for
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec import schema
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.sharding import GROUPED_QKV, VOCAB, GroupedQKV
from parallel_bridge.spec.tp_split import split_for_tp

logger = logging.getLogger(__name__)

ARCHITECTURE = "ParallelBridgeHybridLlama"
"""The name this model is registered under in vLLM (``architectures`` in config.json)."""


class HybridLlama(nn.Module):
    """The hybrid decoder. Training: ``forward(input_ids, positions, cu_seqlens)``;
    serving: vLLM's contract (``embed_input_ids``, ``forward``, ``compute_logits``, ``load_weights``)."""

    def __init__(
        self,
        spec: GPTConfig,
        ctx: ParallelContext | None = None,
        *,
        vllm_config: Any = None,
        params_dtype: torch.dtype = torch.float32,
        prefix: str = "model",
    ) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        if ctx.pp != 1:
            raise LayoutError(f"HybridLlama runs without pipeline parallelism; the context has pp={ctx.pp}")
        _check_features(spec)
        serving = vllm_config is not None
        split = split_for_tp(  # training splits kv heads; vLLM serving may replicate them
            ctx.tp,
            spec.num_attention_heads,
            spec.num_query_groups,
            spec.ffn_hidden_size,
            spec.padded_vocab_size,
            replicate_kv=serving,
        )
        # the vocabulary padded to a multiple of tp: the rows the ranks hold together
        self.spec, self.ctx = spec.replace(padded_vocab_size=split.padded_vocab), ctx
        self.kernels = kernels_for(ctx, serving)
        mcfg = megatron.model_parallel_config(ctx, params_dtype=params_dtype, perform_initialization=not serving)
        build = Build(self.spec, ctx, mcfg, self.kernels, vllm_config)
        self.embedding = Embedding(build, self.spec.padded_vocab_size)
        self.decoder = Decoder(build, f"{prefix}.decoder")
        if not spec.tie_embeddings:
            self.output_layer = build.column(spec.hidden_size, self.spec.padded_vocab_size)
        for name, param in self.named_parameters():
            param.weight_loader = functools.partial(self._load_full, name)

    # ------------------------------------------------------------ forward
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Packed tokens [T] and their positions [T] -> final hidden states [T, hidden]."""
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.decoder.layers:
            h = layer(h, positions, cu_seqlens)
        return self.decoder.final_layernorm(h)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits [T, padded_vocab_size / tp] (differentiable in training)."""
        if self.spec.tie_embeddings:
            return self.kernels.vocab_logits(None, self.embedding.word_embeddings.weight, hidden)
        return self.kernels.vocab_logits(self.output_layer, self.output_layer.weight, hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [T, vocab_size] on every rank (padding rows dropped)."""
        return self.ctx.comm("tp").all_gather(self.local_logits(hidden_states))[:, : self.spec.vocab_size]

    def loss(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross entropy over packed tokens, computed on vocabulary shards."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        full = self.local_logits(self(input_ids, positions, cu_seqlens=cu_seqlens))
        if self.ctx.tp > 1:
            full = gather_from_tensor_model_parallel_region(full, group=self.ctx.tp_group)
        return F.cross_entropy(full[:, : self.spec.vocab_size].float(), labels)

    # ------------------------------------------------------------ weights
    def _shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``name``, as its kind's sharding says (kv heads replicated
        when the model serves at a TP above its query groups)."""
        spec, ctx = self.spec, self.ctx
        sharding = schema.sharding_of(name)
        if sharding is VOCAB:  # rows past the vocabulary are the saver's padding; pad again for this TP size
            full = sharding.pad_for(name, full, spec, spec.padded_vocab_size)
        if sharding is GROUPED_QKV:
            return GroupedQKV.of(spec).replicated_kv_shard(name, full, ctx.tp, ctx.tp_rank)
        return sharding.shard(name, full, ctx.tp, ctx.tp_rank)

    def _load_full(self, name: str, param: nn.Parameter, full: torch.Tensor) -> None:
        shard = self._shard(name, full)
        if shard.shape != param.shape:
            raise CheckpointError(
                f"tensor {name}: this rank's shard has shape {tuple(shard.shape)} but the parameter has "
                f"{tuple(param.shape)}; does the checkpoint match the model config?"
            )
        param.data.copy_(shard)
        if name.endswith(".weight") and ("linear_" in name or name == "output_layer.weight"):
            self.kernels.weight_loaded(self.get_submodule(name.rsplit(".", 1)[0]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load full tensors named as megatron-core's GPTModel names them; returns the names loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, full in weights:
            if name.endswith("_extra_state") or name.endswith("rotary_pos_emb.inv_freq"):
                continue
            if name not in params:
                raise UnknownTensorError(f"checkpoint tensor {name} matches no parameter of {type(self).__name__}")
            params[name].weight_loader(params[name], full)
            loaded.add(name)
        return loaded

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter as a full tensor (gathered over TP), padding rows dropped; collective."""
        out = {}
        tp = self.ctx.comm("tp")
        for name, param in self.named_parameters():
            sharding = schema.sharding_of(name)
            shards = [param.detach()] if sharding.dim is None else tp.all_gather_list(param.detach())
            full = sharding.merge(name, shards)
            if sharding is VOCAB:
                full = full[: self.spec.vocab_size]
            out[name] = full.clone()
        return out

    def save_pretrained(self, folder: str | Path, architecture: str = ARCHITECTURE) -> None:
        """Write config.json and model.safetensors (full tensors) that vLLM serves; rank 0 writes, collective."""
        from safetensors.torch import save_file

        state = self.full_state_dict()
        if self.ctx.rank == 0:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(self.spec.to_hf(architecture), indent=2))
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def build_for_vllm(vllm_config: Any, parallel_context: ParallelContext) -> HybridLlama:
    """The factory registered for :data:`ARCHITECTURE`: the spec from the served folder's config.json."""
    spec = GPTConfig.from_hf(vllm_config.model_config.hf_config)
    return HybridLlama(
        spec, parallel_context, vllm_config=vllm_config, params_dtype=vllm_config.model_config.dtype
    )


_PLAIN = (("add_bias_linear", False), ("add_qkv_bias", False), ("qk_layernorm", False), ("rope_scaling_factor", None),
          ("sliding_window", None))
"""Features HybridLlama's layers do not build, at the values that mean "absent"."""


def _check_features(spec: GPTConfig) -> None:
    """Refuse a spec with features HybridLlama's plain Llama layers do not compute, naming each."""
    off = [f"{name}={getattr(spec, name)!r}" for name, plain in _PLAIN if getattr(spec, name) != plain]
    if spec.head_dim * spec.num_attention_heads != spec.hidden_size:
        off.append(f"kv_channels={spec.kv_channels} (head_dim other than hidden_size / num_attention_heads)")
    if off:
        raise ModelConfigError(f"HybridLlama builds plain Llama layers; this spec has {', '.join(off)}")
