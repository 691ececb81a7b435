"""Import an ONNX file: tensor names, datatypes and shapes read from the graph with `onnx`.

A symbolic (or unknown) first dimension on every input and output means the model batches
(-1 in model.yaml, batching on); a fixed one turns batching off, and the user is told why and
how to re-export. External weight files beside the .onnx are copied along.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from slimserve.errors import InvalidArgument
from slimserve.repository.artifact_base import (
    ONNX_FILE,
    Imported,
    batching_for,
    make_config,
)
from slimserve.repository.schema import BatchingConfig, TensorConfig
from slimserve.repository.store import PICKLE_SUFFIXES

# onnx.TensorProto element type -> KServe v2 datatype (numbers from onnx.proto, stable).
_ONNX_DATATYPES: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}


def inspect_onnx(path: Path, max_batch_size: int | None) -> Imported:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...: all mean "not ONNX"
        raise InvalidArgument(f"{path}: not a readable ONNX model ({exc})") from None
    model = _with_inferred_shapes(model)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_onnx_tensor(path, v) for v in model.graph.input if v.name not in initializers]
    outputs = [_onnx_tensor(path, v) for v in model.graph.output]
    notes: list[str] = []
    batching = _onnx_batching(inputs, outputs, max_batch_size, notes)
    config = make_config(backend="onnx", inputs=inputs, outputs=outputs, batching=batching)
    externals = _onnx_external_files(path, model)
    return Imported(config, lambda dest: _copy_onnx(path, externals, dest), notes)


def _with_inferred_shapes(model: Any) -> Any:
    """Fill in output shapes the exporter left out; keep the model as is if inference fails."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort; the declared shapes still count
        return model


def _onnx_tensor(path: Path, value: Any) -> TensorConfig:
    ttype = value.type
    if not ttype.HasField("tensor_type"):
        raise InvalidArgument(
            f"{path}: '{value.name}' is not a tensor (sequence or map); slimserve serves "
            "tensor inputs and outputs only; fix: re-export with plain tensors"
        )
    elem = ttype.tensor_type.elem_type
    if elem not in _ONNX_DATATYPES:
        raise InvalidArgument(
            f"{path}: '{value.name}' has ONNX element type {elem}, which KServe v2 cannot "
            "carry; fix: cast it to a float or integer type in the export"
        )
    if not ttype.tensor_type.HasField("shape"):
        raise InvalidArgument(
            f"{path}: '{value.name}' has no shape, even after shape inference; fix: export "
            "with shapes, or write model.yaml by hand"
        )
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in ttype.tensor_type.shape.dim
    ]
    return TensorConfig(name=value.name, datatype=_ONNX_DATATYPES[elem], shape=dims)


def _onnx_batching(
    inputs: list[TensorConfig],
    outputs: list[TensorConfig],
    max_batch_size: int | None,
    notes: list[str],
) -> BatchingConfig:
    """Batch when every input and output has a free first dimension; say why not otherwise."""
    fixed = [t for t in inputs + outputs if not t.shape or t.shape[0] != -1]
    if not fixed:
        return batching_for(max_batch_size)
    first = fixed[0]
    why = (
        f"'{first.name}' has a fixed first dimension {first.shape[0]}"
        if first.shape
        else f"'{first.name}' is a scalar"
    )
    if max_batch_size:
        raise InvalidArgument(
            f"--max-batch-size {max_batch_size}: the model cannot batch: {why}; fix: "
            "re-export with a dynamic first axis (torch.onnx.export(..., dynamic_shapes=...) "
            "or dynamic_axes={'input': {0: 'batch'}}), or drop --max-batch-size"
        )
    notes.append(
        f"batching is off: {why} (fixed batch size). To batch, re-export with a dynamic "
        "first axis (e.g. torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
    )
    return batching_for(0)


def _onnx_external_files(path: Path, model: Any) -> list[str]:
    """Relative names of external weight files the model refers to (next to model.onnx)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    names = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            names.add(ExternalDataInfo(tensor).location)
    for name in sorted(names):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not (path.parent / rel).is_file():
            raise InvalidArgument(
                f"{path}: external weight file {name!r} is missing or outside the model's "
                "folder; fix: keep it beside the .onnx file (a plain relative name)"
            )
        if rel.suffix.lower() in PICKLE_SUFFIXES:
            # Not a pickle, but served folders refuse such suffixes outright.
            raise InvalidArgument(
                f"{path}: external weight file {name!r} has a suffix slimserve refuses as "
                "pickle; fix: re-save with onnx.save_model(..., location='model.onnx.data')"
            )
    return sorted(names)


def _copy_onnx(path: Path, externals: list[str], dest: Path) -> None:
    shutil.copyfile(path, dest / ONNX_FILE)
    for name in externals:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.parent / name, dest / name)
