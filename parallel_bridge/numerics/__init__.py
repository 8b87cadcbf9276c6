"""Numbers: how close two implementations must be (the parity rule) and the machine facts results depend on."""
