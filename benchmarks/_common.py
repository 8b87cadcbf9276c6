"""Shared benchmark helpers: interleaved timing, a printed table, a JSON result file.

Importing it keeps vLLM to errors only (its start-up logs, and the traceback its chat-template warm-up logs
when there is no tokenizer, are not the benchmark's output) unless VLLM_LOGGING_LEVEL says otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # a benchmark script's own process and its children


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print rows as a table and write them, with machine facts, to results/<name>.json."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "rows": rows,
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
