"""`python -m parallel_bridge` is the `parallel-bridge` command."""

from parallel_bridge.cli.main import main

if __name__ == "__main__":  # spawned children (vLLM's engine core) re-import this module
    raise SystemExit(main())
