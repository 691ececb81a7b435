"""Reading a model version's artifact and writing a variant's, the way the server loads them.

torch: `model.safetensors` + model_class/model_args. A variant whose layers changed type
(quantized) or shape (structured pruning), or whose weights changed dtype, is saved as a
`wrappers.VariantModel`, and its variant.yaml carries the model_class/model_args to build it.
onnx: `model.onnx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimserve.errors import InvalidArgument, NotFound
from slimserve.optimize.compress import load_compressed, save_compressed
from slimserve.optimize.prune import make_permanent
from slimserve.optimize.quantize import quantized_layers
from slimserve.repository.schema import ModelConfig
from slimserve.runtimes.quantized.variant import float_layer_spec, import_class

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
