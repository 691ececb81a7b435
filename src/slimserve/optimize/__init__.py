"""Make models cheaper to serve: one verb per technique, one frozen config per method.

    from slimserve.optimize import quantize_, DynamicInt8, StaticInt8, export_onnx, evaluate
    quantize_(model, DynamicInt8())
    quantize_(model, StaticInt8(calibration="entropy"), data=calibration_inputs)
    export_onnx(model, example, "model.onnx"); quantize_onnx("model.onnx", "int8.onnx")
    evaluate(model, x, y, reference=original)

Names load lazily (PEP 562), so `import slimserve.optimize` imports no torch. The verbs
`evaluate` and `distill` live in the submodules `evaluation` and `distillation`, so that
importing a submodule never shadows a verb of the same name.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # quantization
    "quantize_": "quantize",
    "DynamicInt8": "quantize",
    "StaticInt8": "quantize",
    "WeightOnlyInt8": "quantize",
    "WeightOnlyInt4": "quantize",
    "QAT": "quantize",
    "prepare_qat": "quantize",
    "convert_qat": "quantize",
    "quantized_layers": "quantize",
    "quantize_onnx": "onnx_quant",
    # pruning (prune.py)
    "prune_": "prune",
    "MagnitudePruning": "prune",
    "StructuredPruning": "prune",
    "prune_iteratively": "prune",
    "sensitivity": "prune",
    "make_permanent": "prune",
    # precision
    "Precision": "precision",
    "Bf16": "precision",
    "Fp16": "precision",
    "to_precision_": "precision",
    "bf16_supported": "precision",
    "PrecisionFallbackWarning": "precision",
    # export, evaluation, data, pipeline
    "export_onnx": "export",
    "evaluate": "evaluation",
    "load_data": "data",
    "fashion_mnist": "data",
    "digits": "data",
    "optimize": "pipeline",
    "Options": "pipeline",
    "VariantModel": "wrappers",
    "DeepCompression": "deep_compression",
    "deep_compress_": "deep_compression",
    "OptimizeConfig": "config",
}
_OPTIONAL = {
    # distillation (distill.py) and Deep Compression storage (compress.py)
    "distill": "distillation",
    "DistillConfig": "distillation",
    "derive_student": "distillation",
    "WeightSharing": "compress",
    "share_weights_": "compress",
    "save_compressed": "compress",
    "load_compressed": "compress",
}

__all__ = sorted({*_EXPORTS, *_OPTIONAL})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _OPTIONAL.get(name)
    if module is None:
        raise AttributeError(f"module 'slimserve.optimize' has no attribute {name!r}")
    return getattr(importlib.import_module(f"slimserve.optimize.{module}"), name)
