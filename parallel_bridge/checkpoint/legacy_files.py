"""Megatron-LM's legacy ``torch`` checkpoint format: ``iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``,
one file per tensor-parallel rank, pipeline stage and (MoE) expert-parallel rank.

Each file's pickle is read with its tensors left in place (:mod:`~parallel_bridge.checkpoint.archive`: nothing
else is read, so a file that also holds optimizer state costs only the model's bytes), and a tensor is read in
one CRC-checked pass from the TP shards that hold it, straight into the slice wanted when one shard holds it. Expert-parallel rank ``e``'s file holds its experts under local indices
(``local_experts.{l}``); they are presented under the global index ``e * experts_per_rank + l``, the name
megatron-core's own model at EP=1 gives them, and their shards merged over TP (Megatron-LM's legacy saves keep
the expert TP equal to TP). The dense tensors every EP rank's file repeats are read from EP rank 0's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from parallel_bridge.checkpoint import megatron_files
from parallel_bridge.checkpoint.archive import Archive, StoredTensor
from parallel_bridge.checkpoint.megatron_files import TensorInfo
from parallel_bridge.errors import CheckpointError, UnknownTensorError
from parallel_bridge.spec import moe, schema

Rank = tuple[int, int, int]
"""(TP rank, PP stage, EP rank) of one file."""


def rank_folders(folder: Path, args: Any) -> dict[Rank, Path]:
    """The ``mp_rank_*`` folders of an iteration by (tp, pp, ep). Megatron-LM names a folder ``mp_rank_TT_NNN``
    for a pipeline stage and for an expert-parallel rank alike; the saving job's args say which."""
    ep_only = (getattr(args, "expert_model_parallel_size", 1) or 1) > 1 and (
        getattr(args, "pipeline_model_parallel_size", 1) or 1) == 1
    out = {}
    for p in folder.iterdir():
        m = megatron_files.RANK_DIR.match(p.name)
        if p.is_dir() and m:
            second = int(m[2]) if m[2] else 0
            rank = (int(m[1]), 0, second) if ep_only and m[3] is None else (int(m[1]), second, int(m[3] or 0))
            out[rank] = p
    return out


