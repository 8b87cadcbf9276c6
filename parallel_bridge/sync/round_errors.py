"""Why a weight round failed, in words every trainer rank raises: a refusal before any engine sees the round
(non-finite weights, a rank that could not publish), a serving rank's report, an engine call that failed."""

from __future__ import annotations

from typing import Any


def refusal(everyone: list[dict[str, Any]], version: int) -> str | None:
    """Why a round cannot start (every rank computes the same from the gathered statuses), or None."""
    keeps = f"The engines keep serving version {version}"
    for s in everyone:
        if s["nonfinite"]:
            name, count = s["nonfinite"][0]
            more = f" (and {len(s['nonfinite']) - 1} more tensors)" if len(s["nonfinite"]) > 1 else ""
            return (f"tensor {name} holds {count} non-finite values (NaN/Inf) on trainer rank {s['rank']}{more}: "
                    f"the round is refused before any engine sees it. {keeps}; WeightSync(..., allow_nonfinite="
                    f"True) sends them anyway")
    failed = next((s for s in everyone if s["error"]), None)
    if failed:
        return f"trainer rank {failed['rank']} could not publish: {failed['error']}. {keeps}"
    return None


def failed_report(reports: list[list[dict[str, Any] | None]]) -> str | None:
    for e, rs in enumerate(reports):
        for r in rs:
            if r is not None and r["error"]:
                where = f"engine {e}, " if len(reports) > 1 else ""
                return f"{where}serving rank {r['rank']}: {r['error']}"
    return None


def empty_reports(reports: list[list[dict[str, Any] | None]]) -> str | None:
    for e, rs in enumerate(reports):
        where = f"engine {e}: " if len(reports) > 1 else ""
        missing = [i for i, r in enumerate(rs) if r is None]
        if missing:
            return f"{where}serving ranks {missing} reported nothing"
        empty = [r["rank"] for r in rs if r["bytes"] <= 0]
        if empty:
            return f"{where}serving ranks {empty} received zero bytes"
    return None


def engine_error(call: str, e: BaseException, engine: int | None) -> str:
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    last = text[-1] if text else type(e).__name__
    found = next((line for line in text if "SyncError" in line or "held by another trainer" in line), None)
    last = found.split("SyncError: ", 1)[-1] if found else last
    if "Weight transfer not configured" in str(e):
        last = ("the engine has no weight transfer configured: start it with weight_transfer_config="
                "WeightTransferConfig(backend=...) naming this backend")
    where = f"engine {engine}" if engine is not None else "the vLLM engine"
    return f"{where} failed {call}: {last}"
