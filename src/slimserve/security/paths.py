"""Path confinement: names and paths from requests or artifacts stay inside the repository.

Names go through `repository.store.check_name` (letters, digits, '_', '-', '.', no '..'),
and repository folders through `Repository`, which resolves them and refuses any outside its
root; this module adds the checks for relative paths that come from elsewhere (a load
request, an ONNX external-data location) and for the files inside a unit folder, where a
symlink could point anywhere (`model.onnx -> /etc/shadow`).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from slimserve.errors import UnsafeArtifact
from slimserve.repository.store import check_name

__all__ = ["check_model_name", "check_relative", "confine", "confine_tree", "safe_join"]


def check_model_name(name: str) -> str:
    """A model name that is one plain path component (see `check_name`)."""
    return check_name(name)


def check_relative(rel: str, what: str = "path") -> PurePosixPath:
    """A relative path with no '..', no absolute or drive part and no NUL; else UnsafeArtifact."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UnsafeArtifact(
            f"{what} {rel!r}: empty or holds a NUL byte; use a plain relative path"
        )
    posix = PurePosixPath(rel.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(rel).drive or ".." in posix.parts:
        raise UnsafeArtifact(
            f"{what} {rel!r}: absolute or climbs out with '..'; use a path relative to the "
            "model folder, without '..'"
        )
    return posix


def confine(root: Path, path: Path) -> Path:
    """`path` resolved (symlinks followed); UnsafeArtifact unless it lies inside `root`."""
    base = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafeArtifact(f"{path}: resolves outside {base}; keep artifacts inside it")
    return resolved


def safe_join(root: Path, rel: str, what: str = "path") -> Path:
    """`root / rel`, checked as text and after resolving symlinks."""
    return confine(root, Path(root) / check_relative(rel, what))


def confine_tree(folder: Path, root: Path | None = None) -> None:
    """Refuse a folder holding any entry (file, folder, symlink) that resolves outside `root`.

    `root` defaults to the folder itself, the strictest choice: a model's files are its own.
    Symlinked folders are not descended into beyond the check of the link itself.
    """
    base = Path(root if root is not None else folder).resolve()
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in (*dirnames, *filenames):
            entry = here / name
            if entry.is_symlink():
                confine(base, entry)
