"""The `parallel-bridge` command: the demo end to end (quick mode) and bad-input exits."""

import json
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parallel_bridge", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_demo_quick_trains_and_answers(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", str(out), "--steps", "200")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["last_loss"] < report["first_loss"] - 0.5  # the loss visibly fell
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert report["correct"] >= len(report["cases"]) // 2


def test_env_lists_integrations():
    proc = run_cli("env")
    assert proc.returncode == 0
    for name in ("torch", "vllm", "megatron-core", "deepspeed"):
        assert name in proc.stdout


def test_unknown_command_exits_with_usage():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_demo_bad_tp_is_one_line_error():
    proc = run_cli("demo", "--nproc", "0")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("parallel-bridge")]
    assert lines == ["parallel-bridge demo: error: --nproc must be >= 1, got 0"]
