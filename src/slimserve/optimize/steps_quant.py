"""Recipe steps for quantization, reduced precision and ONNX export (registered on import).

All need no data but `static-int8` (calibration inputs) and `qat` (labelled data)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from slimserve.errors import InvalidArgument
from slimserve.optimize.export import export_onnx
from slimserve.optimize.precision import Precision, to_precision_
from slimserve.optimize.quantize import (
    QAT,
    DynamicInt8,
    StaticInt8,
    WeightOnlyInt4,
    WeightOnlyInt8,
    quantize_,
    quantize_onnx,
)
from slimserve.optimize.registry import always, register_step
from slimserve.optimize.state import State

# --- quantization -------------------------------------------------------------------------------


def _build_int8(args: dict[str, Any]) -> Any:

    return DynamicInt8(**args)


def _build_static(args: dict[str, Any]) -> Any:

    ops = args.pop("ops", None)  # static-int8:ops=Gemm-MatMul (ONNX models only)
    if ops is not None:
        args["onnx_op_types"] = tuple(str(ops).split("-"))
    return StaticInt8(**args)


def _build_weight_int8(args: dict[str, Any]) -> Any:

    return WeightOnlyInt8(**args)


def _build_int4(args: dict[str, Any]) -> Any:

    if "group" in args:
        args["group_size"] = args.pop("group")
    return WeightOnlyInt4(**args)


def _build_qat(args: dict[str, Any]) -> Any:

    return QAT(**args)


def _run_quantize(state: State, config: Any) -> None:
    if state.onnx_path is not None:
        _run_onnx_quantize(state, config)
        return

    if isinstance(config, QAT):
        data: Any = state.labelled("qat")
    elif isinstance(config, StaticInt8):
        data = state.real_inputs("static-int8")
    else:
        data = None
    quantize_(state.model, config, data=data)
    state.model.eval()


def _run_onnx_quantize(state: State, config: Any) -> None:

    assert state.onnx_path is not None
    dst = state.workdir / "model.int8.onnx"
    if isinstance(config, StaticInt8):
        quantize_onnx(
            state.onnx_path,
            dst,
            "static",
            state.real_inputs("static-int8").numpy()[:2048],
            per_channel=config.per_channel,
            calibration=config.calibration,
            max_batches=config.max_batches,
            op_types=config.onnx_op_types,
        )
    else:
        quantize_onnx(state.onnx_path, dst, "dynamic", per_channel=config.per_channel)
    state.onnx_path = dst


register_step(
    "int8",
    _build_int8,
    _run_quantize,
    accepts=("torch", "onnx"),
    produces="q",
    help="dynamic int8; e.g. int8 or int8:per_channel=false",
)
register_step(
    "static-int8",
    _build_static,
    _run_quantize,
    needs=always("inputs"),
    main="calibration",
    accepts=("torch", "onnx"),
    produces="q",
    help="e.g. static-int8:calibration=entropy,per_channel=true; torch: kernel=auto|native|gemm"
    " (auto: torch's quantized kernels with int8 between layers where the graph allows);"
    " ONNX: ops=Gemm-MatMul",
)
register_step(
    "weight-int8", _build_weight_int8, _run_quantize, produces="q", help="weight-only int8"
)
register_step(
    "int4",
    _build_int4,
    _run_quantize,
    main="group",
    produces="q",
    help="weight-only int4; e.g. int4:group=64 (32, 64 or 128)",
)
register_step(
    "qat",
    _build_qat,
    _run_quantize,
    needs=always("labels"),
    main="epochs",
    produces="q",
    help="e.g. qat:epochs=1,lr=0.0001",
)


# --- precision and ONNX export -------------------------------------------------------------------


def _build_precision(dtype: Literal["bfloat16", "float16"]) -> Any:
    def build(args: dict[str, Any]) -> Any:

        return Precision(dtype, **args)

    return build


def _run_precision(state: State, config: Any) -> None:

    state.dtype = to_precision_(state.model, config)
    state.notes["dtype"] = state.dtype


def _build_onnx(args: dict[str, Any]) -> Any:
    opset = int(args.pop("opset", 17))
    if args:
        raise InvalidArgument(f"unknown argument {sorted(args)[0]!r}; onnx takes opset=")
    if not 13 <= opset <= 21:
        raise InvalidArgument(f"opset={opset} is out of range; use 13-21 (default 17)")
    return opset


def _run_onnx(state: State, opset: Any) -> None:

    example = torch.from_numpy(np.ascontiguousarray(state.train[0][:4]))
    path = state.workdir / "model.onnx"
    result = export_onnx(
        state.model,
        example,
        path,
        input_names=[state.input_name],
        output_names=[state.output_name],
        opset=opset,
    )
    state.notes["onnx_max_abs_error"] = result.max_abs_error
    state.onnx_path = path
    state.model = None


register_step(
    "bf16",
    _build_precision("bfloat16"),
    _run_precision,
    produces="q",
    help="bf16 weights where the CPU has avx512_bf16/amx_bf16 (else stays fp32)",
)
register_step(
    "fp16",
    _build_precision("float16"),
    _run_precision,
    produces="q",
    help="fp16 on CUDA (e.g. fp16:device=cuda)",
)
register_step(
    "onnx",
    _build_onnx,
    _run_onnx,
    main="opset",
    produces="onnx",
    help="export to ONNX; e.g. onnx or onnx:opset=17",
)
