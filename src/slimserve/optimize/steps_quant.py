"""Recipe steps for quantization, reduced precision and ONNX export (see steps.py)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.optimize.steps import State, _step

# --- quantization -------------------------------------------------------------------------------


def _build_int8(args: dict[str, Any]) -> Any:
    from slimserve.optimize.quantize import DynamicInt8

    return DynamicInt8(**args)


def _build_static(args: dict[str, Any]) -> Any:
    from slimserve.optimize.quantize import StaticInt8

    ops = args.pop("ops", None)  # static-int8:ops=Gemm-MatMul (ONNX models only)
    if ops is not None:
        args["onnx_op_types"] = tuple(str(ops).split("-"))
    return StaticInt8(**args)


def _build_weight_int8(args: dict[str, Any]) -> Any:
    from slimserve.optimize.quantize import WeightOnlyInt8

    return WeightOnlyInt8(**args)


def _build_int4(args: dict[str, Any]) -> Any:
    from slimserve.optimize.quantize import WeightOnlyInt4

    if "group" in args:
        args["group_size"] = args.pop("group")
    return WeightOnlyInt4(**args)


def _build_qat(args: dict[str, Any]) -> Any:
    from slimserve.optimize.quantize import QAT

    return QAT(**args)


def _run_quantize(state: State, config: Any) -> None:
    if state.onnx_path is not None:
        _run_onnx_quantize(state, config)
        return
    from slimserve.optimize.quantize import QAT, StaticInt8, quantize_

    if isinstance(config, QAT):
        data: Any = state.labelled("qat")
    elif isinstance(config, StaticInt8):
        data = state.tensors()[0]
    else:
        data = None
    quantize_(state.model, config, data=data)
    state.model.eval()


def _run_onnx_quantize(state: State, config: Any) -> None:
    from slimserve.optimize.quantize import StaticInt8, quantize_onnx

    assert state.onnx_path is not None
    dst = state.workdir / "model.int8.onnx"
    if isinstance(config, StaticInt8):
        quantize_onnx(
            state.onnx_path,
            dst,
            "static",
            state.train[0][:2048],
            per_channel=config.per_channel,
            calibration=config.calibration,
            max_batches=config.max_batches,
            op_types=config.onnx_op_types,
        )
    else:
        quantize_onnx(state.onnx_path, dst, "dynamic", per_channel=config.per_channel)
    state.onnx_path = dst


_step(
    "int8",
    _build_int8,
    _run_quantize,
    accepts=("torch", "onnx"),
    produces="q",
    help="dynamic int8; e.g. int8 or int8:per_channel=false",
)
_step(
    "static-int8",
    _build_static,
    _run_quantize,
    main="calibration",
    accepts=("torch", "onnx"),
    produces="q",
    help="e.g. static-int8:calibration=entropy,per_channel=true; torch: kernel=auto|native|gemm"
    " (auto: torch's quantized kernels with int8 between layers where the graph allows);"
    " ONNX: ops=Gemm-MatMul",
)
_step("weight-int8", _build_weight_int8, _run_quantize, produces="q", help="weight-only int8")
_step(
    "int4",
    _build_int4,
    _run_quantize,
    main="group",
    produces="q",
    help="weight-only int4; e.g. int4:group=64 (32, 64 or 128)",
)
_step(
    "qat",
    _build_qat,
    _run_quantize,
    main="epochs",
    produces="q",
    help="e.g. qat:epochs=1,lr=0.0001",
)


# --- precision and ONNX export -------------------------------------------------------------------


def _build_precision(dtype: Literal["bfloat16", "float16"]) -> Any:
    def build(args: dict[str, Any]) -> Any:
        from slimserve.optimize.precision import Precision

        return Precision(dtype, **args)

    return build


def _run_precision(state: State, config: Any) -> None:
    from slimserve.optimize.precision import to_precision_

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
    import torch

    from slimserve.optimize.export import export_onnx

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


_step(
    "bf16",
    _build_precision("bfloat16"),
    _run_precision,
    produces="q",
    help="bf16 weights where the CPU has avx512_bf16/amx_bf16 (else stays fp32)",
)
_step(
    "fp16",
    _build_precision("float16"),
    _run_precision,
    produces="q",
    help="fp16 on CUDA (e.g. fp16:device=cuda)",
)
_step(
    "onnx",
    _build_onnx,
    _run_onnx,
    main="opset",
    produces="onnx",
    help="export to ONNX; e.g. onnx or onnx:opset=17",
)
