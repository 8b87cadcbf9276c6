"""Progress of long conversions and loads: a bar counting bytes with the rate (tqdm), shown only when asked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class _Silent:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def byte_progress(total: int, desc: str, show: bool) -> Iterator[Any]:
    """A bar of ``total`` bytes labelled ``desc`` (``update(n)`` after each ``n`` bytes), or a silent one."""
    if not show:
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, ncols=90,
              mininterval=0.5) as bar:
        yield bar
