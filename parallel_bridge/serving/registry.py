"""Register a model *factory* with vLLM: ``register_model(name, target)``.

vLLM 0.32 registers classes (or "module:Class" strings) constructed as
``cls(vllm_config=..., prefix=...)``. This shim accepts a factory
``factory(vllm_config, parallel_context) -> nn.Module`` (any callable, lambdas
too), a model class, or a "module:attr" string naming either, and generates the
class vLLM instantiates: it builds the ParallelContext from vLLM's parallel
state, calls the target, checks what it returned, and delegates vLLM's model
contract to it.

vLLM builds the model in other processes (the engine core, TP workers, Ray
workers). Each of them runs the ``vllm.general_plugins`` entry point of this
package (:func:`parallel_bridge.plugin.register`), which imports the modules named
in the ``PARALLEL_BRIDGE_MODELS`` environment variable and the
``parallel_bridge.models`` entry points of installed packages, so their
``register_model`` calls run there too. Nothing is written to the environment by
``register_model``: start engines inside :func:`exported_to_vllm_processes` (which
names the modules of this process's registrations there, then restores it), set the
variable yourself, or declare an entry point.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallel_bridge.adapters.vllm import context_from_vllm
from parallel_bridge.errors import (
    ConfigError,
    IntegrationError,
    RegistrationError,
    UnknownNameError,
    UnknownTensorError,
)

logger = logging.getLogger(__name__)

MODULES_ENV = "PARALLEL_BRIDGE_MODELS"
"""Comma-separated modules every vLLM process imports to re-run their registrations."""

# method -> the signature vLLM calls it with (shown when a model lacks it)
REQUIRED_METHODS: dict[str, str] = {
    "forward": "forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> Tensor[num_tokens, hidden]",
    "compute_logits": "compute_logits(hidden_states: Tensor[num_tokens, hidden]) -> Tensor[num_tokens, vocab]",
}
OPTIONAL_METHODS: dict[str, str] = {
    "embed_input_ids": "embed_input_ids(input_ids: Tensor[num_tokens]) -> Tensor[num_tokens, hidden]",
    "load_weights": "load_weights(weights: Iterable[tuple[str, Tensor]]) -> set[str]",
}


@dataclass(frozen=True)
class Registration:
    """One registered model: its name, what was given, and the vLLM class made for it."""

    name: str
    target: Any
    vllm_class: type[nn.Module]


_REGISTRY: dict[str, Registration] = {}


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return repr(target)
    qual = getattr(target, "__qualname__", type(target).__name__)
    return f"{getattr(target, '__module__', '?')}.{qual}"


def _resolve(target: Any) -> Any:
    """The object a "module:attr" string names (or the target itself)."""
    if not isinstance(target, str):
        return target
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"model target {target!r} must look like 'package.module:attribute'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"model target {target!r}: module {module!r} has no attribute {attr!r}"
            ) from None
    return obj


def _is_vllm_native(cls: type) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return "vllm_config" in params and "prefix" in params


def missing_methods(obj: Any) -> list[str]:
    """The vLLM contract methods that ``obj`` (a module or a class) lacks, with their signatures."""
    missing = []
    for method, signature in REQUIRED_METHODS.items():
        if method == "forward":
            fwd = getattr(obj, "forward", None)
            if fwd is None or getattr(fwd, "__func__", fwd) is getattr(
                nn.Module.forward, "__func__", nn.Module.forward
            ):
                missing.append(signature)
        elif not callable(getattr(obj, method, None)):
            missing.append(signature)
    return missing


def _check_contract(name: str, obj: Any, what: str) -> None:
    missing = missing_methods(obj)
    if missing:
        raise RegistrationError(f"model {name!r}: {what} lacks what vLLM calls: " + "; ".join(missing))


def _make_vllm_class(name: str, target: Any) -> type[nn.Module]:
    """The class vLLM constructs for ``name``; it builds the user's module inside vLLM's worker."""

    class BridgeModel(nn.Module):
        bridge_name = name

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__()
            ctx = context_from_vllm()
            self.parallel_context = ctx
            build = _resolve(target)
            what = f"the target {_describe(target)}"
            try:
                if isinstance(build, type) and _is_vllm_native(build):
                    module = build(vllm_config=vllm_config, prefix=prefix)
                else:
                    module = build(vllm_config, ctx)
            except Exception as e:
                raise IntegrationError(
                    f"model {name!r}: {what} raised {type(e).__name__} while building the model "
                    f"(tp rank {ctx.tp_rank} of {ctx.tp}): {e}"
                ) from e
            if not isinstance(module, nn.Module):
                raise RegistrationError(
                    f"model {name!r}: {what} returned {type(module).__name__}, not a torch.nn.Module"
                )
            _check_contract(name, module, f"the module {type(module).__name__} built by {what}")
            self.model = module

        def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
            if not hasattr(self.model, "embed_input_ids"):
                raise RegistrationError(
                    f"model {name!r} has no {OPTIONAL_METHODS['embed_input_ids']}; vLLM needs it for inputs_embeds"
                )
            return self.model.embed_input_ids(input_ids)

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            return self.model(
                input_ids,
                positions,
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )

        def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.model.compute_logits(hidden_states)

        def load_weights(self, weights) -> set[str]:
            """Delegate to the module's ``load_weights``, else load by name through each
            parameter's ``weight_loader`` (vLLM's default loader when none is set)."""
            if hasattr(self.model, "load_weights"):
                loaded = self.model.load_weights(weights)
            else:
                loaded = _load_by_name(self.model, weights)
            return {f"model.{n}" for n in loaded}

    BridgeModel.__name__ = BridgeModel.__qualname__ = f"Bridge_{name}"
    return BridgeModel


def _load_by_name(module: nn.Module, weights) -> set[str]:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    params = dict(module.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if name not in params:
            raise UnknownTensorError(f"checkpoint tensor {name} matches no parameter of {type(module).__name__}")
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)
    return loaded


def _return_type(fn: Any) -> Any:
    """The factory's return annotation, resolved also under ``from __future__ import annotations``."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = type(fn).__call__ if callable(fn) and not isinstance(fn, type) else fn
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception as e:  # noqa: BLE001 - an annotation that does not resolve cannot be checked
        logger.debug("return annotation of %s not resolved (%s): not checked", _describe(fn), e)
        return None


