"""Copying same-named settings from one object into another's constructor.

Options travel through layers under the same names (an argparse namespace into `Options`, a
`DistillConfig` into a `TrainConfig`, model.yaml's generation settings into `EngineConfig`).
Writing `x=src.x` once per field repeats every name twice and drifts when a field is added
on both sides; `build` copies every field the target declares and the source has, and `pick`
names the fields where the target is a function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def pick(source: object, names: str) -> dict[str, Any]:
    """{name: source.name} for the space-separated `names`."""
    return {name: getattr(source, name) for name in names.split()}


def build(cls: type[T], source: object, **overrides: Any) -> T:
    """`cls` (a dataclass) from the fields of `source` that `cls` also declares, then
    `overrides`; a field `source` lacks keeps its default."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in overrides]
    values = {name: getattr(source, name) for name in names if hasattr(source, name)}
    return cls(**values, **overrides)
