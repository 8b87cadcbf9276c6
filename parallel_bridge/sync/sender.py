"""The trainer side of the ``parallel_bridge_shm`` backend: :class:`SharedMemorySender`.

Publishing trainer ranks write their shards into files under ``/dev/shm/parallel_bridge/<session>/`` (mapped
once, rewritten in place every round) before the engines stage; the engine's workers on the same host copy
their pieces out. The round itself (agreement, reports, commit on every engine or none, versions) is the
protocol's (:class:`~parallel_bridge.sync.protocol.RoundSender`); its control plane is a store on
``127.0.0.1`` hosted by trainer rank 0. A session folder records its trainer's pid: the next trainer to
start removes the folders of trainers that died.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from vllm.distributed.weight_transfer.base import TrainerInitInfo

from parallel_bridge.checkpoint.outputs import pid_alive
from parallel_bridge.parallel.launch import free_port
from parallel_bridge.sync.control import ControlPlane
from parallel_bridge.sync.protocol import RoundSender
from parallel_bridge.sync.receiver import BACKEND

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ShmTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    root: str = ""
    timeout_s: float = 300.0
    allow_nonfinite: bool = False


def default_root() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / "parallel_bridge"


def sweep_dead_sessions(root: Path) -> list[Path]:
    """Remove the session folders under ``root`` whose trainer (on this host) is gone; returns them."""
    removed = []
    for folder in root.glob("*/owner.json"):
        try:
            owner = json.loads(folder.read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0))):
            shutil.rmtree(folder.parent, ignore_errors=True)
            removed.append(folder.parent)
    if removed:
        logger.info("removed %d weight-sync folders of trainers that died: %s", len(removed), removed)
    return removed


class SharedMemorySender(RoundSender):
    """Publishes a :class:`~parallel_bridge.sync.source.MegatronWeightSource` through shared memory."""

    backend = BACKEND
    init_info_cls = ShmTrainerInitInfo

    def _setup(self) -> None:
        base = Path(self.init_info.root or default_root())
        self.root = base / self.session
        address = None
        if self.is_sender:
            sweep_dead_sessions(base)
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            address = f"127.0.0.1:{free_port()}"
            self.control = ControlPlane(address, self.session, host=True, timeout_s=self.timeout_s)
        self.control_address = self._agree(address)
        self.writers = self.source.shard_files(self.root)
        self._barrier("set up the shared-memory round")

    def _engine_info(self, engine: int) -> dict[str, Any]:
        return {**super()._engine_info(engine), "root": str(self.root)}

    def _publish(self, round_id: int) -> int:
        sent = self.source.publish(self.writers)
        for writer in self.writers:
            writer.commit(round_id, self.source.round_meta())
        self.source.published = (str(self.root), round_id)
        return sent

    def shutdown(self) -> None:
        """Remove this session's shared-memory files (trainer rank 0, after every rank is done)."""
        super().shutdown()
        root = getattr(self, "root", None)
        if root is not None and self.is_sender and root.exists():
            shutil.rmtree(root, ignore_errors=True)
