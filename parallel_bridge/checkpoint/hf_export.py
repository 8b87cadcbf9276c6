"""Export a Megatron GPT checkpoint to a Hugging Face folder of its family that transformers and stock vLLM load.

Streams tensor by tensor (memory: one safetensors shard plus the largest tensor),
writes into a hidden temporary folder beside the target and renames it at the
end, so a failure leaves nothing half-written; refuses to replace an existing
folder unless told to.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.checkpoint.outputs import atomic_output, check_output
from parallel_bridge.errors import CheckpointError
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
    from safetensors.torch import save_file

    out = Path(out)
    check_output(out, [ckpt.root] + ([Path(tokenizer)] if tokenizer is not None else []), overwrite)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise CheckpointError(f"tokenizer folder {tokenizer} does not exist")
    cfg = ckpt.config
    with atomic_output(out, str(ckpt.path)) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        weight_map: dict[str, int] = {}

        def flush() -> None:
            index = len(shards) - 1
            save_file(shards[index], str(tmp / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
            shards[index] = {}  # free the tensors; the name map keeps the shard number
            shards.append({})
            sizes.append(0)

        names = [name for name, _, _ in schema.tensors(cfg)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(names), desc="export", unit="tensor", ncols=80)
        for name in names:
            for hf_name, tensor in schema.to_hf(name, ckpt.read(name), cfg):
                nbytes = tensor.numel() * tensor.element_size()
                if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
                    flush()
                shards[-1][hf_name] = tensor.contiguous()
                sizes[-1] += nbytes
                weight_map[hf_name] = len(shards) - 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        flush()
        count = len(shards) - 1
        final = {}
        for i in range(count):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (tmp / f"shard-{i:05d}.safetensors").rename(tmp / name)
            final[i] = name
        if count > 1:
            index = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = cfg.to_hf()
        config["torch_dtype"] = str(ckpt.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            copied = [f for f in TOKENIZER_FILES if (Path(tokenizer) / f).exists()]
            if not copied:
                raise CheckpointError(f"tokenizer folder {tokenizer} holds none of {list(TOKENIZER_FILES)}")
            for f in copied:
                shutil.copy2(Path(tokenizer) / f, tmp / f)
    logger.info("exported %s -> %s", ckpt.path, out)
    return out
