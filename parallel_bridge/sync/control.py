"""The weight sync's control plane: a c10d ``TCPStore`` that trainer rank 0 hosts, whatever moves the bytes.

Engines' workers register there at set-up (their rank, TP degree, served version and, for transports that
plan, the pieces they need), post each round's report there, and find out whether the trainer that holds
them is still alive. Keys live under the session: ``pb/{session}/...``. Nothing goes through files.
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import timedelta
from typing import Any

from parallel_bridge.errors import SyncError

logger = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SyncError(f"weight-sync address {address!r} is not HOST:PORT (e.g. 10.0.0.1:29650)")
    return host.strip("[]"), int(port)


def local_ip_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (what the peer can reach us at)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class ControlPlane:
    """One session's keys in the trainer's store: hosted (trainer rank 0) or joined (everyone else)."""

    def __init__(self, address: str, session: str, *, host: bool, timeout_s: float) -> None:
        import torch.distributed as dist

        self.address, self.session = address, session
        name, port = split_address(address)
        try:
            self.store = dist.TCPStore(
                "0.0.0.0" if host else name, port, None, host, timeout=timedelta(seconds=timeout_s),
                wait_for_workers=False, use_libuv=True,
            )
        except (RuntimeError, OSError) as e:
            what = "could not listen on" if host else "could not reach the trainer's weight-sync store at"
            raise SyncError(f"{what} {address} within {timeout_s:g} s ({str(e).splitlines()[0]})") from e
        if host:
            self.set("alive", {"session": session})

    def key(self, what: str) -> str:
        return f"pb/{self.session}/{what}"

    def set(self, what: str, value: Any) -> None:
        self.store.set(self.key(what), json.dumps(value))

    def get(self, what: str) -> Any:
        """The value at ``what``, waiting for it up to the store's timeout."""
        try:
            return json.loads(self.store.get(self.key(what)))
        except RuntimeError as e:
            raise SyncError(f"the weight-sync store at {self.address} has no {what} ({str(e).splitlines()[0]})") from e

    def poll(self, what: str) -> Any | None:
        """The value at ``what`` if it is there now, else None."""
        k = self.key(what)
        return json.loads(self.store.get(k)) if self.store.check([k]) else None

    def pop(self, what: str) -> Any | None:
        value = self.poll(what)
        if value is not None:
            self.store.delete_key(self.key(what))
        return value

    def worker_key(self, engine: int, rank: int) -> str:
        return f"engine{engine}/worker{rank}"

    def report_key(self, round_id: int, engine: int, rank: int) -> str:
        return f"round{round_id}/engine{engine}/worker{rank}"


def trainer_alive(address: str, session: str, timeout_s: float = 3.0) -> bool:
    """Whether the trainer that opened ``session`` still answers at ``address`` (its store is up)."""
    import torch.distributed as dist

    try:
        name, port = split_address(address)
        socket.create_connection((name, port), timeout=timeout_s).close()  # refused at once when nobody listens
        store = dist.TCPStore(name, port, None, False, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False, use_libuv=True)
        return bool(store.check([f"pb/{session}/alive"]))
    except (RuntimeError, OSError, SyncError):
        return False
