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
    what = f"routing replay {report['mode']}: " if "mode" in report else ""
    print(
        f"      {what}held-out accuracy {report['heldout_acc_start']:.3f} -> {report['heldout_acc_end']:.3f} "
        f"({gain * 100:+.1f} points) in {report['rl_seconds']:.0f} s; {gap}; {out / 'report.json'}, {out / 'rl.png'}"
    )


def show(report: dict, out: Path) -> int:
    """Write the figure, print the table and the summary; 1 when a gap rounding cannot explain was seen."""
    import logging

    if report["policy"] == "moe":
        plot_moe(report, out / "rl.png")
        for mode, run in report["runs"].items():
            print_moe_table(mode, run)
            summarize({**run, "mode": mode}, out)
        bad = {mode: moe_beyond_rounding(run) for mode, run in report["runs"].items()}
        bad = {mode: rows for mode, rows in bad.items() if rows}
    else:
        plot(report, out / "rl.png")
        print_table(report)
        summarize(report, out)
        bad = {"": beyond_rounding(report)} if beyond_rounding(report) else {}
    for mode, rows in bad.items():
        logging.getLogger("parallel_bridge.cli.rl").error(
            "%ssteps %s: the train/serve gap exceeds what fp32 rounding allows with the engine's own routes (the "
            "weights in the engine are not the trainer's)", f"routing replay {mode}: " if mode else "",
            [r["step"] for r in rows])
    return 1 if bad else 0


def moe_beyond_rounding(run: dict) -> list[dict]:
    """The steps where a forward routed as the engine routed (the replayed one; the trainer's own when no route
    differed) is farther from the engine than fp32 rounding allows."""
    def beyond(r: dict, key: str) -> bool:
        return r[f"{key}_max"] > r["bound_max"] or r[f"{key}_mean"] > r["bound_mean"]

    return [r for r in run["steps"] if (r["route_disagreement"] == 0 and beyond(r, "own_routing_mismatch"))
            or (r["routing_replay"] == "on" and beyond(r, "mismatch"))]


def print_moe_table(mode: str, run: dict) -> None:
    print(f"      routing replay {mode}:")
    print(f"      {'step':>4} {'reward':>7} {'held-out':>9} {'max|dlogp|':>11} {'mean|dlogp|':>12} "
          f"{'own-route max':>14} {'routes differ':>14} {'bound max':>10} {'version':>8} {'step s':>7}")
    print(f"      {0:>4} {'':>7} {run['heldout_acc_start']:>9.3f}")
    for r in run["steps"]:
        differ = f"{r['routes_differ']}/{r['routes_compared']}"
        print(
            f"      {r['step']:>4} {r['reward']:>7.3f} {r['heldout_acc']:>9.3f} {r['mismatch_max']:>11.1e} "
            f"{r['mismatch_mean']:>12.1e} {r['own_routing_mismatch_max']:>14.1e} {differ:>14} {r['bound_max']:>10.1e} "
            f"{r['weights_version']:>8} {r['step_s']:>7.2f}"
        )


def plot_moe(report: dict, path: Path) -> None:
    """Reward and accuracy, the train/serve gap (log axis) and the route disagreement, per routing-replay loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    for mode, run in report["runs"].items():
        rows, style = run["steps"], "-" if mode == "on" else "--"
        steps = [r["step"] for r in rows]
        top.plot([0, *steps], [run["heldout_acc_start"], *(r["heldout_acc"] for r in rows)], style, color="C0",
                 label=f"held-out accuracy, replay {mode}")
        top.plot(steps, [r["reward"] for r in rows], style, color="C1", label=f"mean reward, replay {mode}")
        mid.semilogy(steps, [max(r["mismatch_max"], 1e-9) for r in rows], style, color="C2",
                     label=f"max |Δ log-prob|, replay {mode}")
        mid.semilogy(steps, [max(r["mismatch_mean"], 1e-9) for r in rows], style, color="C3",
                     label=f"mean |Δ log-prob|, replay {mode}")
        bottom.plot(steps, [r["route_disagreement"] for r in rows], style, color="C4", label=f"replay {mode}")
    last = next(iter(report["runs"].values()))["steps"]
    mid.semilogy([r["step"] for r in last], [r["bound_max"] for r in last], ":", color="gray",
                 label=f"{report['serve_dtype']} rounding bound (max)")
    top.set_ylim(0, 1)
    top.legend(loc="lower right", fontsize=7)
    top.set_title(f"MoE RL: Megatron TP={report['train_tp']} EP={report['train_ep']} (fp32) -> vLLM TP={report['serve_tp']} "
                  f"({report['serve_dtype']})\ndashed: routing replay off, solid: on", fontsize=10)
    mid.set_ylabel("train/serve gap")
    mid.legend(loc="upper right", fontsize=7)
    bottom.set_ylabel("routes the trainer\nwould pick otherwise")
    bottom.set_xlabel("RL step")
    bottom.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
