"""The checkpoint commands of ``parallel-bridge``: inspect, convert and serve a Megatron checkpoint.

Every value is checked before anything starts or is written; failures are :class:`CliError` or
:class:`~parallel_bridge.spec.model.CheckpointError`, printed as one line by the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parallel_bridge.errors import CliError

logger = logging.getLogger("parallel_bridge")
EXIT_OK = 0


def _overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--config-overrides``, parsed and checked to be a JSON object."""
    overrides = None
    if getattr(args, "config_overrides", None) is not None:
        try:
            overrides = json.loads(args.config_overrides)
        except json.JSONDecodeError as e:
            raise CliError(f"--config-overrides is not valid JSON ({e}): {args.config_overrides!r}") from None
        if not isinstance(overrides, dict):
            raise CliError(
                f"--config-overrides must be a JSON object like '{{\"vocab_size\": 32000}}', "
                f"got a {type(overrides).__name__}"
            )
    return overrides


def _open_checkpoint(args: argparse.Namespace):
    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint

    return MegatronCheckpoint.open(
        args.checkpoint, iteration=args.iteration, overrides=_overrides(args), hf_config=args.hf_config
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a checkpoint's format, iteration, source layout, dtype, tensors and size."""
    info = _open_checkpoint(args).describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"path        {info['path']}")
    print(f"format      {info['format']}")
    print(f"iteration   {info['iteration']}")
    print(f"source      tp={info['source_tp']} pp={info['source_pp']}"
          + (f" ep={info['source_ep']} expert tp={info['source_etp']}" if "experts" in info else ""))
    print(f"config from {'; '.join(info['config_sources']) or 'the overrides alone'}")
    if info["overrides"]:
        print(f"overrides   {json.dumps(info['overrides'])}")
    print(f"dtype       {info['dtype']}")
    print(f"size        {info['total_bytes'] / 1e6:.1f} MB in {len(info['tensors'])} tensors")
    cfg = info["config"]
    print(
        f"model       {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']} "
        f"(kv {cfg['num_query_groups']}), ffn {cfg['ffn_hidden_size']}, vocab {cfg['vocab_size']} "
        f"(padded {cfg['padded_vocab_size']}), tied embeddings: {cfg['tie_embeddings']}"
    )
    if "experts" in info:
        print(f"experts     {info['experts']} per layer, top-{info['router_topk']} "
              f"({info['routing']}), expert ffn {info['expert_ffn']}")
    for name, shape in info["tensors"].items():
        print(f"  {name:<60} {tuple(shape)}")
    return EXIT_OK


