"""PyTorch backend: an nn.Module class named in model.yaml plus safetensors weights.

Artifact: `model.safetensors` (or the only `*.safetensors` file) in the version folder, and in
model.yaml `model_class: package.module:Class` with `model_args` (constructor keyword
arguments). The state dict loads strictly: a missing or extra key fails the load.

`torch.export` programs (`.pt2`) are refused: in torch 2.13 `torch.export.load` reads weights
and constants stored with `use_pickle` through `torch.load(..., weights_only=False)` and
`pickle.loads` (torch/export/pt2_archive/_package.py), so a crafted file runs code at load.

Forward runs in eval mode under `torch.inference_mode()`. Inputs become tensors without a copy
(torch.from_numpy; read-only request buffers go through DLPack, which needs no writable
array). The module may return a tensor (the single declared output), a tuple or list (mapped
to the declared outputs in order) or a dict (mapped by name).

Threads: `torch.set_num_threads` holds only for the thread that calls it, and the serving layer
runs inference in worker threads, so `infer` applies the thread count in the thread it runs
in, once per thread (see `use_threads`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file
from torch import nn

from slimserve.errors import FailedPrecondition, ModelLoadError, SlimserveError, UnsafeArtifact
from slimserve.repository.store import Target
from slimserve.runtimes._common import (
    as_declared,
    check_folder,
    find_artifact,
    import_object,
    not_loaded,
)
from slimserve.runtimes.base import Runtime, RuntimeOptions
from slimserve.security.crypto import is_encrypted, read_artifact
from slimserve.types import TensorSpec

_FIX_MISSING = (
    "save the weights with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)

# The intra-op thread count already applied in each thread (torch keeps it per thread).
_applied = threading.local()
# Resolved once at import, in the importing thread: the count torch picks by default.
_DEFAULT_THREADS = torch.get_num_threads()


def resolve_threads(options: RuntimeOptions) -> int:
    """The intra-op thread count to use: the option, or torch's default (0 means default)."""
    return options.intra_op_threads or _DEFAULT_THREADS


def use_threads(count: int) -> None:
    """Apply `count` intra-op threads in the calling thread, unless already applied there.

    Measured on the issue's machine: an MLP forward run from a thread pool with no thread count
    set took 8.6 ms against 0.52 ms once set; the check here costs one attribute read.
    """
    if getattr(_applied, "count", 0) != count:
        torch.set_num_threads(count)
        _applied.count = count


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory (no copy), writable or not."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    # from_numpy warns on read-only arrays (np.frombuffer over request bytes); DLPack does not.
    return torch.utils.dlpack.from_dlpack(array)


def to_numpy(tensor: torch.Tensor, spec: TensorSpec) -> np.ndarray:
    """A tensor as a numpy array of the declared datatype (no copy when it already matches)."""
    return as_declared(tensor.detach().cpu().numpy(), spec.datatype)


def map_outputs(result: Any, specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """Name a module's result: a tensor, a tuple/list in order, or a dict by name."""
    names = [s.name for s in specs]
    if isinstance(result, torch.Tensor):
        if len(names) != 1:
            raise FailedPrecondition(
                f"the model returned one tensor but model.yaml declares {len(names)} outputs "
                f"{names}; fix: return a tuple or dict, or declare one output"
            )
        return {names[0]: result}
    if isinstance(result, Mapping):
        missing = [n for n in names if n not in result]
        if missing:
            raise FailedPrecondition(
                f"the model's output dict has keys {sorted(result)} but not {missing}, which "
                "model.yaml declares; fix: rename the outputs in model.yaml"
            )
        return {n: result[n] for n in names}
    if isinstance(result, (tuple, list)) and len(result) >= len(names):
        return dict(zip(names, result[: len(names)], strict=True))
    raise FailedPrecondition(
        f"the model returned {type(result).__name__}, which cannot be mapped to the declared "
        f"outputs {names}; fix: return a tensor, a tuple of {len(names)} tensors, or a dict"
    )


def import_class(path: str, where: Path) -> type[nn.Module]:
    """Import 'package.module:Class' (already validated in form by the schema)."""
    cls = import_object(path, where)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"{where}: model_class '{path}' is not a torch.nn.Module class")
    return cls


