"""The one registry of recipe steps: name -> how to build its config, run it, and order it.

A step module registers its steps with `register_step(...)` when imported; `steps.py` imports
every step module, so `steps.STEPS` is the complete table that `recipe.py` parses against.

Kinds of model between steps (`accepts` / `produces`), so an impossible order (finetune after
int8, onnx after int8) fails at parse time:
  torch      a float torch module          torch-q    quantized or reduced-precision torch
  torch-dcz  weight-shared (Deep Compression, stored as model.dcz)
  onnx       a float ONNX file             onnx-q     a quantized ONNX file
`produces="q"` keeps the family and marks it quantized (torch -> torch-q, onnx -> onnx-q).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# What a step needs from --data: nothing, inputs only (calibration), or inputs with labels.
DataNeed = Literal["none", "inputs", "labels"]

FLOAT_TORCH = ("torch",)
ANY_TORCH = ("torch", "torch-q")


def _no_data(config: Any) -> DataNeed:
    return "none"


@dataclass(frozen=True)
class StepSpec:
    """A registered step."""

    name: str
    build: Callable[[dict[str, Any]], Any]  # arguments -> config (validates them)
    run: Callable[[Any, Any], None]  # (pipeline state, config) -> None
    main_arg: str | None = None  # the argument a bare value sets (prune:0.9 -> amount)
    accepts: tuple[str, ...] = FLOAT_TORCH  # model kinds the step runs on
    produces: str | None = None  # the kind it leaves; None: unchanged
    needs: Callable[[Any], DataNeed] = _no_data  # config -> what it needs from --data
    help: str = ""


STEPS: dict[str, StepSpec] = {}


def register_step(
    name: str,
    build: Callable[[dict[str, Any]], Any],
    run: Callable[[Any, Any], None],
    *,
    main: str | None = None,
    accepts: tuple[str, ...] = FLOAT_TORCH,
    produces: str | None = None,
    needs: Callable[[Any], DataNeed] = _no_data,
    help: str = "",
) -> StepSpec:
    spec = StepSpec(name, build, run, main, accepts, produces, needs, help)
    STEPS[name] = spec
    return spec


def labels_if(condition: Callable[[Any], bool]) -> Callable[[Any], DataNeed]:
    """A `needs` function: labelled data when `condition(config)`, else none."""
    return lambda config: "labels" if condition(config) else "none"


def always(need: DataNeed) -> Callable[[Any], DataNeed]:
    return lambda config: need
