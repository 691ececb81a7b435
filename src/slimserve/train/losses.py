"""Losses that name their parts, so a pipeline can compute them on its last stage.

A loss is `loss_fn(model, batch) -> scalar`. Most are "run the model on the batch's first
tensor, compare its output with the rest": `OutputLoss(criterion)` says so explicitly, which is
what pipeline-parallel training needs (the model's forward is spread over processes; only the
last stage sees the output, and the criterion runs there per micro-batch). Any other callable
still trains in one process, under DDP and under FSDP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]
# (output (B, ...), *targets (B, ...)) -> scalar, a mean over the B rows
Criterion = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class OutputLoss:
    """`criterion(model(batch[0]), *batch[1:])`; the criterion must average over rows (a
    batch mean), so that micro-batch losses weighted by their share of rows add up to it."""

    criterion: Criterion

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.criterion(model(batch[0]), *batch[1:])
