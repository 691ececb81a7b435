"""Helpers shared by the runtimes: finding the artifact in a folder, and common errors."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import ModelLoadError, Unavailable
from slimserve.repository.store import Target, refuse_pickles
from slimserve.security.crypto import SUFFIX, artifact_exists, refuse_encrypted_pickles
from slimserve.security.paths import confine_tree
from slimserve.types import numpy_dtype


def check_folder(target: Target) -> Path:
    """The target's folder, after refusing pickle files in it (they could run code)."""
    folder = Path(target.path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder for {target.key} does not exist")
    refuse_pickles(folder)
    refuse_encrypted_pickles(folder)
    confine_tree(folder)  # no symlink may lead out of the model's folder
    return folder


def find_artifact(folder: Path, preferred: str, fix: str) -> Path:
    """`folder/preferred`, or else the only file with the same suffix; `fix` says what to do.

    Only the folder's top level is searched: variants/ and other sub-folders hold other models.
    An encrypted artifact (`x.enc`, see slimserve.security.crypto) counts as `x`, whose path
    is returned; read it with `read_artifact`.
    """
    path = folder / preferred
    if artifact_exists(path):
        return path
    suffix = Path(preferred).suffix
    found = sorted({_clear_path(p) for p in folder.glob(f"*{suffix}*") if _is_artifact(p, suffix)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"{folder}: no {preferred} (or other *{suffix} file); fix: {fix}")
    names = ", ".join(p.name for p in found)
    raise ModelLoadError(
        f"{folder}: several *{suffix} files ({names}) and no {preferred}; "
        f"fix: rename the one to serve to {preferred}"
    )


def _is_artifact(path: Path, suffix: str) -> bool:
    return path.is_file() and path.name.endswith((suffix, suffix + SUFFIX))


def _clear_path(path: Path) -> Path:
    """'model.onnx.enc' -> 'model.onnx'; other paths unchanged."""
    return path.with_name(path.name.removesuffix(SUFFIX))


def not_loaded(target: Target) -> Unavailable:
    """The error for infer on a runtime that is not loaded (unloaded meanwhile, or never)."""
    return Unavailable(f"model {target.key} is not loaded; load it and retry")


def as_declared(array: np.ndarray, datatype: str) -> np.ndarray:
    """`array` in the declared datatype's numpy dtype; no copy when it already is."""
    return array.astype(numpy_dtype(datatype), copy=False)


def import_object(path: str, folder: Path) -> Any:
    """Import 'package.module:Name' from the Python path (never from the model folder)."""
    module_name, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"{folder}: model_class '{path}' cannot be imported ({exc}); fix: install the "
            "package that defines it, or correct the name in model.yaml"
        ) from None
