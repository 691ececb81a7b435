"""`slimserve repo add`: import an artifact as a new model version and write its model.yaml.

The artifact (see `artifacts.py` for the kinds) is copied into `ROOT/NAME/VERSION/` (the next
free version unless one is given) with a MANIFEST.json, through a hidden staging folder that
is renamed into place, so a failed import leaves nothing half made. model.yaml is written from
what the artifact declares, so a user edits at most its batching line.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimserve.errors import AlreadyExists, InvalidArgument, UnsafeArtifact
from slimserve.repository.artifacts import Imported, inspect_artifact
from slimserve.repository.manifest import write_manifest
from slimserve.repository.schema import (
    ModelConfig,
    TensorConfig,
    dump_model_config,
    load_model_config,
)
from slimserve.repository.store import MODEL_YAML, check_name

log = logging.getLogger(__name__)


def add_model(
    repo_root: Path | str,
    name: str,
    artifact: Path | str,
    *,
    model_class: str | None = None,
    model_args: dict[str, Any] | None = None,
    task: str | None = None,
    input_shape: Sequence[int] | None = None,
    max_batch_size: int | None = None,
    version: int | None = None,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Import `artifact` as a version of model `name`; return the new version folder.

    `report` receives notes a user should read (e.g. "fixed batch size 1: batching off");
    by default they are logged at INFO.
    """
    check_name(name)
    imported = inspect_artifact(
        Path(artifact),
        model_class=model_class,
        model_args=model_args,
        task=task,
        input_shape=input_shape,
        max_batch_size=max_batch_size,
    )
    model_dir = _model_dir(Path(repo_root), name)
    existing = _existing_config(model_dir)
    if existing is not None:
        _check_compatible(model_dir / MODEL_YAML, existing, imported.config)
    number = _choose_version(model_dir, version)
    target = _install(model_dir, number, imported, write_yaml=existing is None)
    if existing is not None:
        imported.notes.append(_kept_note(model_dir / MODEL_YAML, existing, max_batch_size))
    for note in imported.notes:
        (report or log.info)(note)
    return target


def _kept_note(yaml_path: Path, existing: ModelConfig, max_batch_size: int | None) -> str:
    note = f"{yaml_path}: kept as it was (all versions share it)"
    if max_batch_size is not None and max_batch_size != existing.batching.max_batch_size:
        note += (
            f"; --max-batch-size {max_batch_size} was not applied: edit its batching line "
            f"(max_batch_size: {existing.batching.max_batch_size}) to change it"
        )
    return note


def _model_dir(root: Path, name: str) -> Path:
    root = root.resolve()
    if root.exists() and not root.is_dir():
        raise InvalidArgument(f"--repository {root}: is a file; give a folder")
    path = root / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != root):
        raise UnsafeArtifact(f"{path}: is a link; a model folder must be a plain folder")
    return path


def _existing_config(model_dir: Path) -> ModelConfig | None:
    yaml_path = model_dir / MODEL_YAML
    return load_model_config(yaml_path) if yaml_path.is_file() else None


def _accepts(contract: list[int], actual: list[int], *, free: bool) -> bool:
    """Whether `actual` dims honour the `contract` dims (-1 is free).

    free=True (inputs): the artifact must accept whatever the contract lets in, so each dim
    is -1 in the artifact or equal. free=False (outputs): what it gives must fit the
    contract, so each dim is equal or free on either side (an artifact's free output dim
    follows its input).
    """
    if len(contract) != len(actual):
        return False
    pairs = zip(contract, actual, strict=True)
    if free:
        return all(a == -1 or a == c for c, a in pairs)
    return all(c == -1 or a == -1 or a == c for c, a in pairs)


def _same_tensors(contract: list[TensorConfig], actual: list[TensorConfig], free: bool) -> bool:
    return len(contract) == len(actual) and all(
        c.name == a.name and c.datatype == a.datatype and _accepts(c.shape, a.shape, free=free)
        for c, a in zip(contract, actual, strict=True)
    )


def _check_compatible(yaml_path: Path, existing: ModelConfig, new: ModelConfig) -> None:
    """Versions of one model share model.yaml: the new one must honour its tensors."""
    if (
        existing.backend == new.backend
        and _same_tensors(existing.inputs, new.inputs, free=True)
        and _same_tensors(existing.outputs, new.outputs, free=False)
    ):
        return

    def show(c: ModelConfig) -> str:
        return (
            f"backend {c.backend}, inputs {[t.spec().to_dict() for t in c.inputs]}, "
            f"outputs {[t.spec().to_dict() for t in c.outputs]}"
        )

    raise AlreadyExists(
        f"{yaml_path}: the model exists with {show(existing)}, but the new artifact has "
        f"{show(new)}; fix: import it under another name, or remove the old model first"
    )


def _choose_version(model_dir: Path, version: int | None) -> int:
    taken = sorted(
        int(p.name)
        for p in model_dir.glob("*")
        if p.is_dir() and p.name.isascii() and p.name.isdigit()
    )
    if version is None:
        return (taken[-1] + 1) if taken else 1
    if version <= 0:
        raise InvalidArgument(f"--version {version}: versions are positive integers")
    if version in taken:
        raise AlreadyExists(
            f"{model_dir / str(version)}: version {version} exists; fix: leave out --version "
            f"to use the next free one ({(taken[-1] + 1)})"
        )
    return version


def _install(model_dir: Path, number: int, imported: Imported, *, write_yaml: bool) -> Path:
    """Copy into a hidden folder, hash it, then rename into place: no half-made versions."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".importing-{number}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        imported.copy(staging)
        write_manifest(staging)
        if write_yaml:
            _write_text_atomic(model_dir / MODEL_YAML, dump_model_config(imported.config))
        target = model_dir / str(number)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
