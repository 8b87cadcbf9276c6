"""The trainer side of the ``parallel_bridge_shm`` backend: :class:`SharedMemorySender`, vLLM's trainer
weight-transfer engine, built on every trainer rank through ``WeightTransferTrainerFactory.trainer_init``.

A round: publishing ranks write their shards to shared memory; all trainer ranks agree that publishing
succeeded; trainer rank 0 drives the vLLM engine (``start_weight_update``, ``update_weights`` stage and
commit, ``finish_weight_update`` with the version) and resets its prefix cache; every rank returns the
same :class:`SyncReport` or raises the same :class:`~parallel_bridge.errors.SyncError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Self

import torch.distributed as dist
from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

from parallel_bridge.errors import SyncError
from parallel_bridge.sync.receiver import BACKEND, report_path, serving_ranks
from parallel_bridge.sync.source import MegatronWeightSource

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SyncReport:
    """What one push moved: bytes per trainer rank (sent) and per serving rank (received and verified)."""

    version: int
    seconds: float
    publish_seconds: float
    engine_seconds: float
    stage_seconds: float
    apply_seconds: float
    sent_bytes: dict[int, int]
    received_bytes: dict[int, int]
    pieces_verified: int

    @property
    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


@dataclasses.dataclass
class ShmTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    root: str = ""
    timeout_s: float = 300.0


def _default_root() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / "parallel_bridge"


class SharedMemorySender(TrainerWeightTransferEngine[ShmTrainerInitInfo]):
    """Publishes a :class:`MegatronWeightSource` through shared memory and drives the engine's round."""

    init_info_cls = ShmTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: ShmTrainerInitInfo, *, client: Any, source: Any = None) -> Self:
        if not isinstance(source, MegatronWeightSource):
            raise SyncError(f"the {BACKEND} backend sends a MegatronWeightSource, got {type(source).__name__}")
        sender = cls(client=client, source=source, is_sender=init_info.is_sender)
        sender.ctx, sender.version, sender.attempts = source.ctx, 0, 0
        dist.barrier()  # ranks arrive far apart (rank 0 starts the sender); the default group's timeout covers it
        sender.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=init_info.timeout_s))
        session = sender._agree(uuid.uuid4().hex[:12] if sender.is_sender else None)
        sender.root = Path(init_info.root or _default_root()) / session
        sender.writers = source.shard_files(sender.root)
        sender._barrier("set-up")
        outcome = None
        if sender.is_sender:
            info = {"root": str(sender.root), **source.round_meta()}
            try:
                client.init_weight_transfer_engine(info)
                sender.serving_ranks = serving_ranks(sender.root)
                outcome = {"serving_ranks": sender.serving_ranks}
            except Exception as e:  # noqa: BLE001 - every trainer rank raises the same error
                outcome = {"error": _engine_error("init_weight_transfer_engine", e)}
        outcome = sender._agree(outcome)
        if "error" in outcome:
            sender.shutdown()
            raise SyncError(outcome["error"])
        sender.serving_ranks = outcome["serving_ranks"]
        return sender

    # ------------------------------------------------------------ collectives
    def _agree(self, value: Any) -> Any:
        """Trainer rank 0's ``value`` on every trainer rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _barrier(self, what: str) -> None:
        try:
            dist.barrier(group=self.group)
        except RuntimeError as e:
            raise SyncError(f"trainer ranks did not all reach {what} ({e}); a rank died or hung") from e

    # ------------------------------------------------------------ a round
    def send_weights(self) -> SyncReport:
        # every attempt gets a new number, so nothing left from a failed round can pass as this one's
        self.attempts += 1
        version = self.attempts
        start = time.perf_counter()
        try:
            sent = self.source.publish(self.writers)
            for writer in self.writers:
                writer.commit(version, self.source.round_meta())
            local = {"rank": self.ctx.rank, "sent": sent, "error": None}
        except Exception as e:  # noqa: BLE001 - reported to every rank
            local = {"rank": self.ctx.rank, "sent": 0, "error": f"{type(e).__name__}: {e}"}
        everyone: list[Any] = [None] * dist.get_world_size(self.group)
        try:
            dist.all_gather_object(everyone, local, group=self.group)
        except RuntimeError as e:
            raise SyncError(
                f"weight round {version}: trainer ranks did not all publish ({e}); a rank died or hung. "
                f"The engine keeps serving version {self.version}"
            ) from e
        publish_s = time.perf_counter() - start
        outcome = None
        if self.is_sender:
            failed = [s for s in everyone if s["error"]]
            if failed:
                outcome = {"error": f"weight round {version}: trainer rank {failed[0]['rank']} could not "
                           f"publish: {failed[0]['error']}. The engine keeps serving version {self.version}"}
            else:
                outcome = self._drive(version)
                outcome["sent"] = {s["rank"]: s["sent"] for s in everyone if s["sent"]}
        outcome = self._agree(outcome)
        if "error" in outcome:
            raise SyncError(outcome["error"])
        self.version = version
        self.source.published = (str(self.root), version)
        return SyncReport(
            version=version,
            seconds=time.perf_counter() - start,
            publish_seconds=publish_s,
            engine_seconds=outcome["engine_seconds"],
            stage_seconds=outcome["stage"],
            apply_seconds=outcome["apply"],
            sent_bytes=outcome["sent"],
            received_bytes=outcome["received"],
            pieces_verified=outcome["verified"],
        )

    def _drive(self, version: int) -> dict[str, Any]:
        """Trainer rank 0: one round on the engine; an ``{"error": ...}`` outcome if it failed."""
        client = self.client
        pause, resume = getattr(client, "pause", None), getattr(client, "resume", None)
        if pause is not None:
            try:
                pause()  # a server: in-flight requests finish on the old weights first
            except Exception as e:  # noqa: BLE001
                return {"error": _engine_error("pause", e)}
        try:
            return self._round(version)
        finally:
            if resume is not None:
                resume()

    def _round(self, version: int) -> dict[str, Any]:
        start = time.perf_counter()
        client = self.client
        try:
            client.start_weight_update()
        except Exception as e:  # noqa: BLE001
            return {"error": _engine_error("start_weight_update", e)}
        try:
            client.update_weights({"op": "stage", "version": version})
            client.update_weights({"op": "commit", "version": version})
        except Exception as e:  # noqa: BLE001
            why = next((r["error"] for r in self._reports(version) if r and r["error"]), None)
            return {
                "error": f"weight round {version} failed on the engine, which keeps serving version "
                f"{self.version}: {why or _engine_error('update_weights', e)}"
            }
        try:
            client.finish_weight_update(weight_version=str(version))
            reset = getattr(client, "reset_prefix_cache", None)
            if reset is None or reset() is False:
                raise SyncError("the engine's prefix cache could not be reset after the update")
        except Exception as e:  # noqa: BLE001
            return {"error": _engine_error("finish_weight_update", e)}
        reports = self._reports(version)
        missing = [r for r, rep in zip(self.serving_ranks, reports) if rep is None]
        if missing:
            return {"error": f"weight round {version}: serving ranks {missing} reported nothing"}
        empty = [rep["rank"] for rep in reports if rep["bytes"] <= 0]
        if empty:
            return {"error": f"weight round {version}: serving ranks {empty} received zero bytes"}
        return {
            "engine_seconds": time.perf_counter() - start,
            "received": {rep["rank"]: rep["bytes"] for rep in reports},
            "verified": sum(rep["pieces_verified"] for rep in reports),
            "stage": max(rep["stage_seconds"] for rep in reports),
            "apply": max(rep.get("apply_seconds", 0.0) for rep in reports),
        }

    def _reports(self, version: int) -> list[dict[str, Any] | None]:
        out = []
        for rank in self.serving_ranks:
            path = report_path(self.root, version, rank)
            out.append(json.loads(path.read_text()) if path.exists() else None)
            if path.exists():
                path.unlink()
        return out

    def shutdown(self) -> None:
        """Remove this session's shared-memory files (trainer rank 0, after every rank is done)."""
        if getattr(self, "root", None) is None:
            return
        if self.is_sender and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)


def _engine_error(call: str, e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = text[-1] if text else type(e).__name__
    if "Weight transfer not configured" in str(e):
        last = (
            f"the engine has no weight transfer configured: start it with "
            f"weight_transfer_config=WeightTransferConfig(backend={BACKEND!r})"
        )
    return f"the vLLM engine failed {call}: {last}"


