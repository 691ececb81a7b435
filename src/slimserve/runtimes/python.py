"""Python backend: an installed Python class serves the model (model.yaml `model_class`).

The class is imported by name from the Python path, never from the model folder, so loading a
repository still runs no code that ships with an artifact. Two kinds of class are accepted:

- a `slimserve.runtimes.Runtime` subclass: built as `Class(target, options, **model_args)` and
  used as is (e.g. `slimserve.testing:SlowRuntime` to serve a toy model from disk);
- any class with `predict(inputs: dict[str, ndarray]) -> dict[str, ndarray]`, built as
  `Class(**model_args)`; optional methods: `setup(folder: Path)` (load files, once),
  `teardown()`, `memory_bytes() -> int`. `predict` is called from one thread at a time (the
  unit's inference thread), so the class needs no locks.

    class Doubler:
        def predict(self, inputs):
            return {"y": inputs["x"] * 2}

Outputs are cast to the declared datatypes. Without `memory_bytes`, the estimate is the size
of the files in the version folder (what `setup` presumably loads), at least 1 byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import FailedPrecondition, ModelLoadError
from slimserve.repository.store import Target
from slimserve.runtimes._common import as_declared, check_folder, import_object, not_loaded
from slimserve.runtimes.base import Runtime, RuntimeOptions


class PythonRuntime(Runtime):
    """Serves a user class; see the module docstring for what the class may define."""

    def __init__(self, target: Target, options: RuntimeOptions | None = None) -> None:
        super().__init__(target, options)
        self._impl: Any = None  # the predictor, or the delegate Runtime
        self._delegate: Runtime | None = None
        self._folder_bytes = 0

    def load(self) -> None:
        folder = check_folder(self.target)
        cls = _import(self.target.config.model_class, folder)
        args = self.target.config.model_args
        if isinstance(cls, type) and issubclass(cls, Runtime):
            delegate = _construct(cls, folder, self.target, self.options, **args)
            delegate.load()
            self._impl = self._delegate = delegate
            return
        if not callable(getattr(cls, "predict", None)):
            raise ModelLoadError(
                f"{folder}: model_class '{self.target.config.model_class}' has no predict method; "
                "fix: define predict(self, inputs) -> dict of output arrays"
            )
        predictor = _construct(cls, folder, **args)
        if hasattr(predictor, "setup"):
            predictor.setup(folder)
        self._folder_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        self._impl = predictor

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        impl, delegate = self._impl, self._delegate
        if impl is None:
            raise not_loaded(self.target)
        if delegate is not None:
            return delegate.infer(inputs)
        result = impl.predict(inputs)
        missing = [s.name for s in self.outputs if s.name not in result]
        if missing:
            raise FailedPrecondition(
                f"model {self.target.key}: predict returned {sorted(result)}, without the "
                f"declared outputs {missing}; fix: return them, or correct model.yaml"
            )
        return {s.name: as_declared(np.asarray(result[s.name]), s.datatype) for s in self.outputs}

    def unload(self) -> None:
        impl, delegate = self._impl, self._delegate
        self._impl = self._delegate = None
        if delegate is not None:
            delegate.unload()
        elif hasattr(impl, "teardown"):
            impl.teardown()

    def memory_bytes(self) -> int:
        impl = self._impl
        if impl is None:
            return 0
        if hasattr(impl, "memory_bytes"):
            return int(impl.memory_bytes())
        return max(self._folder_bytes, 1)


def _import(path: str | None, folder: Path) -> Any:
    if path is None:
        raise ModelLoadError(
            f"{folder}: the python backend needs model_class in model.yaml; fix: add "
            "model_class: package.module:Class (a class with a predict method)"
        )
    return import_object(path, folder)


def _construct(cls: Any, folder: Path, *args: Any, **kwargs: Any) -> Any:
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"{folder}: {cls.__qualname__}(**model_args) failed: {exc}; "
            "fix: correct model_args in model.yaml"
        ) from None
