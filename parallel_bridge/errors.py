"""The error types of expected failures: bad input a user can fix, each message naming what is wrong.

Anything else escaping the library is a bug; the CLI tells the two apart by these types. Each kind also
derives from the built-in exception a caller would have caught before (``ValueError``...).
"""

from __future__ import annotations


class BridgeError(Exception):
    """An expected failure of parallel_bridge: the message names the file, field or number at fault."""


class ConfigError(BridgeError, ValueError):
    """A configuration value of the wrong type or out of range."""


class WrongTypeError(ConfigError, TypeError):
    """A value of the wrong type (an int expected, a str given...)."""


class UnknownNameError(ConfigError, KeyError):
    """A name (an axis, a group, a model) that is not one of the known ones; the message lists them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ModelConfigError(ConfigError):
    """A model configuration that is inconsistent or computes something no family maps; names the field."""


class LayoutError(ConfigError):
    """Parallel degrees, ranks or groups that do not fit together; names the numbers."""


class CheckpointError(BridgeError, ValueError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


class UnknownTensorError(BridgeError, KeyError):
    """A tensor name no kind of the model's family declares: refused, never treated as replicated."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DistributedError(BridgeError, RuntimeError):
    """A torch.distributed world or group that is missing, mismatched or did not answer in time."""


class IntegrationError(BridgeError, RuntimeError):
    """A library (vLLM, megatron-core, DeepSpeed) used outside the scope it needs, or answering otherwise than
    its contract says; names the library and what to do."""


class MissingDependencyError(BridgeError, ImportError):
    """A library that is not installed, or not at a supported version; names the package to install."""


class RegistrationError(BridgeError, TypeError):
    """A model target that cannot be registered with vLLM as given; names what is missing."""


class SyncError(BridgeError, RuntimeError):
    """A weight push that did not happen; the engine keeps serving the previous weights."""


class RoundError(BridgeError, RuntimeError):
    """A weight round that cannot be read as sent; the message names the tensor and trainer rank."""


class OutputError(BridgeError, FileExistsError):
    """An output that would overwrite, contain or lie inside something it must not touch."""


class CliError(BridgeError):
    """A bad command-line value."""


class ConfigConflictError(CheckpointError):
    """Two places a producer wrote the model configuration disagree on a field that changes the math."""
