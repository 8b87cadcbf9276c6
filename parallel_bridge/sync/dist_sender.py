"""The trainer side of the ``parallel_bridge_dist`` backend: :class:`DistSender`.

Trainer rank 0 hosts the session's store at the address the engines reach it at; every trainer rank and every
engine worker join one torch.distributed group there (:mod:`~parallel_bridge.sync.dist_group`). From the plan
each worker registered (the pieces it needs, in order) a trainer rank keeps what it owns; each round it sends
exactly those pieces, with their hashes, point to point while the engines stage: no rank gathers a full
tensor, data-parallel replicas and ZeRO partitions send nothing twice (a ZeRO-3 parameter is gathered once,
its pieces sent, then released).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import TrainerInitInfo

from parallel_bridge.errors import SyncError
from parallel_bridge.parallel.launch import free_port
from parallel_bridge.sync.control import ControlPlane, local_ip_towards
from parallel_bridge.sync.dist_group import form_group, tag, wait_all
from parallel_bridge.sync.dist_receiver import BACKEND
from parallel_bridge.sync.pieces import hash_axis, narrow, shard_hash
from parallel_bridge.sync.protocol import RoundSender

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    address: str = ""
    """HOST:PORT the engines reach trainer rank 0 at (default: this host's address, a free port)."""
    timeout_s: float = 300.0
    allow_nonfinite: bool = False


class DistSender(RoundSender):
    """Sends each serving worker its pieces of this rank's shards over the session's group."""

    backend = BACKEND
    init_info_cls = DistTrainerInitInfo

    def _setup(self) -> None:
        address, sizes = None, None
        if self.is_sender:
            address = self.init_info.address or f"{local_ip_towards('10.255.255.255')}:{free_port()}"
            self.control = ControlPlane(address, self.session, host=True, timeout_s=self.timeout_s)
            try:
                sizes = [int(c.world_size()) for c in self.client]
            except Exception as e:  # noqa: BLE001
                sizes = f"an engine's world size could not be read ({type(e).__name__}: {e})"
        address, sizes = self._agree((address, sizes))
        if isinstance(sizes, str):
            raise SyncError(sizes)
        joined = None
        if not self.is_sender:
            try:
                self.control = ControlPlane(address, self.session, host=False, timeout_s=self.timeout_s)
            except SyncError as e:
                joined = f"trainer rank {self.ctx.rank}: {e}"
        failed = [x for x in self._gather(joined, "join the weight-sync store") if x]
        if failed:
            raise SyncError(failed[0])
        self.control_address, self.sizes = address, sizes
        trainers = self.ctx.world_size
        self.offsets = [trainers + sum(sizes[:e]) for e in range(len(sizes))]
        self.world = trainers + sum(sizes)
        mine = {s: {t.name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in ts}
                for s, ts in self.source.shards().items()}
        self.entries, self.owners = {}, {}
        for rank, shards in enumerate(self._gather(mine, "list their shards")):
            for s, entries in shards.items():
                self.entries[s], self.owners[s] = entries, rank

    def _engine_info(self, engine: int) -> dict[str, Any]:
        return {**super()._engine_info(engine), "entries": self.entries, "owners": self.owners,
                "offset": self.offsets[engine], "world": self.world}

    reopens_after_failure = True

    def _connect(self) -> None:
        """Join the group, then keep from every worker's plan the pieces this rank owns."""
        self.pg = None  # a group an earlier session left
        device = torch.device("cuda") if torch.cuda.is_available() and _on_cuda(self.source) else torch.device("cpu")
        self.pg = form_group(self.control, self.ctx.rank, self.world, device, self.timeout_s)
        self.sends: dict[str, list[tuple[int, int, Any]]] = defaultdict(list)
        self.planned_bytes = 0
        for e, size in enumerate(self.sizes):
            for w in range(size):
                reg = self.control.get(self.control.worker_key(e, w))
                for i, (name, t, ranges) in enumerate(reg["plan"]):
                    s = self._stem_of(name, t)
                    if self.owners[s] == self.ctx.rank:
                        self.sends[name].append((reg["group_rank"], i, (name, t, tuple(map(tuple, ranges)))))
        logger.info("weight-sync plan: trainer rank %d sends %d pieces a round", self.ctx.rank,
                    sum(map(len, self.sends.values())))

    def _stem_of(self, name: str, t: int) -> str:
        from parallel_bridge.sync.pieces import shard_stems

        if not hasattr(self, "_where"):
            meta = self.source.round_meta()
            self._where = {}
            for stems in shard_stems(meta["source_tp"], meta["source_pp"], meta["experts"]):
                for s in stems:
                    for n in self.entries.get(s, {}):
                        self._where.setdefault(n, stems)
        return self._where[name][t]

    def _transfer(self, round_id: int) -> int:
        sent, works = 0, []
        for name, data, _, gathered in self.source.tensors():
            for dst, i, key in self.sends.get(name, ()):
                piece = narrow(data, key).contiguous()
                hashes = shard_hash(piece, hash_axis(name, piece.dim())).contiguous()
                works.append(self.pg.send([piece], dst, tag(round_id, i, 0)))
                works.append(self.pg.send([hashes], dst, tag(round_id, i, 1)))
                sent += piece.numel() * piece.element_size()
            if gathered:
                wait_all(works, self.timeout_s, f"sending round {round_id}")  # the gathered copy is released next
                works = []
        wait_all(works, self.timeout_s, f"sending round {round_id}")
        return sent

    def shutdown(self) -> None:
        self.pg = None
        super().shutdown()


def _on_cuda(source: Any) -> bool:
    return any(p.is_cuda for p in source.module.parameters())
