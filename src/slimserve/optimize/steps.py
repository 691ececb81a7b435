"""Every recipe step, in one registry: importing this module registers them all.

`STEPS` (from registry.py) maps a step's name to its spec; the step modules register into it
when imported here: steps_train (prune, structured, finetune, distill, share,
deep-compression) and steps_quant (int8, static-int8, weight-int8, int4, qat, bf16, fp16,
onnx). `check_order` and `check_data` refuse, at parse time, what cannot run.
"""

from __future__ import annotations

from slimserve.errors import InvalidArgument
from slimserve.optimize import steps_quant, steps_train
from slimserve.optimize.registry import STEPS, StepSpec

__all__ = ["STEPS", "StepSpec", "check_data", "check_order", "steps_quant", "steps_train"]

_KINDS = {
    "torch-dcz": "a weight-shared (Deep Compression) model",
    "torch": "a float torch model",
    "torch-q": "a quantized torch model",
    "onnx": "an ONNX model",
    "onnx-q": "a quantized ONNX model",
}


def check_order(steps: list[tuple[str, str]], start: str) -> None:
    """Refuse step orders that cannot work, naming the step and what would.

    steps: (step name, step text) in order; start: "torch" or "onnx".
    """
    kind = start
    for name, text in steps:
        spec = STEPS[name]
        if kind not in spec.accepts:
            raise InvalidArgument(_order_message(text, kind, spec))
        if spec.produces == "q":
            kind = f"{kind.split('-')[0]}-q"
        elif spec.produces is not None:
            kind = spec.produces


def _order_message(text: str, kind: str, spec: StepSpec) -> str:
    return (
        f"step '{text}' cannot run on {_KINDS[kind]} (it needs "
        f"{' or '.join(spec.accepts)}); put training and pruning steps before "
        "quantization, export with 'onnx' before ONNX-level int8, and use only int8 or "
        "static-int8 on an onnx-backend model"
    )


def check_data(steps: list[tuple[StepSpec, object, str]]) -> None:
    """Without --data: refuse the first step that needs it, naming the flag.

    steps: (spec, config, step text) in order.
    """
    for spec, config, text in steps:
        need = spec.needs(config)
        if need == "labels":
            raise InvalidArgument(
                f"step '{text}' trains on labelled data: give --data (an .npz with x and y, "
                "a .csv with a label column, IDX images with labels, fashion-mnist or digits); "
                "without data, use int8, weight-int8, int4, bf16, fp16, onnx, prune or "
                "structured without epochs, or share without epochs"
            )
        if need == "inputs":
            raise InvalidArgument(
                f"step '{text}' calibrates on representative inputs: give --data (inputs "
                "alone are enough), or use int8 (dynamic), which needs none"
            )
