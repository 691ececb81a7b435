"""Runtimes, one module per backend behind `Runtime`; frameworks are imported lazily."""

from __future__ import annotations

import importlib

from slimserve.errors import ConfigError
from slimserve.repository.store import Target
from slimserve.runtimes.base import Runtime, RuntimeOptions

# backend name -> "module:Class"; the module is imported only when a model needs it.
BACKENDS: dict[str, str] = {
    "onnx": "slimserve.runtimes.onnx:OnnxRuntime",
    "torch": "slimserve.runtimes.torch:TorchRuntime",
    "transformers": "slimserve.runtimes.transformers:TransformersRuntime",
    "python": "slimserve.runtimes.python:PythonRuntime",
}
# (backend, task) pairs served by another class than the backend's.
TASKS: dict[tuple[str, str], str] = {
    ("transformers", "text-generation"): "slimserve.runtimes.generation:GenerationRuntime",
}


def create_runtime(target: Target, options: RuntimeOptions | None = None) -> Runtime:
    """Build (not load) the runtime for a repository target."""
    backend = target.backend
    try:
        module_name, class_name = BACKENDS[backend].split(":")
    except KeyError:
        raise ConfigError(
            f"{target.path}: backend '{backend}' is unknown; use one of {', '.join(BACKENDS)}"
        ) from None
    special = TASKS.get((backend, target.config.task or ""))
    if special is not None:
        module_name, class_name = special.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    runtime: Runtime = cls(target, options)
    return runtime


__all__ = ["BACKENDS", "TASKS", "Runtime", "RuntimeOptions", "create_runtime"]