class LegacyFiles:
    """The per-rank files of one legacy iteration as full tensors by global name (the format half of a
    :class:`~parallel_bridge.checkpoint.megatron_reader.MegatronCheckpoint`)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        any_file = next(p / "model_optim_rng.pt" for p in sorted(folder.iterdir())
                        if p.is_dir() and megatron_files.RANK_DIR.match(p.name))
        first = self._read(any_file)
        saved = first.get("args")
        dirs = rank_folders(folder, saved)
        self._files = {k: v / "model_optim_rng.pt" for k, v in dirs.items()}
        self._loaded: dict[Rank, dict[str, Any]] = {k: first for k, f in self._files.items() if f == any_file}
        # the saving job's layout, as Megatron-LM records it; else what the folders show
        self.source_tp = getattr(saved, "tensor_model_parallel_size", None) or 1 + max(t for t, _, _ in dirs)
        self.source_pp = getattr(saved, "pipeline_model_parallel_size", None) or 1 + max(p for _, p, _ in dirs)
        self.source_ep = getattr(saved, "expert_model_parallel_size", None) or 1 + max(e for _, _, e in dirs)
        self.source_etp = getattr(saved, "expert_tensor_parallel_size", None) or self.source_tp
        self._check_layout(dirs)
        self._first_args = self._load((0, 0, 0)).get("args")
        self._where: dict[str, tuple[int, int, str]] = {}  # global name -> (pp stage, ep rank, local name)
        self._locate()
        self.tensors = {}
        for name, (p, e, local) in self._where.items():
            shards = []
            for t in range(self.source_tp):
                state = self._model_state((t, p, e))
                if local not in state:
                    raise CheckpointError(f"{self._files[(t, p, e)]} lacks tensor {local} that tp rank 0 has")
                shards.append(state[local])
            self.tensors[name] = TensorInfo(tuple(self._merge(name, [s.shape for s in shards], p, e)), shards[0].dtype)

    def _check_layout(self, dirs: dict[Rank, Path]) -> None:
        if self.source_etp != self.source_tp:
            raise CheckpointError(
                f"{self.path}: expert_tensor_parallel_size={self.source_etp} differs from tensor_model_parallel_size="
                f"{self.source_tp}; legacy per-rank files are read with the experts split like the rest: save with "
                f"--ckpt-format torch_dist to serve this layout"
            )
        for t in range(self.source_tp):
            for p in range(self.source_pp):
                for e in range(self.source_ep):
                    if (t, p, e) not in dirs:
                        want = (f"mp_rank_{t:02d}" + (f"_{p:03d}" if self.source_pp > 1 else "")
                                + (f"_{e:03d}" if self.source_ep > 1 else ""))
                        ep = f", ep={self.source_ep}" if self.source_ep > 1 else ""
                        raise CheckpointError(
                            f"rank folder {self.path / want} is missing (source tp={self.source_tp}, "
                            f"pp={self.source_pp}{ep})"
                        )
        for f in self._files.values():
            if not f.exists():
                raise CheckpointError(f"shard file {f} is missing")

    def _locate(self) -> None:
        """Each tensor's global name and where it is: dense ones from EP rank 0, each EP rank's experts."""
        offset = 0
        for p in range(self.source_pp):
            local_layers = set()
            for e in range(self.source_ep):
                state = self._model_state((0, p, e))
                experts = {int(m[2]) for n in state if (m := moe.LOCAL_EXPERT.search(n))}
                per_rank = max(experts, default=-1) + 1
                for local in state:
                    if local.endswith("_extra_state") or (e and not moe.is_expert(local)):
                        continue
                    local_layers.add(schema.layer_of(local))
                    name = megatron_files.global_param_name(local, offset, e, per_rank)
                    self._where[name] = (p, e, local)
            offset += len(local_layers - {None})

    @staticmethod
    def _read(f: Path) -> dict[str, Any]:
        state = Archive(f).objects()
        if not isinstance(state, dict):
            what = "Tensor" if isinstance(state, StoredTensor) else type(state).__name__
            raise CheckpointError(f"shard file {f} holds a {what}, not Megatron's state dict")
        return state

    def _load(self, rank: Rank) -> dict[str, Any]:
        if rank not in self._loaded:
            self._loaded[rank] = self._read(self._files[rank])
        return self._loaded[rank]

    def _model_state(self, rank: Rank) -> dict[str, StoredTensor]:
        ckpt = self._load(rank)
        state = ckpt.get("model", ckpt.get("model0"))
        if state is None:
            raise CheckpointError(f"{self._files[rank]} has no 'model' entry (keys: {sorted(ckpt)[:6]})")
        return state

    def _merge(self, name: str, shapes: list[torch.Size], p: int, e: int) -> list[int]:
        """The full shape from the TP shards' shapes; Megatron splits evenly, so they must all be equal. A
        tensor no kind declares keeps its shard's shape here: the checkpoint is refused once its config is
        read (which names the feature, MoE say, before the tensor)."""
        for t, s in enumerate(shapes[1:], 1):
            if s != shapes[0]:
                raise CheckpointError(
                    f"tensor {name}: shard {tuple(s)} in {self._files[(t, p, e)]} disagrees with {tuple(shapes[0])} "
                    f"in {self._files[(0, p, e)]}; Megatron's tensor-parallel shards of one tensor have equal shapes"
                )
        try:
            return list(schema.sharding_of(name).full_shape(shapes[0], len(shapes)))
        except UnknownTensorError:
            return list(shapes[0])

    def _args(self) -> tuple[Any, str] | None:
        return self._first_args, str(self._files[(0, 0, 0)])

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The full tensor ``name`` (or ``length`` entries from ``start`` along ``dim``) from its shards."""
        full = self._info(name).shape
        if dim is None:
            return self._read_ranges(name, 0, [(0, full[0])]) if full else self._stored(name)[0].read()
        return self._read_ranges(name, dim, [(start, length if length is not None else full[dim] - start)])

    def read_rows(self, name: str, index: list[tuple[int, int]]) -> torch.Tensor:
        """Row ranges ``[(start, length), ...]`` of ``name``, each shard's record read once for all of them."""
        self._info(name)
        return self._read_ranges(name, 0, index)

    def _info(self, name: str) -> TensorInfo:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        return self.tensors[name]

    def _stored(self, name: str) -> list[StoredTensor]:
        p, e, local = self._where[name]
        return [self._model_state((t, p, e))[local] for t in range(self.source_tp)]

    def _read_ranges(self, name: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Ranges along ``dim`` of the full tensor, concatenated: along the dimension TP split, only the shard
        pieces that hold them are read (the sharding's own :meth:`pieces`), straight into the output."""
        stored, sharding, full = self._stored(name), schema.sharding_of(name), self.tensors[name]
        split = len(stored) > 1 and sharding.dim is not None
        if split and sharding.dim != dim:  # across the split dimension: every shard, merged
            merged = sharding.merge(name, [s.read() for s in stored])
            if ranges == [(0, full.shape[dim])]:
                return merged
            return torch.cat([merged.narrow(dim, a, n) for a, n in ranges], dim=dim)
        shape = list(full.shape)
        shape[dim] = sum(n for _, n in ranges)
        out = torch.empty(shape, dtype=full.dtype)
        boxes: dict[int, list[tuple[list[int], list[int], torch.Tensor]]] = {}
        at = 0
        for a, n in ranges:
            for t, local, m in sharding.pieces(stored[0].shape[dim], len(stored), a, n) if split else [(0, a, n)]:
                offsets, lengths = [0] * len(shape), list(stored[t].shape)
                offsets[dim], lengths[dim] = local, m
                boxes.setdefault(t, []).append((offsets, lengths, out.narrow(dim, at, m)))
                at += m
        for t, wanted in boxes.items():
            stored[t].record.archive.read_boxes(stored[t], wanted)
        return out
