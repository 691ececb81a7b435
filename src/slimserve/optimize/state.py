"""What the steps of one recipe share while it runs (see registry.py for the model kinds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimserve.errors import InvalidArgument
from slimserve.train.loop import accuracy

Arrays = tuple[np.ndarray, np.ndarray | None]

# Rows of held-out data a step scores its model on between rounds (progress bars, notes).
PROGRESS_ROWS = 2000


def needs_data_message(step: str, what: str = "labelled data") -> str:
    return (
        f"step '{step}' needs {what}; give --data (an .npz with x and y, a .csv with a "
        "label column, IDX images with labels, fashion-mnist or digits)"
    )


@dataclass
class State:
    """The model as it stands, the data, and a scratch folder.

    `train` is --data, or, when none was given (`synthetic`), inputs made from model.yaml's
    shapes and dtypes without labels; `evaluation` is the held-out data the steps report
    accuracy on between rounds (None: not measured).
    """

    workdir: Path
    train: Arrays
    evaluation: Arrays | None = None
    synthetic: bool = False
    seed: int = 0
    model: Any = None  # torch nn.Module while the model is torch
    onnx_path: Path | None = None
    dtype: str = "float32"
    input_name: str = "input"
    output_name: str = "output"
    # The class and constructor arguments the model now has (distillation replaces the model).
    model_class: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training data as torch tensors (inputs, labels)."""
        x, y = self.train
        return torch.from_numpy(np.ascontiguousarray(x)), (
            None if y is None else torch.from_numpy(np.ascontiguousarray(y))
        )

    def labelled(self, step: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tensors()
        if y is None or self.synthetic:
            raise InvalidArgument(needs_data_message(step))
        return x, y

    def real_inputs(self, step: str) -> torch.Tensor:
        if self.synthetic:
            raise InvalidArgument(needs_data_message(step, "representative inputs"))
        return self.tensors()[0]

    def accuracy(self, model: Any = None) -> float | None:
        """Top-1 accuracy of `model` (default: the current one) on held-out rows, if labelled."""
        if self.evaluation is None:
            return None
        x, y = self.evaluation
        if y is None or isinstance(x, dict):
            return None
        rows = slice(0, PROGRESS_ROWS)
        xt = torch.from_numpy(np.ascontiguousarray(x[rows]))
        return float(
            accuracy(self.model if model is None else model, xt, torch.from_numpy(y[rows]))
        )
