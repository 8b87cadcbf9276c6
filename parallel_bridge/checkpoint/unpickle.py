"""Unpickling Megatron's files without Megatron and without running what they name.

Megatron-LM pickles its ``args`` namespace (with megatron-core enums, dtypes, sometimes functions) into rank
files, ``common.pt`` and 0.17+'s ``common_state`` item. Plain ``pickle`` would import whichever megatron-core
wrote them (a newer one's enums do not exist in an older one: ``InferenceCudaGraphScope``...) and call any
callable the file names. Here, only the classes tensors and plain values need are real; every other class
or function becomes a :class:`Named` stand-in that keeps its name and arguments, so the model fields read
from ``args`` (numbers, strings, booleans) come through and nothing else runs.
"""

from __future__ import annotations

import pickle
import types
from typing import Any

_ALLOWED = {
    "builtins": {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "dict", "list", "tuple",
                 "int", "float", "str", "bool", "object"},
    "collections": {"OrderedDict", "defaultdict", "deque"},
    "argparse": {"Namespace"},
    "copyreg": {"_reconstructor"},
    "_codecs": {"encode"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter"},
    "torch": {"Size", "device", "Tensor"},
}
"""module -> names unpickled as themselves: what tensors, ``torch.Size`` and plain containers are rebuilt from."""


class Named:
    """An object of a class this process does not import (a megatron-core enum, a function...): its name and
    the arguments it was rebuilt with."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{self.qualname}({', '.join(map(repr, self.args))})" if self.args else self.qualname


def _stand_in(module: str, name: str) -> type[Named]:
    return type(name, (Named,), {"qualname": f"{module}.{name}", "__module__": __name__})


class Unpickler(pickle.Unpickler):
    """Real classes for tensors and plain values, :class:`Named` stand-ins for everything else."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _stand_in(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


pickle_module = types.ModuleType("parallel_bridge_unpickle")
"""What ``torch.load(..., pickle_module=...)`` takes: this module's :class:`Unpickler` and :func:`load`."""
pickle_module.Unpickler = Unpickler  # type: ignore[attr-defined]
pickle_module.load = load  # type: ignore[attr-defined]
