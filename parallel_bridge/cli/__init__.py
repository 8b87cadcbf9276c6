"""The ``parallel-bridge`` command (``main``) and its demos (``demo``, ``rl``, run under torchrun)."""
