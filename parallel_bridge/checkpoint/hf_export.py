"""Export a Megatron GPT checkpoint to a Hugging Face folder of its family that transformers and stock vLLM load.

Streams tensor by tensor (memory: one safetensors shard plus the largest tensor),
writes into a hidden temporary folder beside the target and renames it at the
end, so a failure leaves nothing half-written; refuses to replace an existing
folder unless told to.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch

from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.checkpoint.outputs import atomic_output, check_output
from parallel_bridge.checkpoint.progress import byte_progress
from parallel_bridge.errors import CheckpointError, UnknownTensorError
from parallel_bridge.spec import schema

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
)


def export_hf(
    ckpt: MegatronCheckpoint,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    shard_bytes: int = 2 * 1024**3,
    progress: bool = False,
) -> Path:
    """Write ``out`` (safetensors shards, index, config.json, tokenizer files); returns its path."""
    out = Path(out)
    check_output(out, [ckpt.root] + ([Path(tokenizer)] if tokenizer is not None else []), overwrite)
    tokenizer_files = _tokenizer_files(tokenizer)
    spec = ckpt.config
    names = [name for name, _, _ in schema.tensors(spec)]
    undeclared = sorted(set(ckpt.tensors) - set(names) - {n for n in ckpt.tensors if n.endswith("_extra_state")})
    if undeclared:
        raise UnknownTensorError(
            f"{ckpt.path}: tensors {undeclared[:4]} have no place in a {spec.family.model_type} model of this "
            "config; exporting without them would drop them silently, so nothing is written"
        )
    with atomic_output(out, str(ckpt.path)) as tmp:
        writer = _ShardedWriter(tmp, shard_bytes)
        total = sum(math.prod(ckpt.shape(n)) * ckpt.tensors[n].dtype.itemsize for n in names)
        with byte_progress(total, "export", progress) as bar:
            for name in names:
                tensor = ckpt.read(name)
                for hf_name, part in schema.to_hf(name, tensor, spec):
                    writer.add(hf_name, part)
                bar.update(tensor.numel() * tensor.element_size())
        writer.close()
        config = spec.to_hf()
        config["torch_dtype"] = str(ckpt.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
    logger.info("exported %s -> %s", ckpt.path, out)
    return out


def _tokenizer_files(tokenizer: str | Path | None) -> list[Path]:
    """The tokenizer files to copy, checked before anything is written."""
    if tokenizer is None:
        return []
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {tokenizer} does not exist")
    files = [folder / f for f in TOKENIZER_FILES if (folder / f).exists()]
    if not files:
        raise CheckpointError(f"tokenizer folder {tokenizer} holds none of {list(TOKENIZER_FILES)}")
    return files


class _ShardedWriter:
    """Safetensors shards of at most ``shard_bytes`` (one tensor over it gets a shard of its own), each
    written as soon as it is full; :meth:`close` names them and writes the index when there are several."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.sizes: list[int] = [0]
        self.weight_map: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.sizes[-1] and self.sizes[-1] + nbytes > self.shard_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.sizes[-1] += nbytes
        self.weight_map[name] = len(self.sizes) - 1

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self.sizes) - 1
        save_file(self.current, str(self.folder / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
        self.current = {}  # free the tensors; the name map keeps the shard number
        self.sizes.append(0)

    def close(self) -> None:
        self._flush()
        count = len(self.sizes) - 1
        final = {}
        for i in range(count):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.safetensors").rename(self.folder / name)
            final[i] = name
        if count > 1:
            index = {"metadata": {"total_size": sum(self.sizes)},
                     "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
