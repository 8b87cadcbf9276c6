"""The ``parallel_bridge_dist`` weight-transfer backend, serving side: :class:`DistReceiver`.

At set-up a worker lists, from the shards' metadata alone, every piece its rows and columns are made of
(:class:`~parallel_bridge.sync.pieces.PlanRecorder` under :func:`~parallel_bridge.spec.slices.rank_parts`), joins
the session's group (:mod:`~parallel_bridge.sync.dist_group`) and registers the list: that is the transfer plan,
computed once per (trainer layout, engine layout) and rebuilt whenever the trainer sets up again. A round posts
a receive for each piece (its bytes and the sender's hashes) from the trainer rank that owns it, on the
worker's device, then serves its reads from what landed (:class:`~parallel_bridge.sync.pieces.LandedReader`),
each piece verified. The rest is the round protocol's (:class:`~parallel_bridge.sync.receiving.RoundReceiver`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from parallel_bridge.sync.dist_group import form_group, tag, wait_all
from parallel_bridge.sync.pieces import LandedReader, PieceKey, PlanRecorder, hash_axis, shard_stems
from parallel_bridge.sync.receiving import RoundInitInfo, RoundReceiver

BACKEND = "parallel_bridge_dist"


@dataclasses.dataclass
class DistInitInfo(RoundInitInfo):
    entries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Every trainer shard's tensors: shard name -> tensor name -> {shape, dtype}."""
    owners: dict[str, int] = dataclasses.field(default_factory=dict)
    """Shard name -> the trainer rank that sends it."""
    offset: int = 0
    """The group rank of this engine's worker 0."""
    world: int = 0
    """The group's size: trainer ranks and every engine's workers."""


class DistReceiver(RoundReceiver):
    """Receives this rank's pieces point to point from the trainer ranks that own them."""

    backend = BACKEND
    init_info_cls = DistInitInfo

    def _connect(self, info: DistInitInfo) -> dict[str, Any]:
        from parallel_bridge.spec.model import GPTConfig

        files = shard_stems(info.source_tp, info.source_pp, tuple(info.experts) if info.experts else None)
        recorder = PlanRecorder(GPTConfig(**info.config), info.entries, files)
        self._parts(recorder)
        self.files = files
        self.plan: list[tuple[PieceKey, int, tuple[int, ...], torch.dtype]] = [
            (key, info.owners[recorder.shard_of(key)], recorder.piece_shape(key), recorder._local(key[0], key[1])[1])
            for key in recorder.pieces
        ]
        _, _, world_rank = self._rank()
        self.group_rank = info.offset + world_rank
        self.group = form_group(self.control, self.group_rank, info.world, self.device, info.timeout_s)
        return {"group_rank": self.group_rank,
                "plan": [[key[0], key[1], [list(r) for r in key[2]]] for key, *_ in self.plan]}

    def _arrive(self, round_id: int) -> LandedReader:
        info, landed, works = self.info, {}, []
        for i, (key, src, shape, dtype) in enumerate(self.plan):
            piece = self._pool.take(shape, dtype)
            hashes = torch.empty(shape[hash_axis(key[0], len(shape))], dtype=torch.int64, device=self.device)
            works.append(self.group.recv([piece], src, tag(round_id, i, 0)))
            works.append(self.group.recv([hashes], src, tag(round_id, i, 1)))
            landed[key] = (piece, hashes)
        wait_all(works, info.timeout_s, f"receiving round {round_id}'s {len(self.plan)} pieces from the trainer")
        from parallel_bridge.spec.model import GPTConfig

        return LandedReader(GPTConfig(**info.config), info.entries, self.files, self._pool, landed)

    def shutdown(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            try:
                group.abort() if hasattr(group, "abort") else None
            except Exception:  # noqa: BLE001, S110 - a gone trainer's group
                pass
        self.group = None
        super().shutdown()
