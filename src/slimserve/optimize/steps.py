"""The recipe steps `slimserve optimize` knows, each a thin call into the library API.

A step sees the pipeline `State`: the model as it stands (a torch module, or an ONNX file once
exported), the training data, and a scratch folder. `kind` tracks what the model is between
steps, so an impossible order (finetune after int8, onnx after int8) fails at parse time:
  torch   a float torch module          torch-q  quantized or reduced-precision torch
  onnx    a float ONNX file             onnx-q   a quantized ONNX file
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.optimize.recipe import StepSpec, register_step


@dataclass
class State:
    """What the steps of one recipe share."""

    workdir: Path
    train: tuple[np.ndarray, np.ndarray | None]
    model: Any = None  # torch nn.Module while the model is torch
    onnx_path: Path | None = None
    dtype: str = "float32"
    input_name: str = "input"
    output_name: str = "output"
    # The class and constructor arguments the model now has (distillation replaces the model).
    model_class: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> tuple[Any, Any]:
        """Training data as torch tensors (inputs, labels)."""
        import torch

        x, y = self.train
        return torch.from_numpy(np.ascontiguousarray(x)), (
            None if y is None else torch.from_numpy(np.ascontiguousarray(y))
        )

    def labelled(self, step: str) -> tuple[Any, Any]:
        x, y = self.tensors()
        if y is None:
            raise InvalidArgument(
                f"step '{step}' trains on labels, but --data has none; give "
                "labelled data (an .npz with x and y, IDX with labels, ...)"
            )
        return x, y


# Which model kinds a step accepts, and what it leaves.
FLOAT_TORCH = ("torch",)
ANY_TORCH = ("torch", "torch-q")
FLOAT_ONNX = ("onnx",)


@dataclass(frozen=True)
class Flow:
    accepts: tuple[str, ...]
    produces: str | None  # None: the kind stays


FLOWS: dict[str, Flow] = {}


def _step(
    name: str,
    build: Any,
    run: Any,
    *,
    main: str | None = None,
    accepts: tuple[str, ...] = FLOAT_TORCH,
    produces: str | None = None,
    help: str = "",
) -> None:
    register_step(StepSpec(name, build, run, main, accepts, help))
    FLOWS[name] = Flow(accepts, produces)


# --- pruning, fine-tuning, distillation (the prune/train/distill modules) -----------------


def _build_prune(args: dict[str, Any]) -> Any:
    from slimserve.optimize.prune import MagnitudePruning

    return MagnitudePruning(**args)


def _build_structured(args: dict[str, Any]) -> Any:
    from slimserve.optimize.prune import StructuredPruning

    return StructuredPruning(**args)


def _run_prune(state: State, config: Any) -> None:
    from slimserve.optimize.prune import prune_, sparsity

    data = state.labelled("structured") if type(config).__name__ == "StructuredPruning" else None
    if data is None:
        prune_(state.model, config)
    else:
        prune_(state.model, config, data=data)
    state.notes["sparsity"] = round(float(sparsity(state.model)), 4)


def _build_finetune(args: dict[str, Any]) -> Any:
    from slimserve.train import TrainConfig

    defaults = {"epochs": 1, "lr": 1e-4, "desc": "finetune"}
    return TrainConfig(**{**defaults, **args})


def _run_finetune(state: State, config: Any) -> None:
    from slimserve.train import classification_loss, fit

    result = fit(state.model, classification_loss, state.labelled("finetune"), config)
    state.model.eval()
    state.notes["finetune_losses"] = [round(float(v), 5) for v in result.epoch_losses]


@dataclass(frozen=True)
class DistillStep:
    """distill:hidden=256 (every hidden layer 256 wide) or hidden=300-100 (explicit sizes), or
    width=0.25[,depth=1] (the teacher's hidden sizes scaled); the rest is DistillConfig."""

    hidden: list[int] | None
    width: float
    depth: int | None
    config: Any


def _build_distill(args: dict[str, Any]) -> DistillStep:
    from slimserve.optimize.distill import DistillConfig

    hidden = args.pop("hidden", None)
    width = float(args.pop("width", 0.25))
    depth = args.pop("depth", None)
    if hidden is not None:
        hidden = [int(h) for h in str(hidden).split("-")]
        if min(hidden) < 1:
            raise InvalidArgument(f"hidden={hidden}: layer widths must be positive")
    return DistillStep(hidden, width, depth, DistillConfig(**{"epochs": 5, **args}))


def _run_distill(state: State, step: DistillStep) -> None:
    from slimserve.optimize.distill import derive_student, distill, mlp_sizes

    teacher = state.model
    student = derive_student(teacher, step.width, step.depth)  # refuses non-MLP teachers
    if step.hidden is not None:
        from slimserve.zoo import MLP

        sizes = mlp_sizes(teacher)
        hidden = step.hidden * (len(sizes) - 2) if len(step.hidden) == 1 else step.hidden
        student = MLP([sizes[0], *hidden, sizes[-1]])
    distill(teacher.eval(), student, state.labelled("distill"), step.config)
    state.model = student.eval()
    state.model_class = "slimserve.zoo:MLP"
    state.model_args = {"sizes": mlp_sizes(student)}
    state.notes["student_sizes"] = state.model_args["sizes"]


_step(
    "prune",
    _build_prune,
    _run_prune,
    main="amount",
    help="e.g. prune:0.9 or prune:amount=0.9,scope=global",
)
_step(
    "structured",
    _build_structured,
    _run_prune,
    main="amount",
    help="e.g. structured:0.3 or structured:amount=0.3,importance=taylor",
)
_step(
    "finetune",
    _build_finetune,
    _run_finetune,
    main="epochs",
    help="e.g. finetune:epochs=3,lr=0.0001",
)
_step(
    "distill",
    _build_distill,
    _run_distill,
    main="hidden",
    help="e.g. distill:hidden=256,epochs=5 or distill:width=0.25,depth=1,temperature=4",
)


def check_order(steps: list[tuple[str, str]], start: str) -> None:
    """Refuse step orders that cannot work, naming the step and what would (parse time).

    steps: (step name, step text) in order; start: "torch" or "onnx".
    """
    kind = start
    for name, text in steps:
        flow = FLOWS[name]
        if kind not in flow.accepts:
            raise InvalidArgument(_order_message(text, kind, flow))
        if flow.produces == "q":
            kind = f"{kind.split('-')[0]}-q"
        elif flow.produces is not None:
            kind = flow.produces


def _order_message(text: str, kind: str, flow: Flow) -> str:
    what = {
        "torch-dcz": "a weight-shared (Deep Compression) model",
        "torch": "a float torch model",
        "torch-q": "a quantized torch model",
        "onnx": "an ONNX model",
        "onnx-q": "a quantized ONNX model",
    }[kind]
    return (
        f"step '{text}' cannot run on {what} (it needs "
        f"{' or '.join(flow.accepts)}); put training and pruning steps before "
        "quantization, export with 'onnx' before ONNX-level int8, and use only int8 or "
        "static-int8 on an onnx-backend model"
    )


@dataclass(frozen=True)
class ShareStep:
    """share:bits=5[,conv_bits=8][,epochs=1,lr=0.0001]: k-means weight sharing (Deep
    Compression), centroids fine-tuned for `epochs`; the variant is stored as model.dcz."""

    sharing: Any
    train: Any  # TrainConfig, or None for no centroid fine-tuning


def _build_share(args: dict[str, Any]) -> ShareStep:
    from slimserve.optimize.compress import WeightSharing
    from slimserve.train import TrainConfig

    train: dict[str, Any] = {"lr": 1e-4, "desc": "centroids"}
    train.update({k: args.pop(k) for k in ("epochs", "lr", "batch_size") if k in args})
    config = TrainConfig(**train) if int(train.get("epochs", 0)) else None
    return ShareStep(WeightSharing(**args), config)


def _run_share(state: State, step: ShareStep) -> None:
    from slimserve.optimize.compress import finetune_centroids, share_weights_

    share_weights_(state.model, step.sharing)
    if step.train is not None:
        finetune_centroids(state.model, state.labelled("share"), step.train)
        state.model.eval()
    state.notes["storage"] = "dcz"


_step(
    "share",
    _build_share,
    _run_share,
    main="bits",
    produces="torch-dcz",
    help="e.g. share:bits=5 or share:bits=5,conv_bits=8,epochs=1 (stored as model.dcz)",
)


# The quantization, precision and export steps register themselves on import.
from slimserve.optimize import steps_quant  # noqa: E402, F401
