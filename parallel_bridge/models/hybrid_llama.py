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

import dataclasses
import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel_bridge.adapters import megatron as pm
from parallel_bridge.models.hybrid_layers import Build, Decoder, Embedding
from parallel_bridge.models.kernels import kernels_for
from parallel_bridge.parallel.context import ParallelContext
from parallel_bridge.spec import megatron_layout as ml
from parallel_bridge.spec import schema
from parallel_bridge.spec.schema import Split
from parallel_bridge.spec.tp_split import HF_NAMES, split_for_tp

logger = logging.getLogger(__name__)

ARCHITECTURE = "ParallelBridgeHybridLlama"
"""The name this model is registered under in vLLM (``architectures`` in config.json)."""


@dataclasses.dataclass(frozen=True)
class HybridLlamaConfig:
    """Model sizes; the field names of Hugging Face's LlamaConfig where one exists."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> HybridLlamaConfig:
        """From a transformers config object or dict (e.g. vLLM's ``model_config.hf_config``)."""
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        values = {f.name: get(f.name) for f in dataclasses.fields(cls) if get(f.name) is not None}
        values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)

    def to_hf_dict(self, architecture: str = ARCHITECTURE) -> dict[str, Any]:
        """A Llama-style config.json body naming ``architecture``."""
        return {
            "architectures": [architecture],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            **dataclasses.asdict(self),
        }


class HybridLlama(nn.Module):
    """The hybrid decoder. Training: ``forward(input_ids, positions, cu_seqlens)``;
    serving: vLLM's contract (``embed_input_ids``, ``forward``, ``compute_logits``, ``load_weights``)."""

    def __init__(
        self,
        cfg: HybridLlamaConfig,
        ctx: ParallelContext | None = None,
        *,
        vllm_config: Any = None,
        params_dtype: torch.dtype = torch.float32,
        prefix: str = "model",
    ) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        if ctx.pp != 1:
            raise ValueError(f"HybridLlama runs without pipeline parallelism; the context has pp={ctx.pp}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={cfg.num_attention_heads} does not divide hidden_size={cfg.hidden_size}"
            )
        serving = vllm_config is not None
        split = split_for_tp(  # training splits kv heads; vLLM serving may replicate them
            ctx.tp,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
            replicate_kv=serving,
            names=HF_NAMES,
        )
        self.cfg, self.ctx = cfg, ctx
        self.padded_vocab = split.padded_vocab
        self.kernels = kernels_for(ctx, serving)
        mcfg = pm.model_parallel_config(ctx, params_dtype=params_dtype, perform_initialization=not serving)
        build = Build(cfg, ctx, mcfg, self.kernels, vllm_config)
        self.embedding = Embedding(build, self.padded_vocab)
        self.decoder = Decoder(build, f"{prefix}.decoder")
        if not cfg.tie_word_embeddings:
            self.output_layer = build.column(cfg.hidden_size, self.padded_vocab)
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
        """This rank's vocabulary shard of the logits [T, padded_vocab / tp] (differentiable in training)."""
        if self.cfg.tie_word_embeddings:
            return self.kernels.vocab_logits(None, self.embedding.word_embeddings.weight, hidden)
        return self.kernels.vocab_logits(self.output_layer, self.output_layer.weight, hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [T, vocab_size] on every rank (padding rows dropped)."""
        return self.ctx.comm("tp").all_gather(self.local_logits(hidden_states))[:, : self.cfg.vocab_size]

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
        return F.cross_entropy(full[:, : self.cfg.vocab_size].float(), labels)

    # ------------------------------------------------------------ weights
    def _shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``name``, as the schema splits its kind."""
        cfg, ctx = self.cfg, self.ctx
        split = schema.split_of(name)
        if split is Split.VOCAB:
            if full.shape[0] < cfg.vocab_size:
                raise ValueError(
                    f"tensor {name} has {full.shape[0]} vocabulary rows; the model has vocab_size={cfg.vocab_size}"
                )
            # rows past the vocabulary are the saver's padding; pad again for this TP size
            full = F.pad(full[: cfg.vocab_size], (0, 0, 0, self.padded_vocab - cfg.vocab_size))
        if split is Split.QKV:
            qkv = schema.GroupedQKV(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
            return qkv.shard(name, full, ctx.tp, ctx.tp_rank)
        return ml.shard(name, full, ctx.tp, ctx.tp_rank)

    def _load_full(self, name: str, param: nn.Parameter, full: torch.Tensor) -> None:
        shard = self._shard(name, full)
        if shard.shape != param.shape:
            raise ValueError(
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
                raise KeyError(f"checkpoint tensor {name} matches no parameter of {type(self).__name__}")
            params[name].weight_loader(params[name], full)
            loaded.add(name)
        return loaded

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter as a full tensor (gathered over TP), padding rows dropped; collective."""
        out = {}
        tp = self.ctx.comm("tp")
        for name, param in self.named_parameters():
            shards = [param.detach()]
            if ml.split_kind(name) != "replicated":
                shards = tp.all_gather_list(param.detach())
            full = ml.merge(name, shards)
            if "word_embeddings" in name or name.startswith("output_layer"):
                full = full[: self.cfg.vocab_size]
            out[name] = full.clone()
        return out

    def save_pretrained(self, folder: str | Path, architecture: str = ARCHITECTURE) -> None:
        """Write config.json and model.safetensors (full tensors) that vLLM serves; rank 0 writes, collective."""
        from safetensors.torch import save_file

        state = self.full_state_dict()
        if self.ctx.rank == 0:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(self.cfg.to_hf_dict(architecture), indent=2))
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def build_for_vllm(vllm_config: Any, parallel_context: ParallelContext) -> HybridLlama:
    """The factory registered for :data:`ARCHITECTURE`: sizes from the served folder's config.json."""
    cfg = HybridLlamaConfig.from_hf(vllm_config.model_config.hf_config)
    return HybridLlama(
        cfg, parallel_context, vllm_config=vllm_config, params_dtype=vllm_config.model_config.dtype
    )