def _module_of(target: Any) -> str | None:
    """The module whose import re-runs the registration of ``target``: a "module:attr" string's module,
    or where a callable or class was defined."""
    if isinstance(target, str):
        return target.partition(":")[0]
    return getattr(target, "__module__", None)


def modules_to_export() -> list[str]:
    """The modules vLLM's other processes must import to register what this process registered
    (the package's own models are registered by its plugin, so they are left out)."""
    modules = []
    for reg in _REGISTRY.values():
        module = _module_of(reg.target)
        if module is None or module.startswith("parallel_bridge."):
            continue
        if module in ("__main__", "__mp_main__"):
            logger.warning(
                "model %r is defined in the script being run, which vLLM's other processes cannot import; "
                "define its factory in a module to serve it with multiprocessing or TP > 1",
                reg.name,
            )
            continue
        if module not in modules:
            modules.append(module)
    return modules


@contextlib.contextmanager
def exported_to_vllm_processes() -> Iterator[str]:
    """A scope in which :data:`MODULES_ENV` also names the modules of this process's registrations, so the
    vLLM processes started in it (engine core, TP workers) register the same models; the variable is
    restored on exit. Yields its value."""
    before = os.environ.get(MODULES_ENV)
    current = [m for m in (before or "").split(",") if m]
    value = ",".join([*current, *(m for m in modules_to_export() if m not in current)])
    os.environ[MODULES_ENV] = value
    try:
        yield value
    finally:
        if before is None:
            os.environ.pop(MODULES_ENV, None)
        else:
            os.environ[MODULES_ENV] = before


def _vllm_model_named(name: str) -> str | None:
    """What vLLM's own registry serves under ``name`` (None when nothing, or vLLM is absent)."""
    try:
        from vllm import ModelRegistry
    except ImportError:
        return None
    if name not in ModelRegistry.get_supported_archs():
        return None
    entry = ModelRegistry.models[name]
    cls = getattr(entry, "model_cls", None)
    if getattr(cls, "bridge_name", None) == name:
        return None  # this module's own class for the name, registered earlier in this process
    if cls is not None:
        return f"{cls.__module__}.{cls.__qualname__}"
    return f"{getattr(entry, 'module_name', '?')}.{getattr(entry, 'class_name', name)}"


def register_model(name: str, target: Any, *, override: bool = False) -> type[nn.Module]:
    """Register ``target`` with vLLM under the architecture ``name``; returns the class vLLM builds.

    ``target``: a factory ``f(vllm_config, parallel_context) -> nn.Module`` (a
    lambda too), an nn.Module class (built as ``cls(vllm_config, parallel_context)``,
    or as vLLM builds its own when ``__init__`` takes ``vllm_config`` and ``prefix``),
    or a "module:attr" string naming one. Registering the same name again with the
    same target does nothing; with another target it is an error. A name vLLM already
    serves (``LlamaForCausalLM``...) is refused unless ``override=True``: replacing it
    changes what every engine of this process serves under that name.
    """
    if not isinstance(name, str) or not name:
        raise RegistrationError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        if _REGISTRY[name].target is target or _REGISTRY[name].target == target:
            return _REGISTRY[name].vllm_class
        raise ConfigError(
            f"model {name!r} is already registered with {_describe(_REGISTRY[name].target)}; "
            f"refusing to replace it with {_describe(target)} (use another name)"
        )
    existing = _vllm_model_named(name)
    if existing is not None and not override:
        raise ConfigError(
            f"vLLM already has a model {name!r} ({existing}); registering would replace it for every engine "
            f"in this process. Choose another name, or pass override=True to replace it"
        )
    resolved = _resolve(target)
    if isinstance(resolved, type):
        if not issubclass(resolved, nn.Module):
            raise RegistrationError(f"model {name!r}: class {_describe(resolved)} is not a torch.nn.Module")
        _check_contract(name, resolved, f"class {_describe(resolved)}")
    elif not callable(resolved):
        raise RegistrationError(f"model {name!r}: target {_describe(target)} is neither callable nor a class")
    else:
        returns = _return_type(resolved)
        if isinstance(returns, type) and issubclass(returns, nn.Module):
            _check_contract(name, returns, f"{_describe(returns)}, the return type of {_describe(target)}")
    cls = _make_vllm_class(name, target)
    _REGISTRY[name] = Registration(name, target, cls)
    try:
        from vllm import ModelRegistry
    except ImportError:
        logger.debug("vLLM not installed: %s registered with parallel_bridge only", name)
    else:
        ModelRegistry.register_model(name, cls)
    return cls


def registered(name: str) -> Registration:
    """The registration of ``name``."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"no model {name!r} is registered; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def unregister(name: str) -> None:
    """Forget ``name`` (parallel_bridge's table only; vLLM keeps its entry until replaced)."""
    _REGISTRY.pop(name, None)
