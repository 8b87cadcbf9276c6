"""Read Megatron GPT checkpoints of either format, any source TP/PP, one tensor (or slice) at a time.

- ``torch_dist`` (megatron.core.dist_checkpointing over torch.distributed.checkpoint):
  tensors are global, per-layer weights stacked on a leading layer axis, and a
  read asks torch.distributed.checkpoint for exactly the slice wanted (a planner
  built from DCP's own ``create_read_items_for_chunk_list``), so a serving rank
  reads only what it keeps.
- legacy ``torch`` (Megatron-LM's ``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt``):
  each source file is memory-mapped (``torch.load(mmap=True)``), and a tensor is
  assembled from the source TP shards that hold it.

Names are presented the local-spec way, per layer, with global layer indices
(``decoder.layers.3.input_layernorm.weight``): Transformer Engine's fused norm
names (``linear_qkv.layer_norm_weight``) are renamed on the way. The model configuration is found where
the producer put it (:mod:`~parallel_bridge.checkpoint.config_sources`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint import config_sources, dcp, megatron_files, records, tensor_check
from parallel_bridge.checkpoint.legacy_files import LegacyFiles
from parallel_bridge.checkpoint.megatron_files import TensorInfo, canonical
from parallel_bridge.errors import CheckpointError
from parallel_bridge.spec.model import GPTConfig

logger = logging.getLogger(__name__)

COMMON_STATE = "common_state"
"""megatron-core 0.17+'s item holding the common state (Megatron-LM's args among it) inside the .distcp files."""


def _args_of(common: Any, where: Any) -> Any:
    if not isinstance(common, dict):
        raise CheckpointError(f"{where} holds a {type(common).__name__}, not megatron-core's common state dict")
    return common.get("args")


class MegatronCheckpoint:
    """One iteration of a Megatron GPT checkpoint, read tensor by tensor: a
    :class:`~parallel_bridge.spec.store.TensorStore`."""

    format: str
    path: Path
    root: Path
    iteration: int | str | None
    source_tp: int
    source_pp: int
    source_ep: int = 1
    source_etp: int = 1
    config: GPTConfig
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(
        cls,
        path: str | Path,
        iteration: int | None = None,
        overrides: dict[str, Any] | None = None,
        hf_config: str | Path | None = None,
    ) -> MegatronCheckpoint:
        """Open a checkpoint root (with a tracker file) or an iteration folder; ``overrides`` (GPTConfig fields)
        apply over the configuration found (:mod:`~parallel_bridge.checkpoint.config_sources`), ``hf_config``
        names a Hugging Face config.json to read as one of its sources."""
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"checkpoint folder {root} does not exist")
        folder = megatron_files.iteration_folder(root, iteration)
        if (folder / "metadata.json").exists():
            ckpt: MegatronCheckpoint = _TorchDist(folder)
        elif (folder / ".metadata").exists():
            raise CheckpointError(
                f"{folder} is a plain torch.distributed.checkpoint without megatron-core's metadata.json: "
                f"Megatron-LM's torch_dcp or fsdp_dtensor format (--ckpt-format), which are not read; read are "
                f"torch_dist (megatron-core 0.12-0.19, also under Megatron-Bridge and verl) and the legacy torch "
                f"format. Convert with Megatron-LM's --ckpt-convert-format torch_dist"
            )
        elif any(megatron_files.RANK_DIR.match(p.name) for p in folder.iterdir() if p.is_dir()):
            ckpt = _Legacy(folder)
        else:
            raise CheckpointError(
                f"{folder} is neither a torch_dist checkpoint (metadata.json) nor a legacy one "
                f"(mp_rank_XX folders)"
            )
        ckpt.root = root
        ckpt.iteration = megatron_files.iteration_of(folder)
        ckpt._load_config(root, overrides or {}, hf_config)
        shapes = {name: info.shape for name, info in ckpt.tensors.items()}
        tensor_check.check_tensors(ckpt.path, ckpt.config, shapes, ckpt.config_sources)
        return ckpt

    # ----------------------------------------------------------------- config
    def _args(self) -> tuple[Any, str] | None:
        """Megatron-LM's ``args`` and where they were stored (None: this format has none)."""
        return None

    def _load_config(self, root: Path, overrides: dict[str, Any], hf_config: str | Path | None) -> None:
        self.config_sources = config_sources.find(self.path, root, self._args(), hf_config)
        embedding = self.tensors.get("embedding.word_embeddings.weight")
        rows = embedding.shape[0] if embedding is not None else None
        self.config = config_sources.resolve(self.config_sources, overrides, rows, self.path)
        self.overrides = dict(overrides)

    # ------------------------------------------------------------------ reads
    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        return self.tensors[name].shape

    def read(
        self, name: str, dim: int | None = None, start: int = 0, length: int | None = None
    ) -> torch.Tensor:
        """The full tensor ``name``, or ``length`` entries from ``start`` along ``dim``."""
        raise NotImplementedError

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        """Concatenated row ranges ``[(start, length), ...]`` of ``name`` (dim 0)."""
        return torch.cat([self.read(name, 0, s, n) for s, n in index], dim=0)

    def iter_full(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, full, one at a time (memory: the largest tensor)."""
        for name in self.tensors:
            yield name, self.read(name)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def describe(self) -> dict[str, Any]:
        """What ``parallel-bridge inspect`` prints."""
        return {
            "path": str(self.path),
            "format": self.format,
            "iteration": self.iteration,
            "source_tp": self.source_tp,
            "source_pp": self.source_pp,
            **self._describe_moe(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "total_bytes": self.total_bytes,
            "config_sources": [src.describe() for src in self.config_sources],
            "overrides": self.overrides,
            "config": dataclasses.asdict(self.config),
            "tensors": {n: list(t.shape) for n, t in self.tensors.items()},
        }


    def _describe_moe(self) -> dict[str, Any]:
        cfg = self.config
        if not cfg.num_moe_experts:
            return {}
        routing = "softmax over all, top-k" if cfg.moe_router_pre_softmax else "top-k, softmax over the chosen"
        return {"experts": cfg.num_moe_experts, "router_topk": cfg.moe_router_topk, "expert_ffn": cfg.expert_ffn,
                "routing": routing, "source_ep": self.source_ep, "source_etp": self.source_etp}


# ---------------------------------------------------------------- torch_dist
class _TorchDist(MegatronCheckpoint):
    format = "torch_dist"

    def __init__(self, folder: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = folder
        meta_json = folder / "metadata.json"
        if meta_json.exists():
            meta = records.read_json(meta_json)
            backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
            if backend != "torch_dist":
                raise CheckpointError(
                    f"{meta_json}: sharded_backend {backend!r} is not supported (torch_dist is)"
                )
        self.reader = dcp.cached_reader(folder)
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as e:
            raise CheckpointError(f"{folder / '.metadata'} cannot be read ({type(e).__name__}: {e})") from e
        self._missing_files()
        self._stored: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (stored key, leading indices)
        self.tensors = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self._add(key, tuple(md.size), md.properties.dtype)
        self.source_tp, self.source_pp = self._source_layout()
        self.source_ep, self.source_etp = self._expert_layout()

    def _add(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """The per-layer (and per-expert) names of one stored tensor: a leading layer axis under
        ``decoder.layers.``, then an expert axis where megatron-core stacks a layer's experts."""
        stacked = key.startswith("decoder.layers.") and not key[len("decoder.layers.") :][:1].isdigit()
        layers = range(shape[0]) if stacked else (None,)
        name = f"decoder.layers.{{i}}.{key[len('decoder.layers.'):]}" if stacked else key
        expert = megatron_files.per_expert(name)
        for i in layers:
            lead, rest = ((i,), shape[1:]) if stacked else ((), shape)
            if expert is None:
                self._put(canonical(name.format(i=i)), key, lead, rest, dtype)
            elif expert[1] is not None:  # one key per expert
                self._put(expert[0].format(i=i, e=expert[1]), key, lead, rest, dtype)
            else:  # an expert axis
                for e in range(rest[0]):
                    self._put(expert[0].format(i=i, e=e), key, (*lead, e), rest[1:], dtype)

    def _put(self, name: str, key: str, lead: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._stored[name] = (key, lead)
        self.tensors[name] = TensorInfo(shape, dtype)

    def _missing_files(self) -> None:
        files = {v.relative_path for v in self.metadata.storage_data.values()}
        for f in sorted(files):
            path = self.path / f
            if not path.exists():
                raise CheckpointError(f"shard file {path} is missing")
        ends: dict[str, tuple[int, Any]] = {}  # file -> (where its last record ends, that record)
        for index, v in self.metadata.storage_data.items():
            if v.offset + v.length > ends.get(v.relative_path, (0, None))[0]:
                ends[v.relative_path] = (v.offset + v.length, index)
        for f, (need, _) in sorted(ends.items()):
            have = (self.path / f).stat().st_size
            if have < need:
                cut = min(((v.offset, i) for i, v in self.metadata.storage_data.items()
                           if v.relative_path == f and v.offset + v.length > have), key=lambda x: x[0])
                raise CheckpointError(
                    f"shard file {self.path / f} is truncated: {have} bytes, metadata needs {need}; the record of "
                    f"{cut[1].fqn} (chunk at {list(cut[1].offset)}) from byte {cut[0]} on is cut"
                )

    def _source_layout(self) -> tuple[int, int]:
        """Source TP from the chunking of the embedding; PP (not recorded: tensors are global) from the sets of
        ranks that wrote each layer's attention output (one set per stage)."""
        md = self.metadata.state_dict_metadata.get("embedding.word_embeddings.weight")
        tp = len(md.chunks) if md is not None and hasattr(md, "chunks") else 1
        return tp, len(self._writers("decoder.layers.{i}.self_attention.linear_proj.weight")) or 1

    def _expert_layout(self) -> tuple[int, int]:
        """(EP, expert TP) of the saving job, from which ranks wrote each of layer 0's ``linear_fc2`` experts:
        experts written by one set of ranks are one EP rank's, an expert's chunks its ETP shards."""
        groups = self._writers("decoder.layers.0.mlp.experts.local_experts.{i}.linear_fc2.weight")
        return (len(groups), min(groups.values())) if groups else (1, 1)

    def _writers(self, template: str) -> dict[frozenset[str], int]:
        """Of the tensors ``template`` names for ``{i}`` = 0, 1, ... (while stored): the distinct sets of ranks
        whose files hold their chunks, each with the fewest chunks one tensor of that set has."""
        slices = []
        while template.format(i=len(slices)) in self._stored:
            slices.append(self._stored[template.format(i=len(slices))])
        ranks: dict[tuple[str, tuple[int, ...]], set[str]] = {s: set() for s in slices}
        chunks = dict.fromkeys(slices, 0)
        depth = {key: len(lead) for key, lead in slices}
        for index, info in self.metadata.storage_data.items():
            if index.fqn not in depth:
                continue
            at = (index.fqn, tuple(index.offset[: depth[index.fqn]]))
            if at in ranks:
                path = info.relative_path
                ranks[at].add(path.split("_")[2] if path.startswith("__") else path)
                chunks[at] += 1
        out: dict[frozenset[str], int] = {}
        for s, who in ranks.items():
            out[frozenset(who)] = min(out.get(frozenset(who), chunks[s]), chunks[s])
        return out

    def _args(self) -> tuple[Any, str] | None:
        """Megatron-LM's args from ``common.pt`` (megatron-core up to 0.16) or from the ``common_state`` item
        inside the ``.distcp`` files (0.17 and later)."""
        common = self.path / "common.pt"
        if common.exists():
            return _args_of(records.torch_load(common, what="common state"), common), f"{common}"
        key = next((k for k in self.metadata.state_dict_metadata if k.startswith(COMMON_STATE + "/")), None)
        if key is None:
            return None
        files = sorted({v.relative_path for i, v in self.metadata.storage_data.items() if i.fqn == key})
        where = f"the {COMMON_STATE} item in {self.path / files[0]}" if files else f"the {COMMON_STATE} item"
        state = records.torch_loads(dcp.read_object(self.reader, key), where)
        if not isinstance(state, list) or len(state) != 1:  # megatron-core saves [common state dict]
            raise CheckpointError(f"{where} holds a {type(state).__name__}, not megatron-core's [common state]")
        return _args_of(state[0], where), where

    def read(
        self, name: str, dim: int | None = None, start: int = 0, length: int | None = None
    ) -> torch.Tensor:
        (out,) = dcp.read_slices(self.reader, self.metadata, [self._request(name, dim, start, length)])
        return self._unstack(name, out)

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        requests = [self._request(name, 0, s, n) for s, n in index]
        shape = list(self.tensors[name].shape)
        shape[0] = sum(n for _, n in index)
        out = torch.empty(shape, dtype=self.tensors[name].dtype)
        lead = [1] * len(self._stored[name][1])
        views, at = [], 0
        for _, n in index:  # each range read straight into its rows of the output
            views.append(out.narrow(0, at, n).view(*lead, n, *shape[1:]))
            at += n
        dcp.read_slices(self.reader, self.metadata, requests, into=views)
        return out

    def _request(
        self, name: str, dim: int | None, start: int, length: int | None
    ) -> tuple[str, list[int], list[int]]:
        if name not in self._stored:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        key, lead = self._stored[name]
        shape = list(self.tensors[name].shape)
        offsets = [0] * len(shape)
        if dim is not None:
            offsets[dim] = start
            shape[dim] = length if length is not None else shape[dim] - start
        return key, [*lead, *offsets], [1] * len(lead) + shape

    def _unstack(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[len(self._stored[name][1]) :])


# -------------------------------------------------------------------- legacy
class _Legacy(LegacyFiles, MegatronCheckpoint):
    """Megatron-LM's legacy per-rank files (:class:`~parallel_bridge.checkpoint.legacy_files.LegacyFiles`)."""

    format = "torch"
