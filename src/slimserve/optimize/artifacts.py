"""Reading a model version's artifact and writing a variant's, the way the server loads them.

torch: `model.safetensors` + model_class/model_args. A variant whose layers changed type
(quantized) or shape (structured pruning), or whose weights changed dtype, is saved as a
`wrappers.VariantModel`, and its variant.yaml carries the model_class/model_args to build it.
onnx: `model.onnx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from slimserve.errors import InvalidArgument, NotFound
from slimserve.optimize.compress import load_compressed, save_compressed
from slimserve.optimize.prune import make_permanent
from slimserve.optimize.quantize import quantized_layers
from slimserve.repository.schema import ModelConfig
from slimserve.runtimes.quantized.variant import float_layer_spec, import_class
from slimserve.train.stages import pipeline_blocks, split_blocks

VARIANT_CLASS = "slimserve.runtimes.quantized.variant:VariantModel"


def find_file(folder: Path, suffix: str) -> Path:
    """The artifact of a version: model<suffix>, or the only *<suffix> file."""
    preferred = folder / f"model{suffix}"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise NotFound(
            f"{folder}: expected one {suffix} artifact (model{suffix}), found "
            f"{[p.name for p in found]}"
        )
    return found[0]


def build_module(model_class: str, model_args: dict[str, Any]) -> Any:
    try:
        return import_class(model_class)(**model_args)
    except TypeError as exc:
        raise InvalidArgument(f"{model_class}(**model_args) failed: {exc}") from None


def load_torch(folder: Path, model_class: str, model_args: dict[str, Any]) -> Any:
    """Build the class and load its weights strictly (as the torch runtime does): from
    model.safetensors, or from model.dcz (Deep Compression storage) where that is the artifact."""
    model = build_module(model_class, model_args)
    if (folder / "model.dcz").is_file():
        state = load_compressed(folder / "model.dcz")
    else:
        from safetensors.torch import load_file

        state = load_file(str(find_file(folder, ".safetensors")))
    model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass(frozen=True)
class TorchFiles:
    """A torch model on disk, not loaded yet: its folder (model.safetensors), class
    ("package.module:Class") and constructor arguments. Distillation takes one as its teacher
    to load only the pipeline stage each process runs (load_torch_stage)."""

    folder: Path
    model_class: str
    model_args: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        return load_torch(self.folder, self.model_class, self.model_args)


def load_torch_stage(files: TorchFiles, stages: int, stage: int) -> nn.Module:
    """The model with only pipeline stage `stage` of `stages` in memory.

    Built on the meta device (shapes, no memory), cut into stages as the pipeline cuts it
    (train/stages.py), then only this stage's blocks are filled from the safetensors file,
    each tensor read on its own (`safe_open` per tensor: at most one tensor's file pages are
    mapped at a time, so the process's peak is its stage plus one tensor). The other stages
    stay on the meta device: the model runs through train.pipeline.pipeline_forward only.
    """
    with torch.device("meta"):
        model: nn.Module = build_module(files.model_class, files.model_args)
    blocks = pipeline_blocks(model)
    start, end = split_blocks(blocks, stages)[stage]
    prefixes = {id(m): name for name, m in model.named_modules()}
    path = str(find_file(files.folder, ".safetensors"))
    for block in blocks[start:end]:
        names = list(block.state_dict())
        if not names:
            continue  # weightless (an activation, a reshape the model makes in forward)
        prefix = prefixes[id(block)]
        state = {}
        for name in names:
            with safe_open(path, framework="pt") as f:
                state[name] = f.get_tensor(f"{prefix}.{name}" if prefix else name)
        block.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*block.parameters(), *block.buffers()]):
            raise InvalidArgument(
                f"{files.model_class}: block '{prefix}' has tensors its state dict does not "
                "hold (non-persistent buffers), which a stage loaded from the file cannot "
                "have; load the teacher whole (pass the module, not TorchFiles)"
            )
    return model.eval()


def load_original(version_dir: Path, config: ModelConfig) -> tuple[str, Any]:
    """("torch", module) or ("onnx", path) for a version's artifact."""
    if config.backend == "onnx":
        return "onnx", find_file(version_dir, ".onnx")
    if config.backend == "torch":
        if not config.model_class:
            raise InvalidArgument(
                f"{version_dir.parent}/model.yaml: the torch backend needs "
                "model_class; add it (package.module:Class)"
            )
        return "torch", load_torch(version_dir, config.model_class, dict(config.model_args))
    raise InvalidArgument(
        f"slimserve optimize works on torch and onnx models; '{version_dir.parent.name}' has "
        f"backend {config.backend}; export it to ONNX first, or use the library API "
        "(slimserve.optimize.quantize_) on the module"
    )


def _changed_layers(model: Any, base: Any) -> dict[str, dict[str, Any]]:
    """Specs of layers that are quantized, or whose shape differs from a fresh base model."""
    layers = quantized_layers(model)
    fresh = dict(base.named_modules())
    for name, module in model.named_modules():
        if name in layers or any(name.startswith(q + ".") for q in layers):
            continue
        spec = float_layer_spec(module)
        if spec is not None and name in fresh and spec != float_layer_spec(fresh[name]):
            layers[name] = spec
    return layers


def save_torch(
    model: Any,
    folder: Path,
    base_class: str,
    base_args: dict[str, Any],
    dtype: str,
    storage: str = "safetensors",
) -> dict[str, Any] | None:
    """Write folder/model.safetensors (or model.dcz, Deep Compression storage); returns the
    model_class/model_args override, if any."""
    from torch import nn

    make_permanent(model)  # drop pruning masks: zeros stay, the state dict is plain again
    layers = _changed_layers(model, build_module(base_class, base_args))
    wrapped = bool(layers) or dtype != "float32"
    if wrapped:  # VariantModel holds the base model as `.model`: keys gain that prefix
        holder = nn.Module()
        holder.model = model
        model = holder
    _write_weights(model, folder, storage)
    if not wrapped:
        return None
    args = {"base_class": base_class, "base_args": base_args, "layers": layers, "dtype": dtype}
    return {"model_class": VARIANT_CLASS, "model_args": args}


def _write_weights(model: Any, folder: Path, storage: str) -> None:
    if storage == "dcz":
        save_compressed(model, folder / "model.dcz")  # weight codes become the storage itself
        return
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