class TorchRuntime(Runtime):
    """Runs an nn.Module in eval and inference mode."""

    def __init__(self, target: Target, options: RuntimeOptions | None = None) -> None:
        super().__init__(target, options)
        self._model: nn.Module | None = None
        self._threads = resolve_threads(self.options)

    def load(self) -> None:
        folder = check_folder(self.target)
        _refuse_exported_programs(folder)
        model = self._build(folder)
        compressed = self._variant_setting("artifact")
        if isinstance(compressed, str) and compressed.endswith(".dcz"):
            _load_compressed(model, folder, compressed)
        else:
            weights = find_artifact(folder, "model.safetensors", _FIX_MISSING)
            _load_weights(model, weights, folder, self.options.data_key)
        self._model = model.eval()

    def _variant_setting(self, key: str) -> Any:
        """A setting from variant.yaml (a variant may change the class, its arguments or
        the artifact), or None."""
        info = self.target.info
        return None if info is None else (info.model_extra or {}).get(key)

    def _build(self, folder: Path) -> nn.Module:
        config = self.target.config
        class_path = self._variant_setting("model_class") or config.model_class
        args = self._variant_setting("model_args")
        args = config.model_args if args is None else args
        if class_path is None:
            raise ModelLoadError(
                f"{folder}: the torch backend needs model_class in model.yaml; fix: add "
                "model_class: package.module:Class (and model_args: {...})"
            )
        cls = import_class(class_path, folder)
        try:
            return cls(**args)
        except TypeError as exc:
            raise ModelLoadError(
                f"{folder}: {class_path}(**model_args) failed: {exc}; "
                "fix: correct model_args in model.yaml (or variant.yaml)"
            ) from None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self._model
        if model is None:
            raise not_loaded(self.target)
        use_threads(self._threads)
        with torch.inference_mode():
            args = [to_tensor(inputs[spec.name]) for spec in self.inputs]
            named = map_outputs(model(*args), self.outputs)
            return {spec.name: to_numpy(named[spec.name], spec) for spec in self.outputs}

    def unload(self) -> None:
        self._model = None

    def memory_bytes(self) -> int:
        model = self._model
        return 0 if model is None else module_bytes(model)


def module_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (its weights)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _refuse_exported_programs(folder: Path) -> None:
    for path in sorted([*folder.glob("*.pt2"), *folder.glob("*.pt2.enc")]):
        raise UnsafeArtifact(
            f"{path}: torch.export programs are refused: torch.export.load unpickles parts "
            "of the file (torch.load with weights_only=False), which can run code. Convert it: "
            "save the module's weights with safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors') and name its class in model.yaml (model_class), or export "
            "it to ONNX (torch.onnx.export) and use backend: onnx."
        )


def _load_compressed(model: nn.Module, folder: Path, name: str) -> None:
    """Weights from a Deep Compression file (`slimserve optimize ... share`), no pickle."""
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise ModelLoadError(
            f"{folder}: variant.yaml names artifact {name!r}, which is not a file in this folder"
        )
    from slimserve.runtimes.dcz import load_compressed

    try:
        state = load_compressed(path)
    except SlimserveError as exc:
        raise ModelLoadError(exc.message) from None
    _apply_state(model, state, path)


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch lists missing keys, unexpected keys and shape mismatches in the message.
        raise ModelLoadError(
            f"{path}: the weights do not fit {type(model).__name__}: {exc}; fix: check "
            "model_class and model_args in model.yaml against how the weights were saved"
        ) from None


def _load_weights(model: nn.Module, path: Path, folder: Path, key: bytes | None) -> None:
    try:
        # An encrypted file is decrypted in memory (read_artifact), never written in clear.
        if is_encrypted(path):
            state = load(read_artifact(path, key, folder))
        else:
            state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file: {exc}") from None
    _apply_state(model, state, path)
