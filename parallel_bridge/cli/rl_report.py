"""What ``parallel-bridge rl`` shows of a run: the table, the summary line, the figure, and the steps whose
train/serve gap rounding cannot explain."""

from __future__ import annotations

from pathlib import Path


def print_table(report: dict) -> None:
    print(f"      {'step':>4} {'reward':>7} {'held-out':>9} {'max|dlogp|':>11} {'mean|dlogp|':>12} "
          f"{'bound max/mean':>16} {'version':>8} {'MB pushed':>10}")
    print(f"      {0:>4} {'':>7} {report['heldout_acc_start']:>9.3f}")
    for r in report["steps"]:
        print(
            f"      {r['step']:>4} {r['reward']:>7.3f} {r['heldout_acc']:>9.3f} {r['mismatch_max']:>11.1e} "
            f"{r['mismatch_mean']:>12.1e} {r['bound_max']:>8.1e}/{r['bound_mean']:.0e} {r['weights_version']:>8} "
            f"{r['push_bytes'] / 1e6:>10.2f}"
        )


def beyond_rounding(report: dict) -> list[dict]:
    """The steps whose train/serve gap exceeds what fp32 rounding allows (max or mean)."""
    return [r for r in report["steps"] if r["mismatch_max"] > r["bound_max"] or r["mismatch_mean"] > r["bound_mean"]]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [0] + [r["step"] for r in report["steps"]]
    acc = [report["heldout_acc_start"]] + [r["heldout_acc"] for r in report["steps"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps[1:], [r["reward"] for r in report["steps"]], label="mean reward (sampled)")
    top.plot(steps, acc, label="held-out accuracy (greedy, engine)")
    top.set_ylim(0, 1)
    top.legend(loc="lower right")
    top.set_title(f"RL: Megatron TP={report['train_tp']} -> vLLM TP={report['serve_tp']}, weights pushed every step")
    bottom.semilogy(steps[1:], [r["mismatch_max"] for r in report["steps"]], label="max |Δ log-prob|")
    bottom.semilogy(steps[1:], [r["mismatch_mean"] for r in report["steps"]], label="mean |Δ log-prob|")
    bottom.semilogy(steps[1:], [r["bound_max"] for r in report["steps"]], "--", label="fp32 rounding bound (max)")
    bottom.set_xlabel("RL step")
    bottom.set_ylabel("train/serve gap")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(report: dict, out: Path) -> None:
    gain = report["heldout_acc_end"] - report["heldout_acc_start"]
    steps = report["steps"]
    worst = max(steps, key=lambda r: r["mismatch_max"]) if steps else None
    gap = f"worst train/serve gap {worst['mismatch_max']:.1e} (rounding allows {worst['bound_max']:.1e})" if worst else ""
    print(
        f"      held-out accuracy {report['heldout_acc_start']:.3f} -> {report['heldout_acc_end']:.3f} "
        f"({gain * 100:+.1f} points) in {report['rl_seconds']:.0f} s; {gap}; {out / 'report.json'}, {out / 'rl.png'}"
    )
