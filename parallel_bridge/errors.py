"""The error types of expected failures: bad input a user can fix, each message naming what is wrong.

Anything else escaping the library is a bug; the CLI tells the two apart by these types.
"""

from __future__ import annotations


class BridgeError(Exception):
    """An expected failure of parallel_bridge: the message names the file, field or number at fault."""


class ConfigError(BridgeError, ValueError):
    """A configuration value of the wrong type or out of range."""


class OutputError(BridgeError, FileExistsError):
    """An output that would overwrite, contain or lie inside something it must not touch."""


class CliError(BridgeError):
    """A bad command-line value."""
