"""The trainer side of a weight round, whatever transport carries it: :class:`RoundSender`, vLLM's trainer
weight-transfer engine, built on every trainer rank through ``WeightTransferTrainerFactory.trainer_init``.

A round: every trainer rank checks its tensors are finite and the transport publishes what it can ahead
(:meth:`RoundSender._publish`); all trainer ranks agree that it worked; trainer rank 0 starts the update on
every engine and has each stage the round while the trainer ranks transfer (:meth:`RoundSender._transfer`);
from every serving rank's report (through the control plane, :mod:`~parallel_bridge.sync.control`) rank 0
commits on every engine, or aborts on every one if any rank of any engine failed; every trainer rank then
returns the same :class:`SyncReport` or raises the same :class:`~parallel_bridge.errors.SyncError`.
Versions count commits: a failed round does not use one, and a trainer taking over an engine continues
from the version it serves. Transports: :mod:`~parallel_bridge.sync.sender` (shared memory, one host),
:mod:`~parallel_bridge.sync.dist_sender` (torch.distributed, across hosts).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Self

import torch.distributed as dist
from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine

from parallel_bridge.errors import SyncError
from parallel_bridge.sync.round_errors import empty_reports, engine_error, failed_report, refusal
from parallel_bridge.sync.source import MegatronWeightSource


@dataclasses.dataclass(frozen=True)
class SyncReport:
    """What one push moved: bytes per trainer rank (sent) and, per engine, per serving rank (received and
    verified); ``version`` is the number of commits so far."""

    version: int
    seconds: float
    publish_seconds: float
    engine_seconds: float
    stage_seconds: float
    apply_seconds: float
    sent_bytes: dict[int, int]
    received: tuple[dict[int, int], ...]
    pieces_verified: int

    @property
    def received_bytes(self) -> dict[int, int]:
        """The first engine's bytes per serving rank (``received`` holds every engine's)."""
        return self.received[0]

    @property
    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


class RoundSender(TrainerWeightTransferEngine):
    """Drives rounds over the trainer ranks' own gloo group and the engines' weight-sync clients."""

    backend = ""

    @classmethod
    def trainer_init(cls, init_info: Any, *, client: Any, source: Any = None) -> Self:
        if not isinstance(source, MegatronWeightSource):
            raise SyncError(f"the {cls.backend} backend sends a MegatronWeightSource, got {type(source).__name__}")
        clients = list(client) if isinstance(client, (list, tuple)) else [client]
        sender = cls(client=clients, source=source, is_sender=init_info.is_sender)
        sender.ctx, sender.init_info, sender.version, sender.round = source.ctx, init_info, 0, 0
        sender.timeout_s, sender.check_finite = init_info.timeout_s, not init_info.allow_nonfinite
        dist.barrier()  # ranks arrive far apart (rank 0 starts the engines); the default group's timeout covers it
        # the trainer ranks wait for each other across a whole round: a transfer and the engine calls around it
        sender.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=4 * init_info.timeout_s))
        sender.session = sender._agree(uuid.uuid4().hex[:12] if sender.is_sender else None)
        sender.control, sender.replaces, sender.reopen, sender.dangling = None, "", False, set()
        try:
            sender._setup()
            sender._open_engines()
        except BaseException:
            sender.shutdown()
            raise
        return sender

    # ------------------------------------------------------------ collectives
    def _agree(self, value: Any) -> Any:
        """Trainer rank 0's ``value`` on every trainer rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, value: Any, what: str) -> list[Any]:
        everyone: list[Any] = [None] * dist.get_world_size(self.group)
        try:
            dist.all_gather_object(everyone, value, group=self.group)
        except RuntimeError as e:
            raise SyncError(f"trainer ranks did not all {what} ({str(e).splitlines()[0]}); a rank died or "
                            f"hung. The engines keep serving version {self.version}") from e
        return everyone

    def _barrier(self, what: str) -> None:
        try:
            dist.barrier(group=self.group)
        except RuntimeError as e:
            raise SyncError(f"trainer ranks did not all reach {what} ({e}); a rank died or hung") from e

    # ------------------------------------------------------------ transport hooks
    def _setup(self) -> None:
        """The transport's set-up on every trainer rank, before the engines are opened (collective)."""

    def _engine_info(self, engine: int) -> dict[str, Any]:
        """The init info engine ``engine``'s workers get."""
        return {"store": self.control_address, "session": self.session, "engine": engine,
                "timeout_s": self.timeout_s, "replaces": self.replaces, **self.source.round_meta()}

    reopens_after_failure = False
    """Whether a round that failed on the way leaves the transport to be set up again (a torch.distributed group
    after a timeout) before the next round."""

    def _reopen(self) -> None:
        """Set the transport and the engines up again under a new session that replaces this one (collective)."""
        self.replaces, old = self.session, self.session
        self.session = self._agree(uuid.uuid4().hex[:12] if self.is_sender else None)
        self.control.session = self.session
        if self.is_sender:
            self.control.set("alive", {"session": self.session, "replaces": old})
        self._open_engines()
        self.reopen = False

    def _connect(self) -> None:
        """Runs on every trainer rank while rank 0 opens the engines (joining the transport's group)."""

    def _publish(self, round_id: int) -> int:
        """What the transport moves before the engines stage (bytes); shared memory writes the round here."""
        return 0

    def _transfer(self, round_id: int) -> int:
        """What the transport moves while the engines stage (bytes)."""
        return 0

    # ------------------------------------------------------------ set-up
    def _open_engines(self) -> None:
        outcome = None
        if self.is_sender:
            outcome = self._call_engines("init_weight_transfer_engine", lambda e: (self._engine_info(e),),
                                         alongside=self._connect)
            for e in outcome.get("failed", []):  # the engine's own words, posted to the store
                why = self.control.poll(f"engine{e}/error")
                if why:
                    where = f"engine {e}" if len(self.client) > 1 else "the vLLM engine"
                    outcome["error"] = f"{where} refused the weight sync: {why.split('SyncError: ', 1)[-1]}"
                    break
            if "error" not in outcome:
                outcome = self._registered()
            local = None
        else:
            try:
                self._connect()
                local = None
            except Exception as e:  # noqa: BLE001 - every trainer rank raises the same error
                local = f"trainer rank {self.ctx.rank}: {e}"
        outcome = self._agree(outcome)
        failed = [x for x in self._gather(local, "set up the transport") if x]
        if "error" in outcome or failed:
            raise SyncError(outcome.get("error") or failed[0])
        self.workers, self.version = outcome["workers"], outcome["version"]

    def _registered(self) -> dict[str, Any]:
        """Trainer rank 0: every engine's workers as they registered, and the version to continue from."""
        workers = []
        for e in range(len(self.client)):
            n = int(self.control.store.add(self.control.key(f"engine{e}/workers"), 0))
            workers.append([self.control.get(self.control.worker_key(e, r)) for r in range(n)])
        versions = sorted({w["version"] for ws in workers for w in ws})
        return {"workers": workers, "version": versions[-1] if versions else 0}

    def _call_engines(self, call: str, args: Any, alongside: Any = None) -> dict[str, Any]:
        """Trainer rank 0: ``client.call(*args(e))`` on every engine at once (and ``alongside()`` here);
        ``{}``, or ``{"error": ...}`` naming the first engine that failed."""
        with ThreadPoolExecutor(max_workers=len(self.client)) as pool:
            futures = [pool.submit(getattr(c, call), *args(e)) for e, c in enumerate(self.client)]
            local = None
            if alongside is not None:
                try:
                    alongside()
                except Exception as e:  # noqa: BLE001
                    local = e
            errors = []
            for e, f in enumerate(futures):
                try:
                    f.result()
                except Exception as exc:  # noqa: BLE001 - every trainer rank raises the same error
                    errors.append((e, exc))
        if errors:
            e, exc = errors[0]
            return {"error": engine_error(call, exc, e if len(self.client) > 1 else None), "failed": [i for i, _ in errors]}
        if local is not None:
            return {"error": f"{type(local).__name__}: {local}"}
        return {}

    # ------------------------------------------------------------ a round
    def send_weights(self) -> SyncReport:
        if self.reopen:
            self._reopen()
        self.round += 1  # a round's own number: nothing a failed round left can pass as a later one's
        round_id, start = self.round, time.perf_counter()
        local = {"rank": self.ctx.rank, "sent": 0, "error": None, "nonfinite": []}
        try:
            local["nonfinite"] = self.source.nonfinite() if self.check_finite else []
            if not local["nonfinite"]:
                local["sent"] = self._publish(round_id)
        except Exception as e:  # noqa: BLE001 - reported to every rank
            local["error"] = f"{type(e).__name__}: {e}"
        why = refusal(self._gather(local, f"publish weight round {round_id}"), self.version)
        if why:
            raise SyncError(why)
        publish_s = time.perf_counter() - start
        if self.is_sender:
            outcome = self._drive(round_id, local["sent"])
        else:
            sent, error = self._transfer_guarded(round_id)
            self._gather({"rank": self.ctx.rank, "sent": local["sent"] + sent, "error": error}, "finish the transfer")
            outcome = None
        try:
            outcome = self._agree(outcome)
        except RuntimeError as e:
            self.reopen = self.reopens_after_failure
            raise SyncError(f"weight round {round_id}: trainer rank 0 did not report the outcome ({e}); the "
                            f"engines keep serving version {self.version}") from e
        if "error" in outcome:
            self.reopen = self.reopens_after_failure
            raise SyncError(outcome["error"])
        self.version = outcome["version"]
        return SyncReport(
            version=self.version, seconds=time.perf_counter() - start, publish_seconds=publish_s,
            engine_seconds=outcome["engine_seconds"], stage_seconds=outcome["stage"], apply_seconds=outcome["apply"],
            sent_bytes={int(k): v for k, v in outcome["sent"].items()},
            received=tuple({int(k): v for k, v in r.items()} for r in outcome["received"]),
            pieces_verified=outcome["verified"],
        )

    def _transfer_guarded(self, round_id: int) -> tuple[int, str | None]:
        try:
            return self._transfer(round_id), None
        except Exception as e:  # noqa: BLE001 - reported to every rank
            return 0, f"{type(e).__name__}: {e}"

    def _drive(self, round_id: int, published: int) -> dict[str, Any]:
        """Trainer rank 0: the round on every engine; an ``{"error": ...}`` outcome if it failed anywhere."""
        paused = []
        for e in sorted(self.dangling):  # a round an engine could not be told the end of, ended now
            try:
                self.client[e].finish_weight_update(weight_version=None)
            except Exception:  # noqa: BLE001, S110 - nothing was left open there
                pass
        self.dangling.clear()
        for e, c in enumerate(self.client):
            try:
                if hasattr(c, "pause"):
                    c.pause()  # a server: in-flight requests finish on the old weights first
                    paused.append(c)
            except Exception as exc:  # noqa: BLE001
                self._resume(paused)
                self._gather({"rank": 0, "sent": 0, "error": None}, "finish the transfer")
                return {"error": engine_error("pause", exc, e if len(self.client) > 1 else None)}
        try:
            return self._round(round_id, published)
        finally:
            self._resume(paused)

    def _resume(self, paused: list[Any]) -> None:
        """Resume the paused servers; one that cannot be reached now (a cut link) is retried in the background
        until it answers, so it never stays paused."""
        for c in paused:
            try:
                c.resume()
            except Exception:  # noqa: BLE001 - retried until the server is reachable again
                threading.Thread(target=_resume_later, args=(c, 4 * self.timeout_s), daemon=True).start()

    def _round(self, round_id: int, published: int) -> dict[str, Any]:
        begin, version = time.perf_counter(), self.version + 1
        started = self._call_engines("start_weight_update", lambda e: ())
        staged: dict[str, Any] = {}
        transfer: list[Any] = []

        def transfer_here() -> None:
            transfer.append(self._transfer_guarded(round_id) if "error" not in started else (0, None))

        if "error" in started:
            transfer_here()
        else:
            staged = self._call_engines("update_weights", lambda e: ({"op": "stage", "round": round_id},),
                                        alongside=transfer_here)
        sent, error = transfer[0]
        live = [e for e in range(len(self.client)) if e not in started.get("failed", [])]
        try:
            everyone = self._gather({"rank": 0, "sent": published + sent, "error": error}, "finish the transfer")
        except SyncError as e:
            self._end(live, round_id, None)
            return {"error": f"weight round {round_id}: {e}"}
        reports = self._reports(round_id)
        why = started.get("error") or failed_report(reports) or staged.get("error") or next(
            (f"trainer rank {s['rank']} could not send: {s['error']}" for s in everyone if s["error"]), None)
        if why is None:
            why = empty_reports(reports)
        if why is not None:
            self._end(live, round_id, None)
            return {"error": f"weight round {round_id} failed, every engine keeps serving version {self.version}: "
                             f"{why}"}
        committed = self._end(live, round_id, version)
        if "error" in committed:
            return committed
        applied = [[self.control.poll(self.control.report_key(round_id, e, w["rank"]) + "/applied") or {}
                    for w in ws] for e, ws in enumerate(self.workers)]
        flat = [r for rs in reports for r in rs]
        return {
            "version": version, "engine_seconds": time.perf_counter() - begin,
            "sent": {s["rank"]: s["sent"] for s in everyone if s["sent"]},
            "received": [{r["rank"]: r["bytes"] for r in rs} for rs in reports],
            "verified": sum(r["pieces_verified"] for r in flat), "stage": max(r["stage_seconds"] for r in flat),
            "apply": max((a.get("apply_seconds", 0.0) for rs in applied for a in rs), default=0.0),
        }

    def _reports(self, round_id: int) -> list[list[dict[str, Any] | None]]:
        return [[self.control.pop(self.control.report_key(round_id, e, w["rank"])) for w in ws]
                for e, ws in enumerate(self.workers)]

    def _end(self, engines: list[int], round_id: int, version: int | None) -> dict[str, Any]:
        """Commit (``version`` given) or abort the round on ``engines``, then finish the update there."""
        op = {"op": "commit" if version else "abort", "round": round_id, "version": version or 0}
        outcome: dict[str, Any] = {}
        for e in engines:
            c = self.client[e]
            try:
                c.update_weights(op)
                c.finish_weight_update(weight_version=str(version) if version else None)
                if version and getattr(c, "reset_prefix_cache", lambda: False)() is False:
                    raise SyncError("the engine's prefix cache could not be reset after the update")
            except Exception as exc:  # noqa: BLE001
                self.dangling.add(e)
                outcome = outcome or {"error": engine_error(f"{op['op']} of round {round_id}", exc,
                                                             e if len(self.client) > 1 else None)}
        return outcome

    def shutdown(self) -> None:
        """Release the transport and the control plane (every rank, after every rank is done)."""
        self.control = None


def _resume_later(client: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            client.resume()
            return
        except Exception:  # noqa: BLE001, S112 - not reachable yet
            continue
