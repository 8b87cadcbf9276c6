"""The ``parallel_bridge_dist`` transport's process group: trainer ranks and every engine's workers in one
torch.distributed group, formed through the trainer's store (gloo for CPU tensors, NCCL for CUDA ones), and
the tags a round's pieces travel under.

Ranks: trainer rank ``r`` is ``r``; worker ``w`` of engine ``e`` is ``trainers + offsets[e] + w``. The group
is built directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` on a ``PrefixStore``), never as the process's
default group, so it lives beside the trainer's own world and vLLM's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

from parallel_bridge.errors import SyncError
from parallel_bridge.sync.control import ControlPlane, local_ip_towards, split_address

_PIECE_BITS = 20
"""Pieces per worker per round are numbered below 2**20; the round's number (mod 2**9) sits above them, so a
message left from a failed round never matches a later round's receive."""


def tag(round_id: int, piece: int, part: int) -> int:
    """The tag of ``part`` (0: bytes, 1: hashes) of piece ``piece`` in round ``round_id``."""
    if piece >= 1 << (_PIECE_BITS - 1):
        raise SyncError(f"a serving rank needs {piece} pieces in one round; at most {1 << (_PIECE_BITS - 1)}")
    return ((round_id % 512) << _PIECE_BITS) | (2 * piece + part)


def form_group(control: ControlPlane, rank: int, size: int, device: torch.device, timeout_s: float) -> Any:
    """This process's member of the session's group (blocks until all ``size`` members joined)."""
    import torch.distributed as dist

    store = dist.PrefixStore(control.key("group/"), control.store)
    timeout = timedelta(seconds=timeout_s)
    try:
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, size, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            host = local_ip_towards(split_address(control.address)[0])
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            opts._timeout = timeout
            pg = dist.ProcessGroupGloo(store, rank, size, opts)
    except RuntimeError as e:
        raise SyncError(
            f"the weight-sync group (rank {rank} of {size}) did not form within {timeout_s:g} s: "
            f"{str(e).splitlines()[0]}; every trainer rank and every engine worker must reach {control.address}"
        ) from e
    return pg


def wait_all(works: list[Any], timeout_s: float, what: str) -> None:
    for w in works:
        try:
            w.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            raise SyncError(f"{what} did not complete within {timeout_s:g} s ({str(e).splitlines()[0]}); a peer "
                            f"died, hung or lost its link") from e
