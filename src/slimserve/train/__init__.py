"""The one training loop behind fine-tuning, quantization-aware training and distillation.

`fit(model, loss_fn, data, TrainConfig(...))` runs in one process, or data-parallel under
`torchrun` (torch.distributed DDP: gloo on CPU, NCCL on CUDA) without any change by the caller.
Names are loaded lazily so that importing `slimserve.train` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Callback": "slimserve.train.loop",
    "FitResult": "slimserve.train.loop",
    "LossScaler": "slimserve.train.loop",
    "TrainConfig": "slimserve.train.loop",
    "accuracy": "slimserve.train.loop",
    "classification_loss": "slimserve.train.loop",
    "fit": "slimserve.train.loop",
    "predict": "slimserve.train.loop",
    "DistContext": "slimserve.train.distributed",
    "barrier": "slimserve.train.distributed",
    "context": "slimserve.train.distributed",
    "init_distributed": "slimserve.train.distributed",
    "is_main_process": "slimserve.train.distributed",
    "shutdown": "slimserve.train.distributed",
    "masked_parameters": "slimserve.train.loop",
    "apply_masks": "slimserve.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slimserve.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
