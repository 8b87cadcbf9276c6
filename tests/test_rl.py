"""`parallel-bridge rl`: the loop runs end to end, the train/serve gap after every push is within the parity
rule's bound (``parallel_bridge.numerics.parity``, max and mean, recomputed here from the model's sizes and the
trainer's largest |logit|: vLLM's kernels and Megatron's sum in different orders), versions advance, the
figure is a PNG; bad input fails before anything starts; the default run improves held-out accuracy; two
runs on the same machine print the same table."""

import json
import math
import os
import subprocess
import sys

import pytest
from _helpers import kernel_env

from parallel_bridge.numerics import parity

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")


def _env(capped=None):
    """This environment with vLLM's CPU settings for a small machine; ``capped``: on AVX2 kernels (True) or
    the machine's best (False) instead of this run's own."""
    env = dict(os.environ) if capped is None else kernel_env(dict(os.environ), capped)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="ERROR")
    return env


def _run(*args, timeout=600, capped=None):
    env = _env(capped)
    return subprocess.run(
        [sys.executable, "-m", "parallel_bridge", "rl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _check_report(out, steps):
    from parallel_bridge.cli.rl import MODEL

    report = json.loads((out / "report.json").read_text())
    rows = report["steps"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for key in ("reward", "heldout_acc", "mismatch_max", "mismatch_mean", "push_s", "push_bytes"):
            assert math.isfinite(r[key]), (key, r)
        bound = parity.bound_for(MODEL, r["max_abs_logit"], MODEL.max_position_embeddings)
        assert (r["bound_max"], r["bound_mean"]) == (pytest.approx(bound.max), pytest.approx(bound.mean))
        bound.check(parity.Gap(r["mismatch_max"], r["mismatch_mean"], 1), f"RL step {r['step']}")
        assert r["push_bytes"] > 0
    assert report["machine"]["cpu"] and report["machine"]["aten_capability"]
    versions = [r["weights_version"] for r in rows]
    assert versions == sorted(set(versions)) and versions[0] >= 2  # one new version per step, after the first push
    png = (out / "rl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    return report


def _table(stdout):
    return [line for line in stdout.splitlines() if line.strip()[:1].isdigit() or "max|dlogp|" in line]


@pytest.mark.slow
def test_short_rl_run_twice_prints_the_same_table_and_another_kernel_family_keeps_the_bound(tmp_path):
    """Same machine, same kernels: the same table, to the digit. The other kernel family (AVX2 where this
    machine has AVX-512, or the same kernels on an AVX2-only CPU), serving at TP=2, sums in other orders, so
    its gaps and, where a sampled token's probability sits at a threshold, its rewards may differ: what must
    hold there is the structure (steps, versions, bytes pushed) and every gap within the bound."""
    short = ["--steps", "3", "--prompts-per-step", "4", "--samples", "2", "--warmup", "20"]
    tables, reports = {}, {}
    for name, capped, serve in (("a", False, "1"), ("b", False, "1"), ("avx2", True, "2")):
        out = tmp_path / name
        proc = _run("--out", str(out), *short, "--serve-tp", serve, capped=capped)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reports[name] = _check_report(out, 3)  # every gap within the bound, on each kernel family
        tables[name] = _table(proc.stdout)
    assert len(tables["a"]) == 5  # header, step 0, 3 steps
    assert tables["a"] == tables["b"]  # fixed seeds: the same rewards, accuracies, gaps, versions
    assert reports["avx2"]["machine"]["aten_capability"] == "AVX2"
    assert reports["avx2"]["serve_tp"] == 2  # the other run also serves at TP=2 (`--serve-tp 2`)
    same = [(r["step"], r["weights_version"], r["push_bytes"]) for r in reports["a"]["steps"]]
    assert same == [(r["step"], r["weights_version"], r["push_bytes"]) for r in reports["avx2"]["steps"]]
    differ = [a for a, b in zip(tables["a"], tables["avx2"]) if a != b]
    print(f"\n[rl on {reports['a']['machine']['aten_capability']} vs AVX2 kernels] {len(differ)} of 5 table lines differ")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--serve-tp", "3"], "--serve-tp: tensor-parallel size 3 does not divide num_attention_heads=4"),
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--train-tp", "4"], "--train-tp 4 must divide the model's 2 kv heads"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--routing-replay", "on"], "--routing-replay on needs an MoE policy (--moe): the dense policy has no router"),
        (["--moe", "--train-ep", "3"], "--train-ep 3 does not divide the MoE policy's 8 experts"),
        (["--train-ep", "2"], "--train-ep 2 needs an MoE policy (--moe)"),
    ],
)
def test_bad_input_fails_before_starting(tmp_path, args, needle):
    proc = _run("--out", str(tmp_path / "rl"), *args, timeout=60)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("parallel-bridge")]
    assert len(lines) == 1 and lines[0].startswith("parallel-bridge rl: error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "rl").exists()  # nothing was started or written


def test_output_folder_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    proc = _run("--out", str(target), timeout=60)
    assert proc.returncode == 1 and f"--out {target} is a file" in proc.stderr
    assert target.read_text() == "x"


@pytest.mark.slow
def test_default_run_improves_heldout_accuracy(tmp_path):
    """The demo's own claim: with its defaults, held-out accuracy rises by at least 15 points."""
    out = tmp_path / "rl"
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_bridge", "demo", "--rl", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _check_report(out, 60)
    print(f"\n[rl default] held-out {report['heldout_acc_start']:.3f} -> {report['heldout_acc_end']:.3f}")
    assert report["heldout_acc_end"] - report["heldout_acc_start"] >= 0.15


def _check_moe_report(out, modes, steps):
    """Every loop's rows: route fractions in [0, 1]; the replayed forward within the parity rule's bound; where
    no route differed, the trainer's own routing gives the replayed forward's gap (top-2 routes gathered in
    another order sum exactly) and is within the bound too; where one did, the own-routing gap is past the
    bound (a changed route moves a log-prob by far more than rounding: tests/test_routing_replay.py)."""
    from parallel_bridge.cli.rl_moe import MODEL

    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == "moe" and list(report["runs"]) == modes
    versions, differed = [], 0
    for mode in modes:
        rows = report["runs"][mode]["steps"]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        for r in rows:
            assert r["routing_replay"] == mode and r["routes_compared"] > 0
            assert 0 <= r["route_disagreement"] <= 1 and r["route_disagreement"] == r["routes_differ"] / r["routes_compared"]
            bound = parity.bound_for(MODEL, r["max_abs_logit"], MODEL.max_position_embeddings)
            own = parity.Gap(r["own_routing_mismatch_max"], r["own_routing_mismatch_mean"], 1)
            if mode == "on":
                bound.check(parity.Gap(r["mismatch_max"], r["mismatch_mean"], 1), f"replay on, step {r['step']}")
            if r["routes_differ"] == 0:
                bound.check(own, f"{mode}, step {r['step']}, no route differed")
                assert r["own_routing_mismatch_max"] == pytest.approx(r["mismatch_max"], abs=1e-7)
            else:
                assert r["own_routing_mismatch_max"] > max(bound.max, r["mismatch_max"] if mode == "on" else 0), r
            differed += r["routes_differ"]
            assert r["route_disagreement"] <= 0.01, r  # the engine's captured routes are the trainer's own
            versions.append(r["weights_version"])
    assert versions == sorted(set(versions)) and versions[0] >= 2  # every step pushed a new version
    png = (out / "rl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    compared = sum(r["routes_compared"] for m in modes for r in report["runs"][m]["steps"])
    print(f"\n[rl --moe] {differed} of {compared} (token, layer) routes differed between engine and trainer")
    return report


@pytest.mark.slow
def test_moe_routing_replay_both_loops_from_one_warm_up(tmp_path):
    out = tmp_path / "moe"
    short = ["--steps", "3", "--prompts-per-step", "4", "--samples", "2", "--warmup", "20"]
    proc = _run("--out", str(out), "--moe", "--routing-replay", "both", *short)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _check_moe_report(out, ["off", "on"], 3)
    assert (report["train_tp"], report["train_ep"]) == (1, 2)  # the default MoE layout: two expert-parallel ranks
    runs = report["runs"]
    assert runs["off"]["heldout_acc_start"] == runs["on"]["heldout_acc_start"]  # the same warm-up
    assert "routing replay off:" in proc.stdout and "routing replay on:" in proc.stdout


@pytest.mark.slow
def test_default_moe_run_improves_heldout_accuracy(tmp_path):
    """`rl --moe` with its defaults (routing replay on, EP=2): held-out accuracy ends above where it started and
    its mean over the last 10 steps is 5 points above the start (18 held-out pairs: one pair is 5.6 points, so a
    single step's accuracy is coarse); the mean reward of the last 10 steps beats the first 10's by 5 points."""
    out = tmp_path / "moe"
    proc = _run("--out", str(out), "--moe", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _check_moe_report(out, ["on"], 60)["runs"]["on"]
    rows = run["steps"]
    late_acc = sum(r["heldout_acc"] for r in rows[-10:]) / 10
    early, late = (sum(r["reward"] for r in part) / 10 for part in (rows[:10], rows[-10:]))
    print(f"\n[rl --moe default] held-out {run['heldout_acc_start']:.3f} -> {run['heldout_acc_end']:.3f} (last 10 "
          f"steps {late_acc:.3f}); reward {early:.3f} -> {late:.3f}")
    assert run["heldout_acc_end"] > run["heldout_acc_start"]
    assert late_acc >= run["heldout_acc_start"] + 0.05
    assert late >= early + 0.05
