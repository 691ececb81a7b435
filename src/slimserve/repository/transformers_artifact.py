"""Import a transformers folder: config.json, safetensors weights and tokenizer files.

`*ForSequenceClassification` architectures become task sequence-classification with
`logits [-1, num_labels]`; `*ForCausalLM` task text-generation with BYTES `text` [-1] ->
BYTES `text` [-1]; anything else an embedding model, BYTES `text` [-1] -> FP32
`embedding` [-1, hidden_size]. Pickle-only weights are refused with how to convert them;
pickles beside safetensors weights are left behind. Reads headers only: no torch import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slimserve.errors import InvalidArgument
from slimserve.repository.artifact_base import (
    TOKENIZER_FILES,
    Imported,
    batching_for,
    make_config,
)
from slimserve.repository.families import family_of
from slimserve.repository.schema import TensorConfig
from slimserve.repository.store import PICKLE_SUFFIXES, refuse_pickles


def inspect_transformers(folder: Path, task: str | None, max_batch_size: int | None) -> Imported:
    config = _read_json(folder / "config.json")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        refuse_pickles(folder)  # pickle-only weights: refused with the conversion hint
        raise InvalidArgument(
            f"{folder}: no .safetensors weights found; fix: "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    _check_safetensors_headers(folder, weights)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidArgument(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); fix: "
            "`tokenizer.save_pretrained(dir)` into the same folder"
        )
    task = task or _task_of(config)
    if task == "text-generation":  # only architectures the generation engine runs
        family_of(config, str(folder / "config.json"))
    skipped = _pickles(folder)
    notes = [f"{folder}: pickle files not copied: {', '.join(skipped)}"] if skipped else []
    out = _transformers_output(folder, config, task)
    model_config = make_config(
        backend="transformers",
        task=task,
        inputs=[TensorConfig(name="text", datatype="BYTES", shape=[-1])],
        outputs=[out],
        batching=batching_for(max_batch_size),
    )
    return Imported(model_config, lambda dest: _copy_folder(folder, dest), notes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a JSON object")
    return data


def _check_safetensors_headers(folder: Path, weights: list[str]) -> None:
    """Read each weight file's header (cheap) so a truncated or fake file fails now."""
    from safetensors import safe_open

    for name in weights:
        try:
            with safe_open(str(folder / name), framework="numpy") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError for any bad header
            raise InvalidArgument(
                f"{folder / name}: not a readable safetensors file ({exc})"
            ) from None


def _task_of(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return "text-generation"
    return "embedding"


def _transformers_output(folder: Path, config: dict[str, Any], task: str) -> TensorConfig:
    if task == "text-generation":  # v2: completions out, as BYTES (runtimes/generation.py)
        return TensorConfig(name="text", datatype="BYTES", shape=[-1])
    if task == "sequence-classification":
        labels = config.get("id2label")
        count = len(labels) if isinstance(labels, dict) and labels else config.get("num_labels", 2)
        return TensorConfig(name="logits", datatype="FP32", shape=[-1, int(count)])
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(config.get(key), int):
            return TensorConfig(name="embedding", datatype="FP32", shape=[-1, config[key]])
    raise InvalidArgument(
        f"{folder / 'config.json'}: no hidden_size (or d_model) to size the embedding; fix: "
        "add it to config.json"
    )


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)


def _copy_folder(folder: Path, dest: Path) -> None:
    """Copy the folder's files, leaving out pickles and hidden files (.git*, caches)."""
    for src in sorted(folder.rglob("*")):
        rel = src.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if src.suffix.lower() in PICKLE_SUFFIXES:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)
