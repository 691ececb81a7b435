"""What every artifact reader shares: the result of an inspection and the config helpers
(repository/artifacts.py picks the reader; onnx_artifact, torch_artifact and
transformers_artifact read one kind each)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimserve.repository.schema import BatchingConfig, ModelConfig

DEFAULT_MAX_BATCH_SIZE = 32
ONNX_FILE = "model.onnx"
SAFETENSORS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model")


@dataclass
class Imported:
    """What an inspector learned: the config to write, how to copy the artifact, notes."""

    config: ModelConfig
    copy: Callable[[Path], None]
    notes: list[str] = field(default_factory=list)


def batching_for(max_batch_size: int | None) -> BatchingConfig:
    size = DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size
    return BatchingConfig.model_validate({"max_batch_size": size})


def make_config(**fields: Any) -> ModelConfig:
    # model_validate rather than the constructor: the schema's defaults are pydantic Fields.
    return ModelConfig.model_validate(fields)


def copy_file(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
