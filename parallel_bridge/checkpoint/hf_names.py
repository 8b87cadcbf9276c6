"""Megatron GPT tensor names and layouts -> Hugging Face / vLLM Llama names, one tensor at a time.

Each full Megatron tensor maps to one or more HF tensors:
- ``linear_qkv`` rows are grouped per query group ``[q heads ; k ; v]`` ->
  ``q_proj``, ``k_proj``, ``v_proj``;
- ``linear_fc1`` (gated) is ``[gate ; up]`` -> ``gate_proj``, ``up_proj``;
- the vocabulary's padding rows are dropped;
- Transformer Engine's fused norm names (``linear_qkv.layer_norm_weight``,
  ``linear_fc1.layer_norm_weight``) map like the local-spec norms.
RoPE needs no permutation: megatron-core's default (``rotary_interleaved=False``)
is the rotate-half convention HF Llama and vLLM use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}


@dataclass(frozen=True)
class GPTShape:
    """What the name mapping needs to know about the model."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    gated_linear_unit: bool = True


class UnknownTensorError(KeyError):
    """A checkpoint tensor the Llama mapping does not know (another architecture)."""


def megatron_to_hf(name: str, tensor: torch.Tensor, shape: GPTShape) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF Llama tensors for one full Megatron GPT tensor."""
    if name.endswith("._extra_state") or name.endswith("rotary_pos_emb.inv_freq"):
        return
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", _unpad(name, tensor, shape.vocab_size)
        return
    if name == "output_layer.weight":
        yield "lm_head.weight", _unpad(name, tensor, shape.vocab_size)
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", tensor
        return
    m = _LAYER.match(name)
    if m is None:
        raise UnknownTensorError(f"tensor {name} has no Hugging Face Llama counterpart")
    prefix, rest = f"model.layers.{m[1]}.", m[2]
    if rest in _LAYER_SIMPLE:
        yield prefix + _LAYER_SIMPLE[rest], tensor
    elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(name, tensor, shape)):
            yield f"{prefix}self_attn.{proj}.{kind}", part
    elif rest in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        kind = rest.rsplit(".", 1)[1]
        if shape.gated_linear_unit:
            gate, up = tensor.chunk(2, dim=0)
            yield f"{prefix}mlp.gate_proj.{kind}", gate
            yield f"{prefix}mlp.up_proj.{kind}", up
        else:
            raise UnknownTensorError(f"tensor {name}: a non-gated MLP has no Llama counterpart")
    else:
        raise UnknownTensorError(f"tensor {name} has no Hugging Face Llama counterpart")


def split_qkv(
    name: str, tensor: torch.Tensor, shape: GPTShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped ``[q ; k ; v]`` rows per query group -> (q, k, v), each heads-major."""
    groups, d = shape.num_query_groups, shape.head_dim
    per = shape.num_attention_heads // groups
    rows = groups * (per + 2) * d
    if tensor.shape[0] != rows:
        raise ValueError(
            f"tensor {name} has {tensor.shape[0]} rows, but {shape.num_attention_heads} heads in {groups} "
            f"query groups of head_dim {d} need {rows}"
        )
    grouped = tensor.reshape(groups, per + 2, d, *tensor.shape[1:])
    q = grouped[:, :per].reshape(groups * per * d, *tensor.shape[1:])
    k = grouped[:, per].reshape(groups * d, *tensor.shape[1:])
    v = grouped[:, per + 1].reshape(groups * d, *tensor.shape[1:])
    return q, k, v


def _unpad(name: str, tensor: torch.Tensor, vocab: int) -> torch.Tensor:
    if tensor.shape[0] < vocab:
        raise ValueError(
            f"tensor {name} has {tensor.shape[0]} vocabulary rows, fewer than vocab_size={vocab}"
        )
    return tensor[:vocab]