@contextlib.contextmanager
def third_party_warnings_logged() -> Iterator[None]:
    """Within the block, Python warnings (megatron-core's Apex notice on every import...) go to the log at DEBUG
    (``--debug`` shows them), not to the terminal; ``catch_warnings`` restores the filters and the hook on exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: logger.debug(
            "%s:%d: %s: %s", filename, lineno, category.__name__, message)
        yield


def cmd_convert(args: argparse.Namespace) -> int:
    """Export a Megatron checkpoint to a Hugging Face folder, or import a Hugging Face folder as Megatron's;
    third-party warnings go to the log."""
    with third_party_warnings_logged():
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from parallel_bridge.checkpoint.hf_export import export_hf

    if args.to not in ("hf", "megatron"):
        raise CliError(f"unknown target format {args.to!r}; supported: hf, megatron")
    if args.to == "megatron":
        from parallel_bridge.checkpoint.hf_import import import_hf

        if args.format != "torch_dist":
            raise CliError(
                f"--format {args.format}: importing writes megatron-core's torch_dist format only (Megatron-LM "
                "loads it at any TP x PP); the legacy per-rank format is not written"
            )
        given = [args.iteration, args.config_overrides, args.tokenizer, args.hf_config]
        if any(v is not None for v in given):
            raise CliError("--iteration, --config-overrides, --hf-config and --tokenizer apply to exports (--to hf) only")
        from parallel_bridge.checkpoint.sharded_import import import_hf_sharded, under_torchrun

        if under_torchrun():  # one process per Megatron rank, each its own shard
            if args.ep != 1:
                raise CliError("--ep applies to one-process imports; under torchrun, import with --tp and --pp")
            out = import_hf_sharded(args.checkpoint, args.out, tp=args.tp, pp=args.pp, overwrite=args.force,
                                    progress=not args.quiet)
            if os.environ.get("RANK", "0") != "0":
                return EXIT_OK
        else:
            out = import_hf(args.checkpoint, args.out, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.force,
                            progress=not args.quiet)
        print(f"wrote {out}")
        return EXIT_OK
    out = export_hf(
        _open_checkpoint(args),
        args.out,
        tokenizer=args.tokenizer,
        overwrite=args.force,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return EXIT_OK


def find_tokenizer(checkpoint: str) -> str | None:
    """A tokenizer folder stored beside the checkpoint (``tokenizer/`` in it or its parent)."""
    for folder in (Path(checkpoint) / "tokenizer", Path(checkpoint).parent / "tokenizer"):
        if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
            return str(folder)
    return None


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_tokenizer(tokenizer: str) -> None:
    """A local tokenizer folder must exist and hold tokenizer files; ``org/name`` may be a Hub repo id."""
    folder = Path(tokenizer)
    if folder.is_dir():
        if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise CliError(f"--tokenizer {tokenizer} holds no tokenizer.json, tokenizer_config.json or tokenizer.model")
    elif folder.exists():
        raise CliError(f"--tokenizer {tokenizer} is a file; give the folder that holds it")
    elif not _REPO_ID.match(tokenizer):
        raise CliError(f"--tokenizer folder {tokenizer} does not exist")


def serve_command(args: argparse.Namespace) -> list[str]:
    """The ``vllm serve`` command line for a Megatron checkpoint (checked before anything starts)."""
    from parallel_bridge.serving.megatron_format import check_serving_tp

    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port} is not a TCP port (1-65535)")
    ckpt = _open_checkpoint(args)
    check_serving_tp(ckpt.config, args.tensor_parallel_size)
    tokenizer = args.tokenizer or find_tokenizer(args.checkpoint)
    if args.tokenizer is not None:
        check_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise CliError(f"no tokenizer: pass --tokenizer, or put one in {Path(args.checkpoint) / 'tokenizer'}")
    options = megatron_options(args)
    return [
        "vllm",
        "serve",
        str(args.checkpoint),
        *(["--hf-overrides", json.dumps(options)] if options else []),
        "--load-format",
        "megatron",
        "--config-format",
        "megatron",
        "--tokenizer",
        tokenizer,
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--host",
        args.host,
        "--port",
        str(args.port),
        *args.vllm_args,
    ]


def megatron_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--config-overrides``, ``--hf-config`` and ``--iteration`` as the ``megatron.*`` keys of vLLM's
    ``hf_overrides``: the route vLLM passes to both the format's config parser and its loader."""
    from parallel_bridge.serving.megatron_format import as_options

    return as_options(_overrides(args), args.hf_config, args.iteration)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start vLLM's OpenAI-compatible server on a Megatron checkpoint (or print the command)."""
    import shlex

    cmd = serve_command(args)
    if args.print_only:
        print(shlex.join(cmd))
        return EXIT_OK
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        from parallel_bridge.serving.engines import cpu_thread_binding

        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(args.tensor_parallel_size)
    # vLLM's API server module directly: the `vllm` script looks up the distribution "vllm",
    # which the CPU build (vllm-cpu) does not provide. Same arguments, the model as --model.
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *cmd[2:]]
    logger.info("starting: %s", shlex.join(cmd))
    return subprocess.call(server, env=env)


def checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="Megatron checkpoint folder (root with latest_checkpointed_iteration.txt, or one iteration)",
    )
    p.add_argument("--iteration", type=int, default=None, help="iteration to read (default: the latest)")
    p.add_argument(
        "--config-overrides",
        default=None,
        metavar="JSON",
        help="model config values that override the checkpoint's, e.g. '{\"vocab_size\": 32000}'",
    )
    p.add_argument(
        "--hf-config",
        default=None,
        metavar="PATH",
        help="a Hugging Face config.json (or its folder) to read as a source of the model config",
    )

def add_checkpoint_parsers(sub: Any) -> None:
    """The ``inspect``, ``convert`` and ``serve`` subcommands."""
    p = sub.add_parser(
        "inspect", help="format, iteration, source TP/PP, dtype, tensors and size of a Megatron checkpoint"
    )
    checkpoint_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="export a Megatron checkpoint to a Hugging Face folder (--to hf), or import one (--to megatron)",
    )
    checkpoint_args(p)
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--to", default="hf", help="target format: hf (export) or megatron (import a HF folder)")
    p.add_argument("--tp", type=int, default=1, help="--to megatron: tensor-parallel size to train at")
    p.add_argument("--pp", type=int, default=1, help="--to megatron: pipeline-parallel size to train at")
    p.add_argument("--ep", type=int, default=1, help="--to megatron: expert-parallel size to train at (MoE)")
    p.add_argument("--format", default="torch_dist", help="--to megatron: checkpoint format (torch_dist)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder whose files to copy into the output")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "serve",
        help="serve a Megatron checkpoint with vLLM's OpenAI-compatible server",
        epilog="Arguments after -- go to vllm serve unchanged.",
    )
    checkpoint_args(p)
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: tokenizer/ beside the checkpoint)"
    )
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--print", dest="print_only", action="store_true", help="print the vllm serve command only"
    )
    p.set_defaults(func=cmd_serve)
