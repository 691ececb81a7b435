"""What an artifact is: read an ONNX file, safetensors weights + a model class, or a
transformers folder, and tell the model.yaml it needs and how to copy it into a version.

  * ONNX: names, datatypes and shapes are read from the graph with `onnx`;
  * safetensors + `package.module:Class`: the class is built, the weights are loaded strictly
    to prove they fit, and one forward pass on zeros tells the output shapes and datatypes;
  * a transformers folder (config.json + safetensors weights + tokenizer): the task comes from
    the architecture (`*ForSequenceClassification`, else an embedding model).

torch is imported only by the functions that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slimserve.errors import InvalidArgument
from slimserve.repository.artifact_base import Imported
from slimserve.repository.onnx_artifact import inspect_onnx
from slimserve.repository.schema import describe_validation_error
from slimserve.repository.store import PICKLE_SUFFIXES, refuse_pickles
from slimserve.repository.torch_artifact import inspect_safetensors
from slimserve.repository.transformers_artifact import inspect_transformers

__all__ = ["Imported", "inspect_artifact"]

MAX_BATCH_SIZE_LIMIT = 65536  # BatchingConfig's bound


def inspect_artifact(
    artifact: Path,
    *,
    model_class: str | None = None,
    model_args: dict[str, Any] | None = None,
    task: str | None = None,
    input_shape: Sequence[int] | None = None,
    max_batch_size: int | None = None,
) -> Imported:
    """Read an artifact without copying it: its model.yaml contents and how to copy it."""
    if not artifact.exists():
        raise InvalidArgument(f"{artifact}: no such file or folder; give the artifact's path")
    if max_batch_size is not None and not 0 <= max_batch_size <= MAX_BATCH_SIZE_LIMIT:
        raise InvalidArgument(
            f"--max-batch-size {max_batch_size}: use 0 (no batching) up to "
            f"{MAX_BATCH_SIZE_LIMIT}, e.g. 32"
        )
    kind = _kind(artifact)
    _check_options(artifact, kind, model_class, task, input_shape)
    try:
        return _inspect(
            artifact, kind, model_class, model_args or {}, task, input_shape, max_batch_size
        )
    except ValidationError as exc:  # what the artifact declares does not fit model.yaml
        where = Path(f"{artifact} -> model.yaml")
        raise InvalidArgument(describe_validation_error(where, exc)) from None


def _inspect(
    artifact: Path,
    kind: str,
    model_class: str | None,
    model_args: dict[str, Any],
    task: str | None,
    input_shape: Sequence[int] | None,
    max_batch_size: int | None,
) -> Imported:
    # Each kind's reader imports its framework (onnx, torch) only when it runs.
    if kind == "onnx":
        return inspect_onnx(artifact, max_batch_size)
    if kind == "transformers":
        return inspect_transformers(artifact, task, max_batch_size)
    if model_class is None:
        raise InvalidArgument(
            f"{artifact}: safetensors weights need the class that uses them; fix: add "
            "--model-class package.module:ClassName (and --model-args JSON if it takes any)"
        )
    return inspect_safetensors(artifact, model_class, model_args, input_shape, max_batch_size)


def _kind(artifact: Path) -> str:
    suffix = artifact.suffix.lower()
    if artifact.is_dir():
        if not (artifact / "config.json").is_file():
            raise InvalidArgument(
                f"{artifact}: a folder is imported as a transformers model and needs a "
                "config.json; fix: point at the folder `save_pretrained` wrote, or at a file"
            )
        return "transformers"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        refuse_pickles(artifact.parent)  # raises with the conversion hint
    raise InvalidArgument(
        f"{artifact}: unknown kind of artifact {suffix or '(no suffix)'!r}; slimserve imports "
        "an .onnx file, a .safetensors file with --model-class, or a transformers folder"
    )


def _check_options(
    artifact: Path,
    kind: str,
    model_class: str | None,
    task: str | None,
    input_shape: Sequence[int] | None,
) -> None:
    given = {"--model-class": model_class, "--input-shape": input_shape}
    for flag, value in given.items():
        if value is not None and kind != "safetensors":
            raise InvalidArgument(f"{artifact}: {flag} applies to safetensors weights only")
    if task is not None and kind != "transformers":
        raise InvalidArgument(f"{artifact}: --task applies to transformers folders only")
    if task not in (None, "embedding", "sequence-classification", "text-generation"):
        raise InvalidArgument(
            f"--task {task!r}: use embedding, sequence-classification or text-generation"
        )
