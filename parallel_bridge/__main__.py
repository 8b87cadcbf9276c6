"""`python -m parallel_bridge` is the `parallel-bridge` command."""

from parallel_bridge.cli import main

raise SystemExit(main())
